#!/usr/bin/env bash
# The whole test suite: setup, lint, type check, tests (which include the
# packaging checks and `mkdocs build --strict`). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
echo "== ruff"; .venv/bin/ruff check pht tests benchmarks
echo "== ruff format --check"; .venv/bin/ruff format --check pht tests benchmarks
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
