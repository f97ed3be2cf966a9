#!/usr/bin/env bash
# The CUDA checks of issue 18 in one run on a GPU machine: environment, the CUDA tests
# (tests/test_sim_cuda.py), then the speed benchmark on the GPU. Writes everything to $OUT.
#   OUT=/tmp/cuda-results bash benchmarks/run_cuda_checks.sh
# Wheels in .whl/ (e.g. brevitas and its pure-Python dependencies, for a machine without
# them) are installed into /tmp/site first. BENCH_ARGS adds benchmark options.
set -u
OUT=${OUT:-/tmp/cuda-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 2
fi
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    python3 -c "import torch, brevitas, numba, sys; print(sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.cuda.is_available(), 'brevitas', brevitas.__version__, \
'numba', numba.__version__)" 2>&1
} | tee "$OUT/cuda_env.txt"
python3 -m pytest -q -rs -p no:cacheprovider tests/test_sim_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
timeout "${BENCH_TIMEOUT:-280}" python3 benchmarks/accumulator_speed.py --device cuda --reps 3 \
    --threads 4 --out "$OUT/accumulator_speed_cuda.json" --overwrite ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/cuda_bench.log"
echo "benchmark exit ${PIPESTATUS[0]}" | tee -a "$OUT/cuda_bench.log"
