# Sourced by the other scripts: create .venv (once) and install ar2dlm with what it needs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.ar2dlm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  # The tested torch release first: on a CPU-only machine its CPU build may already be on disk.
  python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
