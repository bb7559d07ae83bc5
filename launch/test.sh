#!/usr/bin/env bash
# Set up (if needed) and run the test suite; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/install.sh
exec .venv/bin/python -m pytest tests "$@"
