"""qsweep.installer: uv gets what pip is configured with; pip where uv is not wanted or not there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qsweep import installer

PIP_CONFIG_LIST = """\
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
global.index-url='https://mirror.example/simple'
:env:.index-url='https://other.example/simple'
:env:.default-timeout='180'
install.trusted-host='mirror.example'
"""


def test_pip_settings_become_uv_options_with_pip_precedence():
    options, env = installer.pip_settings(PIP_CONFIG_LIST)
    pairs = list(zip(options[::2], options[1::2], strict=True))
    assert ("--index-url", "https://other.example/simple") in pairs  # PIP_INDEX_URL beats the file
    assert ("--index-url", "https://mirror.example/simple") not in pairs
    assert [v for k, v in pairs if k == "--extra-index-url"] == [
        "file:///opt/pypi/simple",
        "file:///opt/pypi-more/simple",
    ]
    assert ("--find-links", "/opt/wheels") in pairs and (
        "--constraint",
        "/etc/xdg/pip/constraints.txt",
    ) in pairs
    assert ("--allow-insecure-host", "mirror.example") in pairs
    assert not any("timeout" in option for option in options)  # pip-only settings are left alone
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}


def test_pip_where_asked_for_and_where_uv_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(installer.INSTALLER_VAR, "pip")
    command, env = installer.install_command(Path("/env/bin/python"), "-r", "reqs.txt")
    assert command[:4] == ["/env/bin/python", "-m", "pip", "install"] and command[-2:] == ["-r", "reqs.txt"]
    assert env == {}
    monkeypatch.delenv(installer.INSTALLER_VAR)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # no uv beside it
    assert installer.install_command(Path("/env/bin/python"), "x")[0][1:3] == ["-m", "pip"]


def test_the_controllers_uv_is_the_pinned_one_and_installs_with_pips_indexes(tmp_path):
    """./setup.sh bootstrapped uv into the controller's .venv; a dry run resolves a pinned package
    through it, with the options read from this machine's pip configuration."""
    found = installer.uv()
    assert found is not None, "./setup.sh installs uv beside the controller's Python"
    version = subprocess.run([str(found), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.split()[1] == installer.UV_VERSION
    pinned = "omegaconf==2.3.1"
    command, env = installer.install_command(sys.executable, "--dry-run", "--reinstall", "--no-deps", pinned)
    assert command[0] == str(found) and "--index-strategy" in command
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**env, "PATH": "/usr/bin:/bin"}
    )
    assert done.returncode == 0, done.stderr
    assert f"+ {pinned}" in done.stderr and "Would install 1 package" in done.stderr, done.stderr
