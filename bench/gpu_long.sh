#!/usr/bin/env bash
# Issue 19's long runs on a lent GPU, in one device call (written without a GPU; not yet run on one):
# bench/convergence.py and bench/diloco.py at full length, 3 seeds, `--device cuda`, many units at a time.
# Resumable across calls: the finished units come back
# in one archive, are committed under bench/state/*-h200/, and travel with the tree to the next call, which
# runs only the rest. On this 2-core machine the same tables take about a day; see BENCHMARKS.md.
#
# The device call (run here once `bash bench/gpu_wheels.sh` has filled .whl/; carry ".whl"):
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site;
#     bash bench/gpu_long.sh 420
# then here:  tar xzf <files_at>/gpu-long.tgz   (adds the units under bench/state/), and commit them.
#
# The argument: seconds after which no unit starts (default 420; the running ones finish, ~1-3 min each),
# so a 600-s call ends with every finished unit in the archive. Logs: gpu-long-*.log beside the archive.
# GPU units use bf16 autocast, so they are kept apart from the CPU's (their own state directories, "-cuda" keys).
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-420}
out=${OUT:-bench/out/gpu-long}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, numpy, msgpack; assert torch.cuda.is_available(), 'no CUDA device'"; then
    echo '{"bench": "gpu_long", "ran": false, "why": "torch with CUDA, numpy or msgpack missing (see above)"}'
    exit 1
fi
conv_state=bench/state/convergence-full-h200
dil_state=bench/state/diloco-full-h200
dil_variants=streaming_e3m0,streaming_e3m0_ef,streaming_e3m0_requant,streaming_int2_ef,streaming_topk_ef
dil_variants+=,streaming_e3m0_lr4e-4,streaming_e3m0_olr0.8,streaming_e3m0_H25,diloco
dil_variants+=,streaming_e3m0_lr4e-4_olr0.8,streaming_int2_ef_lr4e-4_olr0.8,streaming_e3m0_H25_lr4e-4_olr0.8
dil_variants+=,streaming_e3m0_H12_lr4e-4_olr0.8,streaming_int2_ef_H12_lr4e-4_olr0.8,streaming_int2_ef_H25_lr4e-4_olr0.8
dil_variants+=,streaming_e3m0_H12_avg,streaming_e3m0_H8_lr4e-4_olr0.8,streaming_e3m0_H12_lr4e-4_olr0.8_a0
dil_variants+=,data_parallel_lr4e-4,data_parallel_lr2e-3
dil_variants+=,streaming_fp32_H8_lr4e-4_olr0.8,streaming_e3m0_H8_lr6e-4_olr0.8,streaming_e3m0_H8_lr4e-4_olr0.5
dil_variants+=,streaming_e3m0_H8_lr4e-4_olr0.8_a0.75,streaming_e3m0_H8_lr4e-4_olr0.8_adam,streaming_e3m0_H8_lr4e-4_olr0.3
t0=$SECONDS
# The base tables first (convergence: dense, dense + table, k = 4..32; DiLoCo: the issue's variants), side by
# side, then the knobs with what time is left.
{
    "$PY" bench/convergence.py --device cuda --jobs 7 --seeds 3 --ks 4 8 16 32 --state $conv_state --no-plot \
        --deadline-s "$budget" > "$out/gpu-long-convergence.log" 2>&1
    left=$((budget - (SECONDS - t0)))
    if [ "$left" -gt 0 ]; then
        "$PY" bench/convergence.py --device cuda --jobs 7 --seeds 3 --ks 8 --knobs --state $conv_state \
            --no-plot --deadline-s "$left" > "$out/gpu-long-knobs.log" 2>&1
    fi
} &
"$PY" bench/diloco.py --device cuda --jobs 7 --seeds 3 --only $dil_variants --state $dil_state --no-plot \
    --deadline-s "$budget" > "$out/gpu-long-diloco.log" 2>&1
wait
tar czf "$out/gpu-long.tgz" --exclude=.partial $conv_state $dil_state 2>/dev/null  # a unit's checkpoints stay behind
units() { find "$1" -path '*/.partial' -prune -o -name '*.json' -print 2>/dev/null | wc -l; }
for log in "$out"/gpu-long-*.log; do echo "== $log"; tail -n 3 "$log" | cut -c1-600; done
echo "{\"bench\": \"gpu_long\", \"ran\": true, \"seconds\": $((SECONDS - t0)), \"convergence_units\": $(units $conv_state), \"diloco_units\": $(units $dil_state), \"archive\": \"$out/gpu-long.tgz\"}"
