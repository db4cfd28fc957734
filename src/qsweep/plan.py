"""The plan of one job, made from its composed config before anything runs: which plug-ins with
which settings, what is skipped and why, and how the engine is sized for the benchmarks' load.

Making a plan has no side effects. The pre-flight makes the plan of every job of a sweep, so bad
input, an unservable pair or a benchmark the engine cannot run is known before any job starts;
each job then runs its own plan.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from qsweep import compat, gates, models
from qsweep.benchmarks.base import BENCHMARKS, Benchmark
from qsweep.cache import ArtifactCache
from qsweep.context import JobContext
from qsweep.devices import GpuSlotsConfig
from qsweep.engines.base import ENGINES, Engine, check_common
from qsweep.engines.served import Load
from qsweep.envs import CpuWait, StageEnvSpec
from qsweep.errors import QsweepError
from qsweep.methods.base import METHODS, Method
from qsweep.settings import quantizes_at_serving

# Top-level config sections, converted to typed objects (a missing value fails here).
SECTIONS = (
    "model",
    "method",
    "engine",
    "benchmark",
    "calibration",
    "gates",
    "paths",
    "tracking",
    "rerun",
    "dry_run",
    "fail_fast",
    "parallel_timing",
    "gpus",
    "cpu_wait",
)
RERUN_STAGES = ("all", "quantize")  # besides benchmark names


@dataclass
class JobPlan:
    """Everything a job will do, decided from its config and its Hydra group choices."""

    name: str  # "smollm2-135m/gptq/vllm": the run's name, from the group choices
    choices: dict[str, str]  # Hydra's group choices, e.g. {"method": "gptq", ...}
    model_name: str  # the model option, or a model.path checkpoint's folder name
    method_option: str  # "gptq": the method's config option (its kind is `method.name`)
    engine_option: str
    model: models.ModelConfig
    method: Method
    method_cfg: Any
    engine: Engine
    engine_cfg: Any  # sized for the benchmarks' load (see `preset`)
    device: str
    preset: dict[str, Any]  # engine settings the load changed: logged as `served.*` params
    benchmarks: dict[str, tuple[Benchmark, Any]]  # the ones to run, in the order asked
    skipped_benchmarks: dict[str, str] = field(default_factory=dict)  # name -> why not on this engine
    gates: gates.GatesConfig = field(default_factory=gates.GatesConfig)
    fmt: str | None = None  # the artifact format the method makes for the engine
    skip_reason: str | None = None  # the pair cannot run: the job is recorded as skipped
    caveat: str | None = None  # the pair runs, but its figures need a note
    rerun: frozenset[str] = frozenset()  # stages to redo although their results exist
    shape: models.ModelShape = field(default_factory=models.ModelShape)  # what the pre-flight knew
    given: frozenset[str] = frozenset()  # the keys set on the command line
    notes: list[str] = field(default_factory=list)  # what was adapted to the model, said at pre-flight
    paths: Any = None  # where caches, environments and outputs are (PathsConfig)
    tracking: Any = None  # the MLflow store (TrackingConfig)
    dry_run: bool = False
    fail_fast: bool = False
    parallel_timing: bool = False  # jobs that time things may run side by side on a CPU
    gpus: int = 0  # GPUs the job holds while it runs (its engine's or method's need, or gpus.per_job)
    gpu_slots: GpuSlotsConfig = field(default_factory=GpuSlotsConfig)  # how jobs share the GPUs out
    cpu_wait: CpuWait = CpuWait.sleep  # how untimed work's threads wait
    remote: bool = False  # the launcher runs it on another machine (SLURM): set by the pre-flight

    def context(self, log_dir: Path, rebuild_before: float | None = None) -> JobContext:
        """A JobContext on this job's caches and stage environments."""
        return JobContext(
            artifact_cache=ArtifactCache(Path(self.paths.artifact_cache), rebuild_before=rebuild_before),
            model_cache=ArtifactCache(Path(self.paths.model_cache)),
            log_dir=log_dir,
            envs_dir=Path(self.paths.envs).expanduser().resolve(),
            cpu_wait=self.cpu_wait,
        )

    def unavailable(self, ctx: JobContext) -> list[str]:
        """Why this machine cannot run the job (no hub for the model, no GPU), if it cannot."""
        reasons = [models.unavailable(self.model, ctx), self.engine.unavailable(self.engine_cfg)]
        return [reason for reason in reasons if reason]

    def check_checkpoint(self, path: Path) -> list[str]:
        """The checks of the model's shape again, on a prepared checkpoint's config.json (a hub
        model's, known only after its download): raises QsweepError before anything is quantized."""
        return check_shape(self, models.checkpoint_shape(path))

    def forces(self, stage: str) -> bool:
        """Whether `stage` ("quantize" or a benchmark's name) is to be redone: named, or `all`, or
        (for a benchmark) its artifact is being rebuilt."""
        named = {stage, "all"} | ({"quantize"} if stage != "quantize" else set())
        return bool(self.rerun & named)

    @property
    def quantizes(self) -> bool:
        """The job quantizes something: its method, or its engine at serving time (a KV cache type)."""
        return not self.method.is_baseline or quantizes_at_serving(self.engine_cfg)

    @property
    def is_reference_baseline(self) -> bool:
        """The default baseline, whose results quantized jobs are compared with: nothing quantized,
        the baseline method at its defaults."""
        return not self.quantizes and self.method_cfg == type(self.method_cfg)()

    def stage_envs(self) -> list[StageEnvSpec]:
        """The stage environments this job uses, model preparation's included."""
        used = [models.prepare_env(self.model), self.method.env, self.engine.env]
        used += [benchmark.env for benchmark, _ in self.benchmarks.values()]
        return sorted({env.name: env for env in used if env is not None}.values(), key=lambda e: e.name)


