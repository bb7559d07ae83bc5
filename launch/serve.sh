#!/usr/bin/env bash
# Set up (if needed) and start the server; arguments go to `python -m sglang_lenvm.launch_server`.
# With no --model-path it serves the embedded demo pair.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/install.sh
exec .venv/bin/python -m sglang_lenvm.launch_server "$@"
