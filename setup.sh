#!/usr/bin/env bash
# Sets up qsweep on a fresh machine, idempotently (a second run takes seconds):
#   .venv/                  the controller: qsweep, Hydra, MLflow, pytest, and the data-only wheels
#   .qsweep/envs/<stage>/   one environment per stage (envs/<stage>.txt), built by qsweep.envs
# Set QSWEEP_HOME to keep environments and caches elsewhere; QSWEEP_PYTHON to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")"
export QSWEEP_SETUP_STARTED=${QSWEEP_SETUP_STARTED:-$(date +%s)}  # the closing summary's total
python=${QSWEEP_PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "qsweep needs Python 3.11+"'
if [ ! -x .venv/bin/python ]; then
    echo "[qsweep] creating the controller environment .venv"
    "$python" -m venv .venv
fi
# uv installs every environment (src/qsweep/installer.py: 5-8x faster than pip here, with pip's
# indexes); QSWEEP_INSTALLER=pip installs with pip instead.
mkdir -p "${QSWEEP_HOME:-.qsweep}"
if ! .venv/bin/python src/qsweep/installer.py bootstrap > "${QSWEEP_HOME:-.qsweep}/uv.setup.log" 2>&1; then
    tail -n 20 "${QSWEEP_HOME:-.qsweep}/uv.setup.log"
    echo "qsweep: installing uv failed; QSWEEP_INSTALLER=pip ./setup.sh installs with pip" >&2; exit 1
fi
want=$(cat pyproject.toml envs/data.txt | sha256sum | cut -c1-16)
if [ "$(cat .venv/.qsweep-stamp 2>/dev/null)" != "$want" ]; then
    echo "[qsweep] installing the controller (hydra-core, mlflow, ...) into .venv"
    log="${QSWEEP_HOME:-.qsweep}/controller.setup.log"
    install=(.venv/bin/python src/qsweep/installer.py install)
    if ! { "${install[@]}" -e '.[dev]' && "${install[@]}" --no-deps -r envs/data.txt; } > "$log" 2>&1; then
        tail -n 20 "$log"; echo "qsweep: installing the controller failed; full log: $log" >&2; exit 1
    fi
    echo "$want" > .venv/.qsweep-stamp
else
    echo "[qsweep] controller environment .venv is up to date"
fi
# The report's browser test renders its HTML page in Debian's Chromium: installed where this runs
# as root with apt-get (CI, these machines); elsewhere the test names the command to run.
if ! command -v chromium > /dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then
    echo "[qsweep] installing Chromium (Debian's package) for the report's browser test"
    log="${QSWEEP_HOME:-.qsweep}/chromium.setup.log"
    mkdir -p "${QSWEEP_HOME:-.qsweep}"
    if ! { apt-get install -y --no-install-recommends chromium ||
           { apt-get update && apt-get install -y --no-install-recommends chromium; }; } > "$log" 2>&1; then
        echo "qsweep: could not install chromium (log: $log); only the report's browser test needs it" >&2
    fi
fi
exec .venv/bin/python -m qsweep.envs setup "$@"
