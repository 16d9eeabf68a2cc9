#!/usr/bin/env bash
# The GPU check: one script for the device tool's bare GPU machine (Python 3.12,
# torch 2.11+cu130 and numpy 2.x preinstalled, no package registry). Budget: < 8 min.
#
# Here, first:   bash scripts/gpu_wheels.sh          (fills .whl/, ~36 MB)
# Then, there:   device run, carry [".whl"], command: bash scripts/gpu_check.sh
#
# It builds the worker's numpy<2 stack from the carried wheels (ahead of the
# image's site-packages, for the worker only: the image's scipy needs numpy 2,
# its jax fails to load beside numpy 1, and with typer present infinity wants
# uvicorn), then runs scripts/gpu_check.py in the image's numpy-2 Python:
# the worker on cuda with the Conan-shaped model, torch GPU work in the main
# process at the same time, the memory report, and the benchmark's GPU section.
# Results land in $OUT (gpu-check.md, gpu-check.json, benchmarks-cuda.md/png).
#
# Arguments go to gpu_check.py. A dry run without a GPU, in any Python 3.12 with
# torch and numpy 2 (how this script was checked before it ever met a GPU):
#   PY=/path/to/python3.12 OUT=/tmp/dry bash scripts/gpu_check.sh --device cpu \
#     --model conan --sentences 256 --bench-args "--repeat 1 --latency-n 10 ..."
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
PY=${PY:-$(command -v python3)}

for stack in worker main; do
  if [ ! -f ".whl/$stack-stack.tar.xz" ]; then
    echo "gpu_check: .whl/$stack-stack.tar.xz is missing: run scripts/gpu_wheels.sh here and carry .whl" >&2
    exit 2
  fi
  rm -rf "/tmp/bridge-$stack-stack" && mkdir -p "/tmp/bridge-$stack-stack"
  tar -C "/tmp/bridge-$stack-stack" -xJf ".whl/$stack-stack.tar.xz"
done

# The worker interpreter: the image's Python, our numpy-1 stack first.
cat > /tmp/bridge-worker-python <<WRAPPER
#!/bin/sh
export PYTHONPATH=/tmp/bridge-worker-stack:$REPO
export USE_TF=0 USE_FLAX=0 USE_JAX=0 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
exec $PY "\$@"
WRAPPER
chmod +x /tmp/bridge-worker-python
export BRIDGE_WORKER_PYTHON=/tmp/bridge-worker-python
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

echo "== worker stack =="
/tmp/bridge-worker-python -c "import numpy, torch, transformers, infinity_emb; print('worker: numpy', numpy.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'infinity-emb', infinity_emb.__version__, 'cuda', torch.cuda.is_available())"

echo "== check =="
(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
PYTHONPATH=/tmp/bridge-main-stack:$REPO timeout 450 "$PY" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-check.log"
