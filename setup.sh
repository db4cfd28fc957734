#!/usr/bin/env bash
# Sets up qsweep on a fresh machine, idempotently (a second run takes seconds):
#   .venv/                  the controller: qsweep, Hydra, MLflow, pytest, and the data-only wheels
#   .qsweep/envs/<stage>/   one environment per stage (envs/<stage>.txt), built by qsweep.envs
# Set QSWEEP_HOME to keep environments and caches elsewhere; QSWEEP_PYTHON to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")"
python=${QSWEEP_PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "qsweep needs Python 3.11+"'
if [ ! -x .venv/bin/python ]; then
    echo "[qsweep] creating the controller environment .venv"
    "$python" -m venv .venv
fi
want=$(cat pyproject.toml envs/data.txt | sha256sum | cut -c1-16)
if [ "$(cat .venv/.qsweep-stamp 2>/dev/null)" != "$want" ]; then
    echo "[qsweep] installing the controller (hydra-core, mlflow, ...) into .venv"
    mkdir -p "${QSWEEP_HOME:-.qsweep}"
    log="${QSWEEP_HOME:-.qsweep}/controller.setup.log"
    if ! { .venv/bin/pip install --disable-pip-version-check -e '.[dev]' &&
           .venv/bin/pip install --disable-pip-version-check --no-deps -r envs/data.txt; } > "$log" 2>&1; then
        tail -n 20 "$log"; echo "qsweep: installing the controller failed; full log: $log" >&2; exit 1
    fi
    echo "$want" > .venv/.qsweep-stamp
else
    echo "[qsweep] controller environment .venv is up to date"
fi
exec .venv/bin/python -m qsweep.envs setup "$@"
