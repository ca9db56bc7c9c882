#!/usr/bin/env bash
# The GPU checks and figures of BENCHMARKS.md, for a machine with one CUDA device:
#   bash scripts/gpu_benchmarks.sh [train|infer|diag|all] [OUTPUT_DIR]      (default: all, output/bench_gpu)
# train: Sequencer2D-S, 224 px, bf16 autocast, batch 256, training against timm's sequencer2d_s with the same
#        weights, timm eager: ours eager with each engine, then ours under torch.compile (default mode, and
#        'reduce-overhead': CUDA graphs); training peak memory at batch 32 with and without gradient
#        checkpointing.
# infer: inference, batch 256, bf16: both models eager, and both under torch.compile.
# diag:  the CUDA tests (Triton kernels against float64, fp32 and bf16 autocast, torch.compile); each engine's
#        error under bf16 autocast (scripts/check_gpu_autocast_accuracy.py); a profile of one training step of
#        each model (scripts/profile_step.py); one BiLSTM2D and its kernels alone
#        (scripts/microbench_gpu_recurrence.py, every launch configuration).
# The parts run in this order (train, infer, diag): each needs about 5-10 minutes, most of it compilation.
# Every step writes its log and results into OUTPUT_DIR; a step that fails or overruns does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
OUT=${2:-output/bench_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T))"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name rc=$rc"
}
BENCH=("$PY" -m sequencer.cli benchmark --model sequencer2d_s --device cuda --compare-timm --quiet)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
if [[ $PART == train || $PART == all ]]; then
  TRAIN=("${BENCH[@]}" --batch-size 256 --precision bf16 --mode train --matmul-peak)
  step train_fused 120 "${TRAIN[@]}" --rnn-engine fused --warmup 5 --iters 20 \
      --results-file "$OUT/s_train_bf16_b256_fused.json"
  step train_fused_compiled 420 "${TRAIN[@]}" --rnn-engine fused --compile --timm-eager --warmup 5 --iters 20 \
      --results-file "$OUT/s_train_bf16_b256_fused_compiled.json"
  step train_native 120 "${TRAIN[@]}" --rnn-engine native --warmup 5 --iters 20 \
      --results-file "$OUT/s_train_bf16_b256_native.json"
  step train_fused_cudagraphs 420 "${TRAIN[@]}" --rnn-engine fused --compile-mode reduce-overhead --timm-eager \
      --warmup 5 --iters 20 --results-file "$OUT/s_train_bf16_b256_fused_cudagraphs.json"
  for gc in "" "--grad-checkpointing"; do
    step "mem_b32${gc:+_gc}" 90 "$PY" -m sequencer.cli benchmark --model sequencer2d_s --device cuda --batch-size 32 \
        --precision bf16 --mode train --rnn-engine fused --warmup 2 --iters 3 $gc \
        --results-file "$OUT/s_train_b32_mem${gc:+_gc}.json"
  done
fi
if [[ $PART == infer || $PART == all ]]; then
  step infer_eager 120 "${BENCH[@]}" --batch-size 256 --precision bf16 --mode infer --rnn-engine fused --warmup 5 \
      --iters 30 --results-file "$OUT/s_infer_bf16_b256_eager.json"
  step infer_compiled 400 "${BENCH[@]}" --batch-size 256 --precision bf16 --mode infer --rnn-engine fused --compile \
      --warmup 5 --iters 30 --results-file "$OUT/s_infer_bf16_b256_compiled.json"
fi
if [[ $PART == diag || $PART == all ]]; then
  step tests 150 "$PY" -m pytest -q -p no:warnings tests/test_fused.py -k cuda
  step accuracy 60 "$PY" scripts/check_gpu_autocast_accuracy.py
  step profile_fused 90 "$PY" scripts/profile_step.py --rnn-engine fused --top 30
  step profile_timm 90 "$PY" scripts/profile_step.py --timm --top 15
  step recurrence 150 "$PY" scripts/microbench_gpu_recurrence.py --configs --json "$OUT/recurrence.json"
fi
echo "results in $OUT"
