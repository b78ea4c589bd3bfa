#!/usr/bin/env bash
# One-call GPU check, for a machine with CUDA and PyTorch but without this package installed:
# the CUDA tests, MinNorm-OG's projection cost (performance targets (c) and (e)) in total, in
# operators and kernel launches, and part by part,
# and the full poisoning
# recipe with --device auto. Logs go to $OUT (default /tmp/gpu_check).
#     bash benchmarks/gpu_check.sh              (SKIP_POISON=1: without the poisoning run)
# Its parts' timeouts add up to more than one 10-minute call: PART=a runs the CUDA tests and the
# targets' timing, PART=b the rest (operators, parts, the MoE rows comparison, the poisoning run).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"
PART=${PART:-ab}
if [[ $PART == *a* ]]; then
echo "== CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -40
echo "== projection targets (c) and (e), and the Mixtral-shaped case (j): time and memory"
timeout 240 python3 benchmarks/perf_projection.py --device cuda --cases c,e,j --repeats 10 --skip-reference 2>&1 | tee "$OUT/perf_projection_cuda.txt"
fi
if [[ $PART != *b* ]]; then exit 0; fi
echo "== case (j): experts' rows batched by token count (the GPU's default) against one product per sample"
timeout 120 python3 benchmarks/perf_projection.py --device cuda --cases j --repeats 5 --skip-reference --ablate moe-rows 2>&1 | tee "$OUT/perf_projection_moe_rows_cuda.txt" | tail -8
for rows in batched loop; do
  timeout 60 python3 benchmarks/perf_projection_parts.py --device cuda --case j --ops --moe-rows $rows 2>&1 | tail -2
done | tee "$OUT/perf_projection_ops_j_cuda.txt"
echo "== operators and kernel launches per step (case c)"
timeout 60 python3 benchmarks/perf_projection_parts.py --device cuda --case c --ops 2>&1 | tee "$OUT/perf_projection_ops_cuda.txt"
echo "== projection, part by part (case c)"
timeout 100 python3 benchmarks/perf_projection_parts.py --device cuda --case c --repeats 5 --profile 2>&1 | tee "$OUT/perf_projection_parts_cuda.txt"
if [ -n "${SKIP_POISON:-}" ]; then exit 0; fi
echo "== full poisoning recipe, --device auto"
start=$(date +%s)
timeout 240 python3 -m overunlearn bench poison --recipe full --device auto --out "$OUT/poison" --cache /tmp/ou_cache \
    > "$OUT/poison_full_cuda.txt" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s"
tr '\r' '\n' < "$OUT/poison_full_cuda.txt" | grep -v '^\s*$' | tail -45
