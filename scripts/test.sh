#!/usr/bin/env bash
# The README's test command: install thinkless with its test extra, lint, and run the tests.
# torch is pinned to the CPU build that these machines carry; --no-build-isolation compiles the native
# extension against that torch instead of downloading another into a build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0" "setuptools>=70.1"
python -m pip install --quiet --no-build-isolation -e ".[test]"
python -m ruff check .
python -m ruff format --check .
python -m pytest tests "$@"
