"""How set-up installs Python packages: with uv (a pinned release that ./setup.sh puts in the
controller's .venv), pip where uv is not there or `QSWEEP_INSTALLER=pip` says so.

Why: on 2 cores pip spends most of a first set-up resolving and unpacking, and competes with the
llama.cpp compile for the CPU. Measured 2026-12-07 on 2 cores, cold caches, the same packages
installed either way: the controller 77 -> 10 s, evalscope's environment 81 -> 10 s, vLLM's about
100 -> 16 s. uv does not read pip's configuration, so what pip is configured with (indexes,
find-links, constraints, trusted hosts, a certificate: files and PIP_* variables, as `pip config
list` shows them) is passed to it, and like pip it takes the best version over all indexes
(`--index-strategy unsafe-best-match`). `--no-cache`: each environment owns its files (no links into
a shared cache that an edit in one environment would change everywhere, no second copy on disk).

Stdlib only: ./setup.sh runs this file before qsweep is installed (`bootstrap`, `install`)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

UV_VERSION = "0.13.10"
INSTALLER_VAR = "QSWEEP_INSTALLER"  # "pip" to install with pip everywhere
# pip's setting -> uv's option; the values of the multi-valued ones are separated by whitespace
PIP_TO_UV = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
PRECEDENCE = ("global", "install", ":env:")  # later wins, as in pip


def wanted() -> bool:
    return os.environ.get(INSTALLER_VAR, "uv") != "pip"


def beside_python() -> Path:
    """Where the controller's uv is: beside the running interpreter (not resolved: the venv's bin,
    not the base Python's)."""
    return Path(sys.executable).parent / "uv"


def uv() -> Path | None:
    """The controller's uv, or None: install with pip."""
    found = beside_python()
    return found if wanted() and found.is_file() else None


def pip_settings(listed: str) -> tuple[list[str], dict[str, str]]:
    """(uv's options, its environment) for the output of `pip config list`."""
    chosen: dict[str, tuple[int, str]] = {}
    for line in listed.splitlines():
        key, sep, raw = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or section not in PRECEDENCE:
            continue
        rank = PRECEDENCE.index(section)
        if name not in chosen or chosen[name][0] <= rank:
            chosen[name] = (rank, ast.literal_eval(raw))
    options = []
    for name, (_, value) in chosen.items():
        if name in PIP_TO_UV:
            for item in value.split():
                options += [PIP_TO_UV[name], item]
    env = {"SSL_CERT_FILE": chosen["cert"][1]} if "cert" in chosen else {}
    return options, env


def install_command(
    python: Path | str, *args: str, timeout_s: float = 60
) -> tuple[list[str], dict[str, str]]:
    """(command, extra environment) that installs `args` (pip install's arguments) into the
    environment whose interpreter is `python`."""
    found = uv()
    if found is None:
        return [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args], {}
    listed = subprocess.run(
        [str(python), "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=timeout_s
    )
    options, env = pip_settings(listed.stdout)
    command = [str(found), "pip", "install", "--python", str(python), "--no-cache"]
    return [*command, "--index-strategy", "unsafe-best-match", *options, *args], env


def bootstrap() -> None:
    """Install uv UV_VERSION beside this interpreter with pip, unless it is there already."""
    if not wanted():
        return
    found = beside_python()
    if found.is_file():
        version = subprocess.run([str(found), "--version"], capture_output=True, text=True, timeout=60)
        if version.stdout.split()[1:2] == [UV_VERSION]:
            return
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", f"uv=={UV_VERSION}"]
    subprocess.run(pip, check=True, timeout=900)


def main(argv: list[str]) -> int:
    """`bootstrap`, or `install ARGS...` into this interpreter's environment (./setup.sh)."""
    if argv[:1] == ["bootstrap"]:
        bootstrap()
        return 0
    if argv[:1] == ["install"]:
        command, env = install_command(sys.executable, *argv[1:])
        return subprocess.run(command, env={**os.environ, **env}, timeout=3600).returncode
    print("usage: installer.py bootstrap | install PIP-INSTALL-ARGS...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