def typed(cfg: DictConfig, section: str) -> Any:
    try:
        node = cfg[section]
        return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
    except MissingMandatoryValue as err:
        key = err.full_key or section  # already the full dotted key from the root
        raise QsweepError(f"{key} has no value: set {key}=...") from None


# The groups whose options are plug-in settings: an option's defaults list holds only its schema
# (tests/test_contracts.py checks), so their choices cannot change which benchmarks are selected.
PLUGIN_GROUPS = ("model", "method", "engine")


def benchmark_order(overrides: list[str]) -> list[str]:
    """The selected benchmarks in the order they were listed (`benchmark=[ppl,perf]` runs ppl
    first): the order of their options in Hydra's defaults list for these overrides. Needs Hydra
    initialized (the pre-flight, a job under any launcher); [] where it is not."""
    if not GlobalHydra.instance().is_initialized():
        return []
    loader = GlobalHydra.instance().config_loader()
    # Only choices of other groups can change the answer: a sweep's jobs share it (computing a
    # defaults list costs ~0.1 s per job).
    deciding = tuple(o for o in overrides if not _is_value_or_plugin_choice(o))
    return list(_benchmark_order(str(loader.get_search_path()), deciding))


def _is_value_or_plugin_choice(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return "." in key or key.split("@", 1)[0] in PLUGIN_GROUPS


@functools.lru_cache(maxsize=32)
def _benchmark_order(search_path: str, overrides: tuple[str, ...]) -> tuple[str, ...]:
    loader = GlobalHydra.instance().config_loader()
    defaults = loader.compute_defaults_list("config", list(overrides), RunMode.RUN)
    packages = (d.package or "" for d in defaults.defaults)
    return tuple(dict.fromkeys(p.removeprefix("benchmark.") for p in packages if p.startswith("benchmark.")))


def given_keys(overrides: list[str]) -> frozenset[str]:
    """The keys the command line sets (`method.group_size=64` -> `method.group_size`)."""
    return frozenset(o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o)


NAMED_BY_CHOICE = frozenset({"model", "method", "engine"})  # already in a job's name


def swept_keys(overrides: list[str], sweeper_params: Mapping[str, Any] | None) -> frozenset[str]:
    """The keys a sweep gives several values, from its command line and its sweeper's params,
    besides the model, method and engine options (which every job's name already says)."""
    keys = {o.get_key_element().lstrip("+~") for o in sweep_overrides(overrides, sweeper_params)
            if o.is_sweep_override()}  # fmt: skip
    return frozenset(k for k in keys if k not in NAMED_BY_CHOICE and not k.startswith("hydra"))


def sweep_overrides(overrides: list[str], sweeper_params: Mapping[str, Any] | None) -> list:
    """A sweep's overrides, parsed, with its sweeper's params where the command line does not set
    the key (as Hydra's BasicSweeper merges them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = {o.get_key_element().lstrip("+~") for o in parser.parse_overrides(overrides)}
    params = [f"{k}={v}" for k, v in (sweeper_params or {}).items() if k not in given]
    return parser.parse_overrides([*overrides, *params])


def sweep_label(job_overrides: list[str], swept: frozenset[str]) -> str:
    """'[engine.cache_type_k=q8_0]': this job's values of the swept keys, which tell apart jobs of
    one model, method and engine (a KV cache sweep, a group-size sweep); '' where none is swept."""
    values = [o.lstrip("+~") for o in job_overrides if o.split("=", 1)[0].lstrip("+~") in swept]
    return f"[{','.join(sorted(values))}]" if values else ""


def check_context(context: int | None, model_name: str, name: str, benchmark: Benchmark, cfg: Any) -> None:
    """A benchmark asks for no sequence longer than the model was trained for (where known)."""
    load = benchmark.load(cfg)
    longest = max(load.tokens_per_request, load.scored_tokens)
    if context and longest > context:
        raise QsweepError(
            f"benchmark {name} needs {longest}-token sequences, longer than model {model_name}'s context "
            f"of {context} tokens: lower benchmark.{name}'s n_ctx or token settings"
        )


def check_shape(plan: JobPlan, shape: models.ModelShape) -> list[str]:
    """Every context asked for, and the method's settings, against the model's shape; the notes
    on what the method adapts to it."""
    for name, (benchmark, cfg) in plan.benchmarks.items():
        check_context(shape.context, plan.model_name, name, benchmark, cfg)
    own = frozenset(key.removeprefix("method.") for key in plan.given if key.startswith("method."))
    return plan.method.check_model(plan.method_cfg, shape, own)


def after_what_they_read(runnable: dict[str, tuple[Benchmark, Any]]) -> dict[str, tuple[Benchmark, Any]]:
    """The benchmarks in their order, each moved after those it reads results from (`after`)."""
    ordered: dict[str, tuple[Benchmark, Any]] = {}

    def place(name: str, seen: tuple[str, ...] = ()) -> None:
        if name in ordered or name not in runnable or name in seen:
            return
        benchmark, cfg = runnable[name]
        for earlier in benchmark.after(cfg):
            place(earlier, (*seen, name))
        ordered[name] = runnable[name]

    for name in runnable:
        place(name)
    return ordered


def plan_job(
    cfg: DictConfig,
    choices: Mapping[str, Any],
    order: Sequence[str] = (),
    given: frozenset[str] = frozenset(),
    label: str = "",
) -> JobPlan:
    """Check one composed job and decide what it will do; raises QsweepError naming the fix.
    `order` lists benchmark names in the order to run them (`benchmark_order`); `given`, the keys
    set on the command line (`given_keys`); `label`, what tells it apart from the sweep's other jobs
    of the same model, method and engine (`sweep_label`), added to its name."""
    sections = {name: typed(cfg, name) for name in SECTIONS if name in cfg}
    model_cfg, method_cfg, engine_cfg = sections["model"], sections["method"], sections["engine"]
    method = METHODS.for_config(type(method_cfg))
    engine = ENGINES.for_config(type(engine_cfg))
    model_name = models.display_name(model_cfg, str(choices.get("model", "model")))
    method_option, engine_option = (
        str(choices.get("method", method.name)),
        str(choices.get("engine", engine.name)),
    )
    rerun = frozenset(sections["rerun"])
    unknown = sorted(rerun - set(RERUN_STAGES) - set(BENCHMARKS.names()))
    if unknown:
        known = ", ".join([*RERUN_STAGES, *BENCHMARKS.names()])
        raise QsweepError(f"rerun={unknown}: nothing by that name to redo; choose from {known}")
    models.check(model_cfg, model_name)
    method.check(method_cfg)
    check_common(engine_cfg)
    engine.check(engine_cfg)
    gates.limits(sections["gates"])
    device = engine.device(engine_cfg)

    container = sections["benchmark"]
    selected = [f.name for f in dataclasses.fields(container) if getattr(container, f.name) is not None]
    order = list(order)
    runnable: dict[str, tuple[Benchmark, Any]] = {}
    skipped: dict[str, str] = {}
    notes: list[str] = []  # what pre-flight left out of a benchmark on this engine
    capabilities = engine.capabilities()
    shape = models.shape(model_cfg)
    for name in sorted(selected, key=lambda n: (order.index(n) if n in order else len(order), n)):
        benchmark, bench_cfg = BENCHMARKS.get(name), getattr(container, name)
        check_context(shape.context, model_name, name, benchmark, bench_cfg)  # the likelier cause first
        benchmark.check(bench_cfg)
        unmet = benchmark.unmet(capabilities)
        why = f"it {unmet}" if unmet else None
        if not unmet:
            bench_cfg, left_out = benchmark.within(bench_cfg, capabilities)
            if bench_cfg is None:
                why = left_out
            elif left_out:
                notes.append(f"benchmark {name} on engine {engine_option}: {left_out}")
        if why:
            skipped[name] = f"engine {engine_option} cannot run it: {why}"
        else:
            runnable[name] = (benchmark, bench_cfg)

    runnable = after_what_they_read(runnable)
    for benchmark, bench_cfg in runnable.values():
        benchmark.check_selection(bench_cfg, {name: c for name, (_, c) in runnable.items()})
    load = functools.reduce(Load.combine, (b.load(c) for b, c in runnable.values()), Load())
    fitted = engine.fit(engine_cfg, load)
    before, after = dataclasses.asdict(engine_cfg), dataclasses.asdict(fitted)
    slots = sections.get("gpus") or GpuSlotsConfig()
    if slots.per_job is not None and slots.per_job < 0:
        raise QsweepError(f"gpus.per_job={slots.per_job} must be 0 or more")
    plan = JobPlan(
        name=f"{model_name}/{method_option}/{engine_option}{label}",
        choices={k: v for k, v in choices.items() if not k.startswith("hydra")},
        model_name=model_name,
        method_option=method_option,
        engine_option=engine_option,
        model=model_cfg,
        method=method,
        method_cfg=method_cfg,
        engine=engine,
        engine_cfg=fitted,
        device=device,
        preset={k: v for k, v in after.items() if before[k] != v},
        benchmarks=runnable,
        skipped_benchmarks=skipped,
        gates=sections["gates"],
        fmt=compat.serving_format(method, engine),
        skip_reason=compat.skip_reason(method_option, method, engine_option, engine, device),
        caveat=compat.caveat(method_option, engine, device),
        rerun=rerun,
        shape=shape,
        given=given,
        paths=sections["paths"],
        tracking=sections["tracking"],
        dry_run=sections["dry_run"],
        fail_fast=sections.get("fail_fast", False),
        parallel_timing=sections.get("parallel_timing", False),
        gpu_slots=slots,
        gpus=max(engine.gpus(fitted), method.gpus(method_cfg)) if slots.per_job is None else slots.per_job,
        cpu_wait=sections.get("cpu_wait", CpuWait.sleep),
    )
    plan.notes = notes + check_shape(plan, plan.shape)
    if plan.skip_reason is None:  # measured on this machine: needs the environments and caches
        needed = method.layer_kernels(method_cfg)
        if needed:
            ctx = plan.context(Path(tempfile.gettempdir()))
            plan.skip_reason = engine.kernel_missing(fitted, needed, ctx)
    return plan
