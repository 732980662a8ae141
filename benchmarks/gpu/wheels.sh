#!/usr/bin/env bash
# Make .whl/: the wheels benchmarks/gpu/check.sh installs on a GPU machine without network (Python 3.12,
# x86-64): DeepSpeed built here without ops, and what it needs that the machine lacks. Under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=".venv/bin/python"
mkdir -p .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
deepspeed_version="$($python -c 'from importlib.metadata import version; print(version("deepspeed"))')"
DS_BUILD_OPS=0 $python -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$deepspeed_version"
$python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "pydantic==$($python -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic-core==$($python -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  annotated-types typing-inspection hjson
du -sh .whl
