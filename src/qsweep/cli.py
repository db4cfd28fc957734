"""`python -m qsweep`: Hydra's command line, preceded by a pre-flight that plans every job of the
sweep, so a typo in job 5 fails in a second with one line instead of after four finished jobs."""

from __future__ import annotations

import difflib
import faulthandler
import itertools
import logging
import re
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from qsweep import config, devices, dryrun, job, logs, procs, tracking
from qsweep.context import JobContext
from qsweep.errors import QsweepError
from qsweep.plan import (
    JobPlan,
    benchmark_order,
    given_keys,
    plan_job,
    sweep_label,
    sweep_overrides,
    swept_keys,
)
from qsweep.sweep import SweepFailed

log = logging.getLogger(__name__)


def group_options(group: str) -> list[str]:
    """The options of a config group (YAML files in conf/ or sweeps/, and ConfigStore entries),
    schemas left out; asks Hydra, so call it inside an initialized Hydra context."""
    loader = GlobalHydra.instance().config_loader()
    return sorted(o for o in loader.get_group_options(group) if not config.is_schema(o))


# The groups `--help` lists with their options (conf/hydra/help/qsweep.yaml), a user's and Hydra's.
HELP_GROUPS = {
    "app": ("model", "method", "engine", "benchmark", "sweeps"),
    "hydra": ("hydra/launcher", "hydra/sweeper"),
}


def help_options(which: str) -> str:
    """The `qsweep.help_options` resolver: one wrapped line per group of HELP_GROUPS[which] with its
    options, schemas left out (`python -m qsweep --help`)."""
    import textwrap

    lines = []
    for group in HELP_GROUPS[which]:
        options = ", ".join(group_options(group)) or "-"
        head = f"  {group + ':':<16}"
        lines.extend(textwrap.wrap(options, 100, initial_indent=head, subsequent_indent=" " * len(head)))
    return "\n".join(lines)


