#!/usr/bin/env bash
# Lint, types and the whole test suite, offline (what CI runs after scripts/install.sh --test).
# ruff with the ASYNC rules; mypy, with the core (items, protocols, stages/, pipeline, run) held to --strict by
# pyproject's overrides; pytest listing every skipped test with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check atlaspatch_stream tests perf
.venv/bin/mypy atlaspatch_stream
.venv/bin/python -m pytest -q -rs
