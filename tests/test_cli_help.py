"""`--help`, `--info` and shell completion through the real CLI, in a copy of the checkout whose tree
holds what a set-up leaves (deep environment folders) and a user's own folders beside conf/: Hydra's
search path must see conf/ (with sweeps/ as the group `sweeps`) and nothing else of the tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env

GROUPS = ["model", "method", "engine", "benchmark", "sweeps", "hydra/launcher", "hydra/sweeper"]


def deep_tree(root: Path, depth: int, width: int) -> None:
    """Folders `depth` levels deep, `width` per level, as a set-up's .venv/ and .qsweep/envs/ hold."""
    if depth == 0:
        return
    for i in range(width):
        child = root / f"d{i}"
        child.mkdir(parents=True, exist_ok=True)
        deep_tree(child, depth - 1, width)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The repository's files (git's view: tracked and new), a deep `.venv/` and `.qsweep/envs/`,
    and a user's folders holding YAML files beside conf/."""
    copy = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source, target = REPO / name, copy / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    for folder in (".venv/lib/python3.11/site-packages", ".qsweep/envs/vllm/lib"):
        deep_tree(copy / folder, depth=6, width=3)
    for folder in ("my-experiments/old", "notes"):
        (copy / folder).mkdir(parents=True)
        (copy / folder / "run.yaml").write_text("method: none\n")
    return copy


def qsweep(checkout: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m qsweep ARGS` running the copy's own code."""
    environ = {**cli_env(), **(env or {}), "PYTHONPATH": str(checkout / "src")}
    return subprocess.run(
        [sys.executable, "-m", "qsweep", *args],
        cwd=checkout, env=environ, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def listed_groups(help_text: str) -> dict[str, list[str]]:
    """`group: a, b, c` lines of the help (wrapped lines joined) -> options."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in help_text.splitlines():
        found = re.match(r"^  ([\w/]+):\s+(.*)$", line)
        if found:
            current = found.group(1)
            groups[current] = [o.strip() for o in found.group(2).split(",") if o.strip()]
        elif current and line.startswith(" " * 10) and line.strip():
            groups[current] += [o.strip() for o in line.split(",") if o.strip()]
        else:
            current = None
    return groups


def test_help_lists_the_groups_a_user_picks_from_and_nothing_else_of_the_tree(checkout):
    done = qsweep(checkout, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    assert text.startswith("qsweep: decide how to quantize and serve an LLM")
    assert "python -m qsweep -m method=gptq,awq engine=vllm,llamacpp" in text
    assert f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}" in text or "mlflow.db" in text
    groups = listed_groups(text)
    assert list(groups) == GROUPS
    assert {"gptq", "awq", "gguf-q4_k_m", "none"} <= set(groups["method"])
    assert groups["engine"] == ["llamacpp", "vllm"]
    assert {"gguf-ppl", "cpu-quick"} <= set(groups["sweeps"])
    assert {"basic", "joblib", "submitit_slurm", "slurm"} <= set(groups["hydra/launcher"])
    assert "_schema" not in text and "powered by Hydra" not in text
    for foreign in ("my-experiments", "notes", "conf", ".venv", ".qsweep", "d0"):
        assert foreign not in groups and f"{foreign}/" not in text, foreign


def test_hydra_help_and_every_info_answer_and_print_each_line_once(checkout):
    for args in (["--hydra-help"], ["--info"], *(["--info", kind] for kind in
                 ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath"))):  # fmt: skip
        done = qsweep(checkout, *args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert "[hydra._internal.hydra]" not in done.stdout, args  # once, not again through qsweep's logger
    search = qsweep(checkout, "--info", "searchpath").stdout
    rows = [line for line in search.splitlines() if line.startswith("|")]
    assert len(rows) == len(set(rows)) and search.count("Config search path") == 1, search
    paths = [row.split("|")[2].strip() for row in rows[1:]]
    assert f"file://{checkout / 'conf'}" in paths
    assert not any(p == f"file://{checkout}" for p in paths), paths  # not the whole tree


def test_shell_completion_offers_options_without_schemas(checkout):
    script = qsweep(checkout, "--shell-completion", "install=bash")
    assert script.returncode == 0 and "hydra_bash_completion" in script.stdout
    env = {"COMP_LINE": "qsweep method=", "COMP_POINT": str(len("qsweep method="))}
    words = qsweep(checkout, "--shell-completion", "query=bash", env=env).stdout.split()
    assert {"method=gptq", "method=gguf-q4_k_m", "method=none"} <= set(words)
    assert not [w for w in words if w.endswith("_schema")], words
    env = {"COMP_LINE": "qsweep +sweeps=", "COMP_POINT": str(len("qsweep +sweeps="))}
    assert "+sweeps=gguf-ppl" in qsweep(checkout, "-sc", "query=bash", env=env).stdout.split()


def test_qsweep_command_is_the_module_entry_point():
    """The `qsweep` console script (shell completion needs a command of its own) runs cli.main."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "qsweep"]
    assert script.value == "qsweep.cli:main"
    assert os.access(Path(sys.executable).parent / "qsweep", os.X_OK)
