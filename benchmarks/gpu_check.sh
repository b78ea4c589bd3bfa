#!/usr/bin/env bash
# GPU checks for a machine with CUDA and PyTorch but without this package installed, in parts that each
# fit one 10-minute device call (their timeouts add up to at most ~400 s). Logs go to $OUT (default
# /tmp/gpu_check), at most 3 files per part (a device call returns at most 8).
#     PART=a bash benchmarks/gpu_check.sh   the CUDA tests; targets (c) and (e) and the Mixtral-shaped (j): time, memory
#     PART=b bash benchmarks/gpu_check.sh   operators and kernel launches (c, j); (c) part by part; (j)'s expert rows
#                                           batched against one product per sample
#     PART=c bash benchmarks/gpu_check.sh   the full poisoning recipe with --device auto
# With 15 minutes of device time in all (machine start-up included), run a first; b only with 8 minutes left.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"
PART=${PART:-a}
if [[ $PART == *a* ]]; then
echo "== CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -40
echo "== projection targets (c) and (e), and the Mixtral-shaped case (j): time and memory"
timeout 240 python3 benchmarks/perf_projection.py --device cuda --cases c,e,j --repeats 10 --skip-reference 2>&1 | tee "$OUT/perf_projection_cuda.txt"
fi
if [[ $PART == *b* ]]; then
echo "== case (j): experts' rows batched by token count (the GPU's default) against one product per sample"
timeout 120 python3 benchmarks/perf_projection.py --device cuda --cases j --repeats 5 --skip-reference --ablate moe-rows 2>&1 | tee "$OUT/perf_projection_moe_rows_cuda.txt"
{
  for rows in batched loop; do
    echo "-- case (j), --moe-rows $rows"
    timeout 60 python3 benchmarks/perf_projection_parts.py --device cuda --case j --ops --moe-rows $rows 2>&1
  done
  echo "-- case (c)"
  timeout 60 python3 benchmarks/perf_projection_parts.py --device cuda --case c --ops 2>&1
} | tee "$OUT/perf_projection_ops_cuda.txt"
echo "== projection, part by part (case c)"
timeout 100 python3 benchmarks/perf_projection_parts.py --device cuda --case c --repeats 5 --profile 2>&1 | tee "$OUT/perf_projection_parts_cuda.txt"
fi
if [[ $PART == *c* ]]; then
echo "== full poisoning recipe, --device auto"
start=$(date +%s)
timeout 240 python3 -m overunlearn bench poison --recipe full --device auto --out /tmp/gpu_check_poison --cache /tmp/ou_cache \
    > /tmp/gpu_check_poison.txt 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" | tee "$OUT/poison_full_cuda.txt"
tr '\r' '\n' < /tmp/gpu_check_poison.txt | grep -v '^\s*$' | tail -45 | tee -a "$OUT/poison_full_cuda.txt"
fi
