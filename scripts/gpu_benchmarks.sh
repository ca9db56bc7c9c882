#!/usr/bin/env bash
# The GPU checks and figures of BENCHMARKS.md, in one script for a machine with one CUDA device:
#   bash scripts/gpu_benchmarks.sh [OUTPUT_DIR]      (default output/bench_gpu)
# 1. the fused engine's Triton kernels against cuDNN (outputs and gradients);
# 2. Sequencer2D-S, 224 px, bf16 autocast, batch 256, against timm's sequencer2d_s with the same weights:
#    training with each engine of ours against timm eager, inference with both models compiled;
# 3. training peak memory at batch 32 with and without gradient checkpointing.
# Every benchmark writes a JSON results file into OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/bench_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m pytest -q -p no:warnings tests/test_fused.py -k "cuda or interpreter"
BENCH=("$PY" -m sequencer.cli benchmark --model sequencer2d_s --device cuda --compare-timm --quiet)
for engine in native fused; do
  "${BENCH[@]}" --batch-size 256 --precision bf16 --mode train --rnn-engine "$engine" --warmup 5 --iters 20 \
      --matmul-peak --results-file "$OUT/s_train_bf16_b256_$engine.json"
done
"${BENCH[@]}" --batch-size 256 --precision bf16 --mode infer --compile --warmup 5 --iters 30 \
    --results-file "$OUT/s_infer_bf16_b256_compiled.json"
"${BENCH[@]}" --batch-size 256 --precision bf16 --mode infer --warmup 5 --iters 30 \
    --results-file "$OUT/s_infer_bf16_b256_eager.json"
for gc in "" "--grad-checkpointing"; do
  "$PY" -m sequencer.cli benchmark --model sequencer2d_s --device cuda --batch-size 32 --mode train --warmup 1 \
      --iters 5 $gc --results-file "$OUT/s_train_b32_mem${gc:+_gc}.json"
done
echo "results in $OUT"
