#!/usr/bin/env bash
# Issue 12's GPU checks in one run of about 5 minutes on the GPU machine that the `device`
# tool lends (H100/H200, its own torch and Triton, no downloads):
#     run(command="bash cluster/gpu_check.sh", timeout_s=330)
# 1. every kernel test and the CUDA-graph tests, compiled for the GPU (bf16 included);
# 2. prefill kernel (autotuned) vs SDPA flash at 4k, 8k and 16k tokens;
# 3. the engine on a random Llama-3.2-1B-shaped model (bf16, 512-token prompts -> 128 tokens)
#    at batch 1, 32 and 128 with CUDA graphs, each beside transformers with a static cache
#    and torch.compile on the same GPU: decode step wall time, GPU busy time, bandwidth.
# Results go to $OUT (the device tool brings that folder back), else ./gpu-check.
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$SECONDS
stamp() { echo "== $1 (t=$((SECONDS - T0)) s)"; }

stamp "install"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

stamp "kernel and CUDA-graph tests on the GPU"
timeout 90 python3 -m pytest -q -n 8 -p no:cacheprovider tests/kernels \
    tests/engine/test_cuda_graphs.py 2>&1 | tail -4

stamp "prefill kernel vs SDPA flash"
timeout 50 python3 -m pdserve.kernels.bench --prefill-lengths 4096 8192 16384 --no-decode \
    --json "$OUT/kernels.json"

stamp "random 1B-shaped model"
python3 -c "
from pathlib import Path
import torch
from pdserve.cluster.model_shapes import build_random_model
build_random_model('llama-1b', Path('/tmp/llama-1b'), torch.bfloat16, 'cuda')
"

for batch in 1 32 128; do
    stamp "engine at batch $batch (CUDA graphs) beside compiled transformers"
    timeout 65 python3 -m pdserve.cluster.cli bench-engine --model /tmp/llama-1b \
        --device cuda --dtype bfloat16 --batch "$batch" --prompt-len 512 --max-tokens 128 \
        --compare-hf --json 2>&1 | grep -v Warning | tee "$OUT/engine-b$batch.txt" | grep -v '^{'
done
stamp "done"
