#!/usr/bin/env bash
# Install pacs-node with its test tools, make sure PostgreSQL runs, then lint,
# type-check and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
bash scripts/services.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest --strict-markers --durations=15 "$@"
