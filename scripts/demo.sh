#!/usr/bin/env bash
# The main job: set up, then download a file through a real PHT tunnel.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --system
exec .venv/bin/python scripts/demo.py
