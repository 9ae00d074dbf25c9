#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run of under 10 minutes (README, "Testing"):
#   1. exactness on the device, weights resident (a plain ComfyUI run with --highvram does this);
#   2. exactness with ComfyUI's dynamic VRAM switched on (0.33 and newer; weights streamed by comfy-aimdo);
#   3. the cost benchmark at SD1.5 size, 512x512, side by side with CFG.
# Without a GPU it runs what a CPU can: the resident checks on the CPU (dynamic VRAM is then reported as skipped).
#
#   COMFYUI_PATH=/path/to/ComfyUI benchmarks/gpu_check.sh [python]
#
# The python must import torch (with CUDA, for the GPU part) and ComfyUI's requirements. Output goes to stdout
# and, where $OUT is set, to $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout}"
LOG="${OUT:-/tmp}/gpu_check.log"
export PYTHONUNBUFFERED=1
status=0

{
  "$PY" - <<'EOF'
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__,
      "cuda device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
  GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')

  echo "== 1. exactness, weights resident"
  timeout "$([ "$GPU" = "1" ] && echo 180 || echo 900)" "$PY" -m pytest -q -p no:cacheprovider benchmarks/gpu -rs || status=1

  if [ "$GPU" = "1" ]; then
    echo "== 2. exactness, dynamic VRAM"
    PG_DYNAMIC_VRAM=1 timeout 180 "$PY" -m pytest -q -p no:cacheprovider benchmarks/gpu -rs || status=1
    echo "== 3. cost at SD1.5 size, 512x512, against CFG"
    timeout 200 "$PY" benchmarks/bench_guidance.py --full-size --steps 10 --repeats 3 || status=1
  else
    echo "== 2, 3: no CUDA device here; dynamic VRAM and the GPU cost benchmark need one"
  fi
  echo "gpu_check: exit $status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
