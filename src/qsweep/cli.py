"""`python -m qsweep`: Hydra's command line, preceded by a pre-flight that composes every job of the
sweep, so a typo in job 5 fails in a second with one line instead of after four finished jobs."""

from __future__ import annotations

import difflib
import faulthandler
import itertools
import re
import signal
import sys

import hydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from qsweep import compat, config, gates, job, models, procs
from qsweep.benchmarks import BENCHMARKS
from qsweep.engines import ENGINES
from qsweep.envs import REPO_ROOT
from qsweep.errors import QsweepError
from qsweep.methods import METHODS
from qsweep.textdata import source_file

# Named sweep files in sweeps/ become the config group `sweeps`: `python -m qsweep -m +sweeps=gguf-ppl`.
SEARCH_PATH = f"hydra.searchpath=[file://{REPO_ROOT}]"


def group_options(group: str) -> list[str]:
    """The YAML options of a config group in conf/ (and sweeps/ for the `sweeps` group)."""
    folder = REPO_ROOT / "sweeps" if group == "sweeps" else config.CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


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


def expand_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job the sweep will run (the BasicSweeper's cartesian product)."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    if not multirun:
        return [overrides]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    params = compose("config", overrides=fixed, return_hydra_config=True).hydra.sweeper.params or {}
    given = {o.get_key_element().lstrip("+~") for o in parsed}
    extra = [f"{k}={v}" for k, v in params.items() if k not in given]
    choices = []
    for o in parser.parse_overrides(overrides + extra):
        if o.is_sweep_override():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


def validate(cfg: DictConfig) -> None:
    """Side-effect-free checks of one composed job: values present, plug-ins known, files there."""
    try:
        OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise QsweepError(f"{err.full_key} has no value: set {err.full_key}=...") from None
    method = METHODS.get(cfg.method.kind)
    ENGINES.get(cfg.engine.kind)
    if hasattr(method, "check"):
        method.check(OmegaConf.to_object(cfg.method))
    models.check(OmegaConf.to_object(cfg.model))
    gates.limits(OmegaConf.to_object(cfg.gates))
    for name, node in cfg.benchmark.items():
        if node is not None:
            benchmark = BENCHMARKS.get(name)
            if hasattr(benchmark, "check"):
                benchmark.check(OmegaConf.to_object(node))
            if "text" in node:
                source_file(OmegaConf.to_object(node.text))


def preflight(overrides: list[str], multirun: bool) -> tuple[int, list[str]]:
    """Compose and validate every job; return how many there are and why some will be skipped."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3", job_name="qsweep"):
        try:
            jobs = expand_jobs(overrides, multirun)
        except (OmegaConfBaseException, hydra.errors.HydraException) as err:
            raise QsweepError(_one_line(err)) from None
        skipped = []
        for job_overrides in jobs:
            try:
                cfg = compose("config", overrides=job_overrides)
                validate(cfg)
                reason = compat.skip_reason(cfg)
                if reason:
                    skipped.append(f"{cfg.method.name} x {cfg.engine.name}: {reason}")
            except (OmegaConfBaseException, hydra.errors.HydraException) as err:
                raise QsweepError(_one_line(err)) from None
    return len(jobs), skipped


@hydra.main(config_path=str(config.CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> str:
    return job.run_job(cfg)


def main() -> None:
    """Entry point: pre-flight, then Hydra; exit 2 on bad input, 1 if any job failed."""
    from hydra._internal.utils import get_args_parser

    config.register()
    # Ctrl-C and SIGTERM both unwind through `finally` blocks, which stop servers and mark runs KILLED.
    signal.signal(signal.SIGTERM, procs.request_stop)
    signal.signal(signal.SIGINT, procs.request_stop)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints where it is
    sys.argv.append(SEARCH_PATH)
    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    informational = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    if not informational:
        try:
            count, skipped = preflight(args.overrides, args.multirun)
        except QsweepError as err:
            print(f"qsweep: {err}", file=sys.stderr)
            sys.exit(2)
        print(f"[qsweep] {count} job(s) composed and checked", flush=True)
        for line in skipped:
            print(f"[qsweep]   will skip {line}", flush=True)
    try:
        hydra_main()
    except KeyboardInterrupt:
        print("qsweep: interrupted; servers stopped, runs marked KILLED", file=sys.stderr)
        sys.exit(130)
    if job.FAILED_JOBS:
        print(f"qsweep: {len(job.FAILED_JOBS)} job(s) failed: {', '.join(job.FAILED_JOBS)}", file=sys.stderr)
        sys.exit(1)
