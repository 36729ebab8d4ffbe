#!/usr/bin/env bash
# TRIM Stage II on one GPU with random-init models of real shapes (issue 14, section 2).
#
# Needs: python with torch, transformers (and peft/accelerate, as coreselect imports them), and
# this checkout (coreselect is put on PYTHONPATH; or `pip install -e . --no-deps`). No internet,
# no weights, no coreselect data packages: models are built from inline configs (SmolLM2-135M,
# Llama-3.2-1B, Qwen2.5-1.5B shapes) and the pool is a synthetic length mix (bench/feed.py).
# Budget: < 8 minutes on one H100/H200 (each model section prints its own wall time).
#
#   bench/gpu.sh                 # the GPU run (bf16); writes bench-gpu.json
#   bench/gpu.sh --smoke         # CPU, fp32, shrunken shapes: a quick check that it all runs
#   bench/gpu.sh --shapes smollm2-135m --records 4000   # any option of bench/gpu_bench.py
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
py="${PYTHON:-python}"
[ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="$root/.venv/bin/python"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 "$py" "$here/gpu_bench.py" --json "${GPU_BENCH_JSON:-bench-gpu.json}" "$@"
