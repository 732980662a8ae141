#!/usr/bin/env bash
# The prepared GPU check: one command on a GPU machine with no Ray and no network, under 8 minutes.
# B/16 bf16 ZeRO-2 step MFU (engine, compiled engine, plain autocast + fused AdamW), a NaN check, the
# device augmentation's cost, host-to-device rate; JSON to $OUT/gpu_check.json (else benchmarks/results).
# Python packages the machine lacks (DeepSpeed, pydantic, hjson) come as wheels in .whl/, made here by
# benchmarks/gpu/wheels.sh (under 64 MiB); on the device tool: carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/../.."
out_dir="${OUT:-benchmarks/results}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/vitpipe-site .whl/*.whl
  export PYTHONPATH="/tmp/vitpipe-site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import deepspeed" 2>/dev/null || {
  echo "check.sh: DeepSpeed is not importable; make .whl/ with benchmarks/gpu/wheels.sh and bring it" >&2
  exit 2
}
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv || true
timeout 480 python3 -m benchmarks.gpu.check --out "$out_dir/gpu_check.json" 2>&1 | tee "$out_dir/gpu_check.log"
