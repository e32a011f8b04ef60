#!/usr/bin/env bash
# Figures 1, 2 and 6 of docs/benchmarks.md on one NVIDIA GPU, in under 8 minutes, as one table.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --dry-run    # same scripts, --quick, on the CPU, with
#                                             #   pyarrow, omegaconf, plotly, matplotlib,
#                                             #   scikit-learn and faiss made unimportable, and
#                                             #   3x the time limits (a shared CPU is slow)
#
# Needs only python with torch (CUDA), timm, numpy, and pandas and scipy (the trainer's online
# spike detector is analysis.StreamingSpikeDetector; and what they pull in: torchvision,
# pillow, tqdm; kornia for the device input pipeline, which falls back to the workers one
# with a warning without it): it installs nothing, reaches no network, and puts the repository
# on PYTHONPATH itself (no `pip install -e .` needed). Configs are built as trainer.config
# dataclasses, so omegaconf is not needed; faiss and scikit-learn are used when present and
# reported as "not installed" otherwise. Step batches are fixed random tensors and the
# pipeline part writes its own JPEGs: no dataset needed.
#
#   1  bench_overhead.py   ViT-S/16, batch 256, bf16: instrumented / plain step time, and each
#                          probe's own cost, interleaved arms (goal <= 1.01 for the default-on ones)
#   2  bench_knn.py        one queue-kNN evaluation (5,000 queries vs a 128,116-entry queue) and
#                          its share of training time at knn.every=20 (goal <= 2%); backends
#   6  bench_throughput.py step: ours (eager and torch.compile) / the official-style reference
#                          step (goal >= 1.5), the compile warm-up; pipeline: end to end / fixed
#                          batch for the device and the workers pipeline on 1,024 generated
#                          ImageNet-sized JPEGs (goal >= 0.9), each pipeline's images/s alone
#
# Environment: PYTHON (default python3), GPU_CHECK_LOGS (a folder for the logs; default a
# temporary one). Each part has its own time limit (100 + 80 + 200 + 100 s), so the whole check
# ends within 8 minutes even if a part hangs; a part that fails or times out shows as FAILED.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
LOGS="${GPU_CHECK_LOGS:-$(mktemp -d)}"
mkdir -p "$LOGS"

LIMIT_SCALE=1
if [ "${1:-}" = "--dry-run" ]; then
    LIMIT_SCALE=3
    BLOCK="$(mktemp -d)"
    for mod in pyarrow omegaconf plotly matplotlib sklearn faiss; do
        mkdir -p "$BLOCK/$mod"
        echo "raise ImportError('$mod is blocked by gpu_check.sh --dry-run')" > "$BLOCK/$mod/__init__.py"
    done
    export PYTHONPATH="$BLOCK:$PYTHONPATH"
    MODEL=(--device cpu --quick)
    OVERHEAD=()
    KNN=()
    THROUGHPUT=(--parts step)
    PIPELINE=(--parts pipeline --pipeline both --jpegs 48)
    echo "dry run: CPU, --quick, with $(ls "$BLOCK" | tr '\n' ' ')unimportable"
else
    MODEL=(--device cuda --model vit_small --img 224 --batch 256 --precision bf16)
    OVERHEAD=(--pairs 15 --block 3 --warmup 10)  # 7 arms: about 330 steps
    KNN=(--steps 10 --repeats 3)
    THROUGHPUT=(--parts step --compile both --rounds 6)
    PIPELINE=(--parts pipeline --pipeline both --jpegs 1024 --rounds 5 --set data.num_workers=6)
    if ! command -v nvidia-smi >/dev/null; then
        echo "gpu_check.sh: nvidia-smi not found; this check needs an NVIDIA GPU (--dry-run runs on the CPU)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import sys, torch, timm, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| timm', timm.__version__, '| numpy', numpy.__version__)" || exit 2
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); host: $(hostname); logs: $LOGS"

FAILED=0
part() {  # part NAME LIMIT_S SCRIPT ARGS...
    local name=$1 limit=$(($2 * LIMIT_SCALE))
    shift 2
    echo
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$PY" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ]; then
        FAILED=1
        echo "RESULT | $name | FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit')) | | NOT run" >> "$LOGS/$name.log"
    fi
}

START=$SECONDS
part overhead 100 benchmarks/bench_overhead.py "${MODEL[@]}" "${OVERHEAD[@]}"
part knn 80 benchmarks/bench_knn.py "${MODEL[@]}" "${KNN[@]}"
part throughput 200 benchmarks/bench_throughput.py "${MODEL[@]}" "${THROUGHPUT[@]}"
part pipeline 100 benchmarks/bench_throughput.py "${MODEL[@]}" "${PIPELINE[@]}"

echo
echo "## gpu_check.sh results ($((SECONDS - START)) s)"
echo
echo "| figure | measured | goal | status |"
echo "|---|---|---|---|"
cat "$LOGS/overhead.log" "$LOGS/knn.log" "$LOGS/throughput.log" "$LOGS/pipeline.log" | grep '^RESULT |' | sed -e 's/^RESULT //' -e 's/$/ |/'
exit $FAILED
