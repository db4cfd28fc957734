"""Stage environments and set-up (qsweep.envs): the compile beside the installs, requirements per
device, the llama.cpp build settings, the installed quantization schemes."""

from __future__ import annotations

import json
import re
import time

import pytest

from conftest import alive
from qsweep import envs, procs
from qsweep.errors import QsweepError


def test_set_up_compiles_alongside_the_installs_and_a_failure_there_stops_the_compile(tmp_path, monkeypatch):
    """The compiling environment builds in a thread while the others build here; when one of these
    fails (or Ctrl-C lands), the compile's tool is stopped at once, not waited for."""
    pid_file = tmp_path / "compile.pid"
    started = []

    def fake_build(spec, envs_dir):
        started.append(spec.name)
        if spec.compiles:  # minutes of compiling, in its own process group
            script = f"sleep 300 & echo $! > {pid_file}; wait"
            procs.run(["sh", "-c", script], log_path=tmp_path / "compile.log", timeout_s=600, what="compile")
        else:
            while not pid_file.exists():  # the compile is under way beside this install
                time.sleep(0.05)
            raise QsweepError("install quantize-cpu.txt failed (exit 1)")

    specs = {"slow": envs.StageEnvSpec("slow", compiles=True), "quick": envs.StageEnvSpec("quick")}
    monkeypatch.setattr(envs, "stage_envs", lambda: specs)
    monkeypatch.setattr(envs, "up_to_date", lambda spec, env: False)
    monkeypatch.setattr(envs, "build_env", fake_build)
    began = time.monotonic()
    with pytest.raises(QsweepError, match="install quantize-cpu.txt failed"):
        envs.setup(["slow", "quick"], tmp_path)
    assert time.monotonic() - began < 30 and sorted(started) == ["quick", "slow"]
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the compile's processes stop with the set-up"


def test_every_device_variant_of_a_stage_environment_has_its_requirements():
    """The CUDA variants cannot be built here; at least each names a file with real pins."""
    for spec in envs.stage_envs().values():
        if spec.variant is None:
            continue
        for device in ("cpu", "cuda"):
            text = (envs.SPEC_DIR / f"{spec.name}-{device}.txt").read_text()
            pins = re.findall(r"^[\w.-]+==[\w.+]+$", text, re.M)
            assert pins, (spec.name, device)
            assert any("+cpu" in p for p in pins) == (device == "cpu"), (spec.name, device, pins)


@pytest.mark.slow
def test_the_scheme_list_is_the_installed_compressed_tensors_presets():
    """The pre-flight's scheme list (methods/llmcompressor.py) against compressed-tensors itself, in
    the quantize stage environment the set-up built."""
    import subprocess

    from conftest import REAL_ENVS
    from qsweep.envs import QUANTIZE, StageEnv
    from qsweep.methods.llmcompressor import SCHEMES

    env = StageEnv(QUANTIZE.name, REAL_ENVS)
    code = (
        "import json; from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES as P; "
        "print(json.dumps(list(P)))"
    )
    done = subprocess.run(
        [env.python, "-c", code], capture_output=True, text=True, timeout=300, env=env.environ()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(SCHEMES) == sorted(json.loads(done.stdout.strip().splitlines()[-1]))


def test_front_end_build_settings_replace_what_an_earlier_set_up_appended(tmp_path):
    """The extracted sdist is kept between builds: its CMakeLists.txt gets one qsweep block, the
    current one, whatever an earlier set-up appended (here: the unity-only block of 2026-12-07)."""
    cmake = tmp_path / "vendor" / "llama.cpp" / "CMakeLists.txt"
    cmake.parent.mkdir(parents=True)
    upstream = "project(llama)\ninstall(FILES llama.pc DESTINATION lib)\n"
    earlier = "\n# qsweep: unity builds for the C++ front ends (qsweep/envs.py)\nforeach(x)\n"
    cmake.write_text(upstream + earlier)
    envs.front_end_build_settings(tmp_path)
    envs.front_end_build_settings(tmp_path)
    text = cmake.read_text()
    assert text.startswith(upstream) and text.count("# qsweep:") == 1 and "foreach(x)" not in text
    assert "target_compile_options(${target} PRIVATE -O1)" in text
    assert "foreach(target llama-common mtmd server-context llama-server-impl cpp-httplib)" in text
