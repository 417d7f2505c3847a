#!/usr/bin/env bash
# The whole test suite: setup, lint, type check, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --system
echo "== ruff"; .venv/bin/ruff check pht tests benchmarks
echo "== ruff format --check"; .venv/bin/ruff format --check pht tests benchmarks
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
