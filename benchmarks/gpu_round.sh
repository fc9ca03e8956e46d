#!/usr/bin/env bash
# Everything a GPU loan should measure, in one command (a loan is short: one prepared run, then maybe
# one rerun). Run from the repository root on the GPU machine:
#
#     bash benchmarks/gpu_round.sh OUTDIR [GPU_BENCH_SECONDS] [GPU_CHECK_SECONDS] [CHECK_SECTIONS]
#
# 1. benchmarks/gpu.py: prefopt against TRL's DPOTrainer on a ~0.5B Qwen2-shaped model in bf16
#    (tokens/s, peak memory, MFU, and the memory plan against the device's peak);
# 2. benchmarks/gpu_check.py, parity and training: the fast paths (FlexAttention on CUDA) against the
#    plain computation in float32 and bf16, and DPO runs in each precision;
# 3. benchmarks/block_masks.py on CUDA: prefopt's block masks against torch's create_block_mask (~20 s).
#
# prefopt runs from this checkout (no install). Wheels in .whl/ (TRL and what it needs that the
# machine lacks) are installed into /tmp/site first; a section that fails does not stop the next.
set -u -o pipefail
out=${1:?usage: bash benchmarks/gpu_round.sh OUTDIR [GPU_BENCH_SECONDS] [GPU_CHECK_SECONDS]}
bench_s=${2:-260}
check_s=${3:-150}
sections=${4:-parity,training}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)"
    python3 -c "import trl, datasets; print('trl', trl.__version__, '| datasets', datasets.__version__)" \
        || echo "trl not importable: gpu.py runs prefopt alone"
} 2>&1 | tee "$out/device.txt"
status=0
timeout $((bench_s + 30)) python3 benchmarks/gpu.py --out "$out/gpu.json" --budget "$bench_s" \
    --workdir /tmp/prefopt-gpu-bench 2>&1 | tee "$out/gpu.log" || status=1
timeout $((check_s + 30)) python3 benchmarks/gpu_check.py --out "$out/gpu_check.json" --sections "$sections" \
    --budget "$check_s" --steps 12 --workdir /tmp/prefopt-gpu-check --keep 2>&1 | tee "$out/gpu_check.log" || status=1
timeout 120 python3 benchmarks/block_masks.py --device cuda --rows 16 --length 3500 --repeat 2 2>&1 \
    | tee "$out/block_masks.log" || status=1
tar -czf "$out/logs.tgz" -C /tmp prefopt-gpu-check/logs $(cd /tmp && ls prefopt-gpu-bench/*.json 2>/dev/null) \
    2>/dev/null || true
exit $status