def register_help_resolvers() -> None:
    """The resolvers qsweep's `--help` template calls (Hydra resolves it while printing the help)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("qsweep.help_options", help_options, replace=True)
    OmegaConf.register_new_resolver(
        "qsweep.help_store", lambda *, _root_: tracking.tracking_uri(_root_), replace=True
    )


def _one_line(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages, boiled down to the line that names the problem."""
    missing = re.search(r"Could not (?:find|load) '([\w./-]+)'", str(err))
    if isinstance(err, MissingConfigException) and missing:
        group, _, option = missing.group(1).rpartition("/")
        options = [o for o in (err.options or group_options(group)) if not config.is_schema(o)]
        if group and options:
            near = difflib.get_close_matches(option, options, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            return f"unknown {group} '{option}'{hint}; choose one of: {', '.join(options)}"
    parts = [str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__]
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip():
        line = str(cause).strip().splitlines()[0]
        if line not in parts[0]:
            parts.append(line)
    full_key = getattr(err, "full_key", None) or getattr(cause, "full_key", None)
    text = ": ".join(parts)
    return f"{text} (at {full_key})" if full_key and str(full_key) not in text else text


def sweep_hydra(overrides: list[str]) -> DictConfig:
    """Hydra's own settings for a sweep (sweeper, launcher): the config composed with the
    overrides that are the same for every job."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [str(o.input_line) for o in parsed if not o.is_sweep_override()]  # parsed: never None
    return compose("config", overrides=fixed, return_hydra_config=True).hydra


def expand_jobs(overrides: list[str], multirun: bool, hydra_cfg: DictConfig | None = None) -> list[list[str]]:
    """The override list of every job the sweep will run (the BasicSweeper's cartesian product);
    `hydra_cfg` is `sweep_hydra(overrides)` where the caller has it already."""
    if not multirun:
        return [overrides]
    params = (hydra_cfg if hydra_cfg is not None else sweep_hydra(overrides)).sweeper.params
    choices = []
    for o in sweep_overrides(overrides, params):
        if o.is_sweep_override():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


def plan_overrides(overrides: list[str], swept: frozenset[str] = frozenset()) -> JobPlan:
    """Compose one job's config as Hydra will and plan it (inside an initialized Hydra context);
    `swept`, the keys the sweep varies (`swept_keys`), name it apart from its siblings."""
    from hydra import compose

    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    label = sweep_label(overrides, swept)
    return plan_job(cfg, cfg.hydra.runtime.choices, benchmark_order(overrides), given_keys(overrides), label)


def preflight(overrides: list[str], multirun: bool) -> list[JobPlan]:
    """Compose and plan every job; raise QsweepError with one line on bad input."""
    from hydra import initialize_config_dir

    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3", job_name="qsweep"):
        try:
            hydra_cfg = sweep_hydra(overrides) if multirun else None
            jobs = expand_jobs(overrides, multirun, hydra_cfg)
            swept = swept_keys(overrides, hydra_cfg.sweeper.params) if hydra_cfg is not None else frozenset()
            plans = [plan_overrides(job_overrides, swept) for job_overrides in jobs]
            slots = launcher_slots(hydra_cfg) if hydra_cfg is not None else ("hydra/launcher=basic", 1)
            if hydra_cfg is not None:
                check_parallel_timing(plans, slots)
            if runs_elsewhere(hydra_cfg):
                for plan in plans:
                    plan.remote = True
            else:
                check_gpus(plans, slots, hydra_cfg)
            return plans
        except (OmegaConfBaseException, hydra.errors.HydraException) as err:
            raise QsweepError(_one_line(err)) from None
        except AssertionError:  # OmegaConf, setting a key under a benchmark that is not selected (None)
            raise QsweepError(_unselected(overrides)) from None


def launcher_target(hydra_cfg: DictConfig | None) -> str:
    """The launcher's class path ('...submitit_launcher.LocalLauncher'), '' without a sweep."""
    return str(hydra_cfg.launcher.get("_target_", "")) if hydra_cfg is not None else ""


def launcher_slots(hydra_cfg: DictConfig) -> tuple[str, int]:
    """The sweep's launcher (from `sweep_hydra`) and how many jobs it runs at once on this machine
    (1: one after another, or each on a node of its own as under SLURM)."""
    import os

    launcher = hydra_cfg.launcher
    name = f"hydra/launcher={hydra_cfg.runtime.choices.get('hydra/launcher', 'basic')}"
    cores = os.cpu_count() or 1
    if "n_jobs" in launcher:  # joblib: -1 all cores, -2 all but one, ...
        n_jobs = launcher.n_jobs if launcher.n_jobs is not None else 1
        return name, n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    if launcher_target(hydra_cfg).endswith(".LocalLauncher"):
        return name, sys.maxsize  # submitit's local processes start together (array_parallelism is SLURM's)
    return name, 1


def runs_elsewhere(hydra_cfg: DictConfig | None) -> bool:
    """The launcher runs the jobs on other machines (SLURM's nodes), whose GPUs and hub access
    this one cannot judge."""
    return launcher_target(hydra_cfg).endswith(".SlurmLauncher")


def check_gpus(plans: list[JobPlan], slots: tuple[str, int], hydra_cfg: DictConfig | None = None) -> None:
    """Every job's GPU count fits the GPUs visible here (`gpus.ids`, CUDA_VISIBLE_DEVICES or
    nvidia-smi); where a parallel launcher runs more jobs at once than there are GPUs for, a note
    says that the others wait for theirs."""
    running = [p for p in plans if not p.skip_reason and p.gpus]
    if not running:
        return
    visible = devices.visible(running[0].gpu_slots.ids)
    local = launcher_target(hydra_cfg).endswith(".LocalLauncher")
    if visible and running[0].gpu_slots.ids is None and local and hydra_cfg is not None:
        # submitit gives every local job the first gpus_per_node devices (none by default); qsweep
        # then gives each job its own among them
        visible = visible[: hydra_cfg.launcher.get("gpus_per_node") or 0]
        if not visible:
            raise QsweepError(
                "hydra/launcher=submitit_local shows its jobs no GPU unless told: set "
                f"hydra.launcher.gpus_per_node to this machine's {len(devices.visible(None))} (each job then "
                "gets its own among them)"
            )
    if not visible:
        return  # no GPU: the jobs that need one are refused with the reason (cannot_run_here)
    widest = max(running, key=lambda p: p.gpus)
    if widest.gpus > len(visible):
        raise QsweepError(
            f"job {widest.name} needs {widest.gpus} GPU(s) and {len(visible)} are visible here "
            f"({', '.join(visible)}): lower engine.tensor_parallel_size (or engine.gpus, gpus.per_job), "
            "or name more with gpus.ids"
        )
    name, at_once = slots
    if min(at_once, len(running)) * widest.gpus > len(visible):
        widest.notes.append(
            f"{name} starts up to {min(at_once, len(running))} jobs at once and {len(visible)} GPU(s) hold "
            f"{len(visible) // widest.gpus} of them: the others wait for free GPUs"
        )


def check_parallel_timing(plans: list[JobPlan], slots: tuple[str, int]) -> None:
    """On a CPU-only machine, jobs that time things must not run side by side: each would measure
    the other (a 16-chunk perplexity took 240-300 s instead of ~10 beside a second llama.cpp, a
    load test gave 2-3 tok/s instead of ~100), unless `parallel_timing=true` insists."""
    name, at_once = slots
    running = [p for p in plans if not p.skip_reason]
    timed = [
        bench for p in running if p.device == "cpu"
        for bench, (benchmark, _) in p.benchmarks.items() if benchmark.measures_time
    ]  # fmt: skip
    if min(at_once, len(running)) > 1 and timed and not any(p.parallel_timing for p in plans):
        raise QsweepError(
            f"{name} runs {min(at_once, len(running))} jobs at once on this CPU-only machine, and "
            f"benchmark {timed[0]} times things: side by side they measure each other; run them one "
            "at a time (the default launcher, or hydra.launcher.n_jobs=1), or set parallel_timing=true "
            "to insist"
        )


def _unselected(overrides: list[str]) -> str:
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    for key in keys:
        parts = key.split(".")
        if parts[0] == "benchmark" and len(parts) > 2:
            return (
                f"{key} is set, but benchmark {parts[1]} may not be selected: "
                f"add it to benchmark=[...] or drop the setting"
            )
    return f"cannot apply the overrides {' '.join(overrides)}: a key sits under a setting that is null"


def run_here(plans: list[JobPlan]) -> Iterator[tuple[JobPlan, JobContext]]:
    """The jobs this machine will run (not skipped; not on a cluster's node, which has its own
    hub access, GPUs and environments), each with a context for its checks."""
    for plan in plans:
        if not (plan.skip_reason or plan.remote):
            yield plan, plan.context(Path(tempfile.gettempdir()))


def cannot_run_here(plans: list[JobPlan]) -> str | None:
    """One line saying which jobs this machine cannot run and why (no hub, no GPU), or None."""
    blocked: dict[str, list[str]] = {}
    for plan, ctx in run_here(plans):
        for reason in plan.unavailable(ctx):
            blocked.setdefault(reason, []).append(plan.name)
    if not blocked:
        return None
    jobs = len({name for names in blocked.values() for name in names})
    return (
        f"{jobs} job(s) cannot run on this machine: {'; '.join(blocked)}: run it where they can, or pass "
        "model.path=/local/copy and device=cpu (dry_run=true shows the plan)"
    )


def missing_stage_envs(plans: list[JobPlan]) -> str | None:
    """One line naming the stage environments the jobs need that ./setup.sh has not built here (a
    job would fail on it after its run was made and its model prepared), or None."""
    missing: dict[str, Path] = {}
    for plan, ctx in run_here(plans):
        for spec in plan.stage_envs():
            env = ctx.stage_env(spec)
            if not env.is_set_up():
                missing.setdefault(spec.name, env.root.parent)
    if not missing:
        return None
    where = ", ".join(sorted({str(folder) for folder in missing.values()}))
    return f"stage environment(s) {', '.join(sorted(missing))} not set up in {where}: run ./setup.sh"


def completion() -> None:
    """Hydra's shell completion (`--shell-completion install=bash`, then the queries bash sends),
    with the plug-ins' schema entries left out of the words it offers."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        hydra_main()
    words = printed.getvalue()
    if "query=" in " ".join(sys.argv):  # a query's answer: space-separated words
        words = " ".join(w for w in words.split() if not config.is_schema(w.rpartition("=")[2])) + "\n"
    sys.stdout.write(words)


@hydra.main(config_path=str(config.CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> job.JobOutcome:
    return job.run_job(cfg)


def main() -> None:
    """Entry point: pre-flight, then Hydra; exit 2 on bad input, 1 if any job failed, 130 if
    interrupted."""
    from hydra._internal.utils import get_args_parser

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints where it is
    try:
        config.register()
    except QsweepError as err:  # a third-party plug-in that does not load
        print(f"qsweep: {err}", file=sys.stderr)
        sys.exit(2)
    register_help_resolvers()
    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    if args.shell_completion:
        completion()
        return
    if not (args.help or args.hydra_help or args.cfg or args.info):
        logs.console()  # not for Hydra's --info, which sets up its own: a second handler doubles its lines
        try:
            if not checked_before_running(args.overrides, args.multirun):
                return
        except QsweepError as err:
            print(f"qsweep: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("qsweep: interrupted during the pre-flight; nothing was run", file=sys.stderr)
            sys.exit(130)
        skip_the_sweepers_second_composition()
    run_hydra()


def skip_the_sweepers_second_composition() -> None:
    """Hydra's BasicSweeper composes every job before its launcher composes it again, only to find
    one that cannot be composed (Sweeper.validate_batch_is_legal: "This repeat work the launcher
    will do"). The pre-flight has composed every job already, so the basic sweeper's check is left
    out: a fake 1-job sweep 0.92 -> 0.82 s, 2 jobs 1.55 -> 1.44 s (median of 5, 2026-12-07), most
    of it Hydra composing. Other sweepers keep theirs: a search proposes jobs no pre-flight saw."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    BasicSweeper.validate_batch_is_legal = _composed_at_preflight  # type: ignore[method-assign]


def _composed_at_preflight(self: object, batch: object) -> None:
    """BasicSweeper.validate_batch_is_legal once the pre-flight has composed the batch."""


def checked_before_running(overrides: list[str], multirun: bool) -> bool:
    """The pre-flight: every job planned, the machine and the store checked, what will be skipped
    said; False for a dry run (its report printed), QsweepError with one line on bad input."""
    plans = preflight(overrides, multirun)
    log.info("%d job(s) composed and checked", len(plans))
    for note in dict.fromkeys(note for plan in plans for note in plan.notes):
        log.info("  note: %s", note)
    if plans and plans[0].dry_run:
        for line in dryrun.report(plans):
            log.info(line)
        return False
    for reasons in (cannot_run_here(plans), missing_stage_envs(plans)):
        if reasons:
            raise QsweepError(reasons)
    for plan in {(str(p.tracking), str(p.paths)): p for p in plans}.values():  # last: opening makes it
        tracking.check_store(SimpleNamespace(tracking=plan.tracking, paths=plan.paths))
    for plan in plans:
        if plan.skip_reason:
            log.info("  will skip %s x %s: %s", plan.method_option, plan.engine_option, plan.skip_reason)
            continue
        for name, why in plan.skipped_benchmarks.items():
            log.info("  will skip benchmark %s in %s: %s", name, plan.name, why)
    return True


def _terminated(signum: int, frame: object = None) -> None:
    raise KeyboardInterrupt(f"signal {signum} ({signal.Signals(signum).name})")


def run_hydra() -> None:
    """Hydra's run or sweep; whatever ends it, every run this process opened is closed with the
    status and reason of what ended it before the process exits (`tracking.close_open_runs`):
    an interrupt (Ctrl-C, SIGTERM) KILLED, an error FAILED. Only SIGKILL and the like leave a run
    RUNNING, for the next sweep's abandoned-run check."""

    def close(status: str, reason: str) -> list[str]:
        for sig in procs.STOP_SIGNALS:  # a second Ctrl-C must not cut the closing short
            signal.signal(sig, signal.SIG_IGN)
        closed = tracking.close_open_runs(status, reason)
        if closed:
            log.warning("closed %d run(s) %s: %s", len(closed), status, reason)
        return closed

    signal.signal(signal.SIGTERM, _terminated)  # as Ctrl-C: jobs stop their servers, runs are closed
    try:
        hydra_main()
    except SweepFailed as failed:
        close("FAILED", f"the sweep ended with failed jobs: {failed}")
        print(f"qsweep: {failed}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        if not close("KILLED", f"interrupted ({err or 'SIGINT'})") and tracking.closed_statuses():
            # every run was closed before the interrupt landed (the last perhaps in the store but
            # not yet forgotten here: close_open_runs found it closed): the recorded outcome stands
            recorded = tracking.closed_statuses()
            print("qsweep: interrupted after every run was recorded", file=sys.stderr)
            sys.exit(130 if "KILLED" in recorded else 1 if "FAILED" in recorded else 0)
        print("qsweep: interrupted; servers stopped, runs marked KILLED", file=sys.stderr)
        sys.exit(130)
    except SystemExit as done:  # Hydra printed the error that stopped it, then exited
        close("FAILED", f"the qsweep process stopped on an error (exit {done.code}); its output says which")
        raise
    except BaseException as err:
        close("FAILED", f"the qsweep process stopped on an error: {type(err).__name__}: {err}")
        raise
    close("FAILED", "left open when the qsweep process ended (a qsweep bug)")
