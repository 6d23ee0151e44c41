#!/usr/bin/env bash
# The whole test suite, after installing the test dependencies into the active environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python -m pytest -q
