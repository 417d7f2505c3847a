#!/usr/bin/env bash
# The main job: download a file through a real PHT tunnel and check it.
# Sets up only what the demo uses: .venv with pht and its runtime
# dependencies, and curl (scripts/setup.sh demo says what it installs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
exec .venv/bin/python scripts/demo.py
