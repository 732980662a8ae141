#!/usr/bin/env bash
# The prepared GPU check: one command on one GPU machine with no network and no Ray, in BUDGET_S seconds
# (default 300) installs included. ViT-B/16 and ViT-L/16 pretraining through vitpipe's own path (Parquet
# patch shards, the feed, a Ray Train worker, DeepSpeed ZeRO-2 bf16), compiled or not, with activation
# checkpointing or not; the matmul peak, host-to-device rate, augmentation cost and a NaN check beside
# (benchmarks/gpu/check.py says what each section measures). The JSON, rewritten after every section, and
# the log go to $OUT (else benchmarks/results): gpu_check.json, gpu_check.log.
#
# What the machine lacks (Ray, DeepSpeed, pydantic, ...) comes as wheels in .whl/, made here by
# benchmarks/gpu/wheels.sh; on the device tool: command `bash benchmarks/gpu/check.sh`, carry [".whl"].
#
#   benchmarks/gpu/check.sh --cpu     # the same check on CPUs at toy size (tests/test_gpu_check.py)
#   benchmarks/gpu/check.sh --configs b16-eager,l16-compiled   # only those configurations
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$SECONDS
python="${PYTHON:-python3}"
budget_s="${BUDGET_S:-300}"
out_dir="${OUT:-benchmarks/results}"
mkdir -p "$out_dir"
cpu=false
for arg in "$@"; do
  if [ "$arg" = "--cpu" ]; then cpu=true; fi
done
name=gpu_check
site=/tmp/vitpipe-site
if $cpu; then
  name=gpu_check_cpu
elif compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "check.sh: installed $(ls .whl | wc -l) wheels in $((SECONDS - started)) s"
fi
# The repository on the path of Ray's worker processes too (they inherit this environment).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" -c "import deepspeed, ray" || echo "check.sh: Ray or DeepSpeed does not import (above): was .whl/ made" \
  "by benchmarks/gpu/wheels.sh and carried? The sections that need neither run all the same" >&2
$cpu || nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true
# check.py stops starting runs at its deadline and stops a run still going then (checkpoint, return): 60 s
# before the budget ends, the time an L/16 ZeRO-2 checkpoint (~4 GB) takes to write and hand to Ray Train,
# counted from check.py's start (its imports, ~10 s, are inside the margin). The timeout is the backstop:
# SIGTERM (a second stop: the run's rows so far are kept, nan_check and summary still written), then
# SIGKILL 5 s later.
left=$((budget_s - (SECONDS - started)))
timeout -k 5 $((left - 5)) "$python" -m benchmarks.gpu.check --out "$out_dir/$name.json" \
  --deadline-s $((left - 70)) "$@" 2>&1 | tee "$out_dir/$name.log"
