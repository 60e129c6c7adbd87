#!/usr/bin/env bash
# The README's second command: install the development dependencies into .venv and run every check:
# ruff, mypy --strict (ours and the example plugin's), hadolint, the whole pytest suite (deploy
# files, dashboard and alert rules included), the example plugin's own tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# --group needs pip >= 25.1 (installed just above); the dev group holds test servers (moto) and linters.
"$VENV/bin/python" -m pip install -q -e '.[all]' --group dev
"$VENV/bin/python" -m pip install -q -e docs/examples/collector-sink-jsonl
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check collector plugins tests
echo "== mypy --strict"
"$VENV/bin/mypy"
echo "== mypy --strict on the example plugin (as its author runs it, against the installed collector)"
MYPY="$(cd "$VENV" && pwd)/bin/mypy"
(cd docs/examples/collector-sink-jsonl && "$MYPY" --strict src tests)
echo "== hadolint"
"$VENV/bin/hadolint" Dockerfile
echo "== pytest"
"$VENV/bin/pytest" -q "$@"
echo "== example plugin tests"
"$VENV/bin/pytest" -q -p no:cacheprovider docs/examples/collector-sink-jsonl/tests
