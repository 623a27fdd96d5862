#!/usr/bin/env bash
# On the device tool's GPU machine, from the repository root, after device_prep.sh here:
#     run(command="bash tests/bench/device_gpu.sh", carry=[".devbench"], timeout_s=480)
# 1. environment (GPU, driver, torch, diffusers), 2. the CUDA tests (tests/model/test_cuda.py and the
# CUDA sampler tests), 3. bench_gpu.py at the issue's settings (512x512, 25 steps, batches 1/8/32,
# fp16; --reps 3). Logs and JSON go to $OUT (env.txt, tests.txt, gpu.txt, gpu.json). Arguments are
# passed to bench_gpu.py (later ones win), e.g. `--compile reduce-overhead` (minutes of compiling
# per batch size). SKIP_TESTS=1 skips step 2. A smoke test of the script itself on a CPU machine:
#     OUT=/tmp/dev SKIP_TESTS=1 bash tests/bench/device_gpu.sh --device cpu --dtype fp32 --size 64 \
#         --steps 1 --batches 1,2 --e2e-rows 4 --e2e-batch 2 --unet-reps 2
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/batchsd-device-out}
SITE=${SITE:-/tmp/batchsd-site}
mkdir -p "$OUT"
if [ ! -f .devbench/sd15_keys.json ]; then
    echo "no .devbench/: run tests/bench/device_prep.sh on the development machine and carry .devbench" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .devbench/*.whl || exit 2
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export BATCHSD_BENCH_KEYS="$PWD/.devbench/sd15_keys.json" BATCHSD_BENCH_CACHE=${BATCHSD_BENCH_CACHE:-/tmp/batchsd-bench}
{
    date -u
    git log -1 --format='code %h %s' 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import sys, torch, diffusers, transformers; print('python', sys.version.split()[0], '| torch', \
torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), '| diffusers', diffusers.__version__, \
diffusers.__file__, '| transformers', transformers.__version__)"
    nproc
} 2>&1 | tee "$OUT/env.txt"
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    python3 -m pytest -q -p no:cacheprovider -rs tests/model/test_cuda.py tests/model/test_samplers.py -k "cuda" 2>&1 \
        | tee "$OUT/tests.txt" | tail -25
    status=${PIPESTATUS[0]}
fi
python3 tests/bench/bench_gpu.py --reps 3 --json "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $status, bench exit $bench"
[ "$status" = 0 ] && [ "$bench" = 0 ]
