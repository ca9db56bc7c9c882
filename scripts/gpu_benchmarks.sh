#!/usr/bin/env bash
# The GPU checks and figures of BENCHMARKS.md, for a machine with one CUDA device:
#   bash scripts/gpu_benchmarks.sh [WHAT] [OUTPUT_DIR]            (default: all, output/bench_gpu)
# WHAT is 'all', a part (train, infer, diag) or a comma-separated list of step names and parts, e.g.
#   bash scripts/gpu_benchmarks.sh train_fused,train_fused_cudagraphs,tests
# Parts and their steps, in the order they run:
# train: Sequencer2D-S, 224 px, bf16 autocast, batch 256, training against timm's sequencer2d_s with the same
#        weights, timm eager:
#          train_fused             ours eager, fused engine                              (about 1.5 min)
#          train_fused_plain_norm  the same with plain LayerNorms (--no-fused-norm): the pre-norm kernels' share
#          train_fused_compiled    ours under torch.compile, fused engine                (about 3 min, compiling)
#          train_native            ours eager, native engine (cuDNN)                     (about 1.5 min)
#          train_fused_cudagraphs  ours under torch.compile 'reduce-overhead' (CUDA graphs)   (about 3 min)
#          mem_b32, mem_b32_gc     training peak memory at batch 32, without / with gradient checkpointing
# infer: inference, batch 256, bf16:
#          infer_eager, infer_compiled   both models eager; both under torch.compile (fused engine)
#          infer_auto   both models eager, ours with the default engine ('auto': cuDNN for eager inference)
# diag:    tests        the CUDA tests (Triton kernels against float64, fp32 and bf16 autocast, torch.compile;
#                       the Triton pre-norms against plain LayerNorms)
#          accuracy     each engine's error under bf16 autocast (scripts/check_gpu_autocast_accuracy.py)
#          profile_fused, profile_timm   one training step of each model under torch.profiler
#          recurrence   one BiLSTM2D and its kernels alone, every launch configuration
#          norm         the Triton pre-norm kernels alone; the backward in a grid of launch configurations
# The minute figures are estimates (compilation dominates the compiled steps), not measurements.
# Every step writes its log and results into OUTPUT_DIR; a step that fails or overruns does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
OUT=${2:-output/bench_gpu}
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# each step is a process of its own: with this, Triton versions that know the variable keep the LSTM kernels'
# autotuning results on disk beside the compiled kernels, so only the first step times the launch candidates
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
PARTS=(train infer diag)
STEPS=(train_fused train_fused_plain_norm train_fused_compiled train_native train_fused_cudagraphs mem_b32 mem_b32_gc
       infer_eager infer_compiled infer_auto tests accuracy profile_fused profile_timm recurrence norm)
IFS=, read -ra ITEMS <<<"$WHAT"
if [[ ${#ITEMS[@]} -eq 0 ]]; then ITEMS=(""); fi
for w in "${ITEMS[@]}"; do
  if [[ $w != all && ! " ${PARTS[*]} ${STEPS[*]} " == *" $w "* ]] || [[ -z $w || $w == *" "* ]]; then
    echo "gpu_benchmarks.sh: error: unknown step or part '$w' in '$WHAT' (a comma-separated list of: all," \
         "${PARTS[*]}, ${STEPS[*]})" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
want() {  # want PART NAME: whether WHAT selects this step (all, its part, or its name)
  [[ ",$WHAT," == *,all,* || ",$WHAT," == *",$1,"* || ",$WHAT," == *",$2,"* ]]
}
step() {  # step PART NAME SECONDS COMMAND...: if selected, run with a time limit, log to OUT/NAME.log
  local part=$1 name=$2 limit=$3; shift 3
  want "$part" "$name" || return 0
  echo "== $name ($(date -u +%T))"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name rc=$rc"
}
BENCH=("$PY" -m sequencer.cli benchmark --model sequencer2d_s --device cuda --compare-timm --quiet)
TRAIN=("${BENCH[@]}" --batch-size 256 --precision bf16 --mode train --matmul-peak --warmup 5 --iters 20)
MEM=("$PY" -m sequencer.cli benchmark --model sequencer2d_s --device cuda --batch-size 32 --precision bf16
     --mode train --rnn-engine fused --warmup 2 --iters 3)
INFER=("${BENCH[@]}" --batch-size 256 --precision bf16 --mode infer --warmup 5 --iters 30)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"

step train train_fused 150 "${TRAIN[@]}" --rnn-engine fused --results-file "$OUT/s_train_bf16_b256_fused.json"
step train train_fused_plain_norm 150 "${TRAIN[@]}" --rnn-engine fused --no-fused-norm \
    --results-file "$OUT/s_train_bf16_b256_fused_plain_norm.json"
step train train_fused_compiled 420 "${TRAIN[@]}" --rnn-engine fused --compile --timm-eager \
    --results-file "$OUT/s_train_bf16_b256_fused_compiled.json"
step train train_native 150 "${TRAIN[@]}" --rnn-engine native --results-file "$OUT/s_train_bf16_b256_native.json"
step train train_fused_cudagraphs 420 "${TRAIN[@]}" --rnn-engine fused --compile-mode reduce-overhead --timm-eager \
    --results-file "$OUT/s_train_bf16_b256_fused_cudagraphs.json"
step train mem_b32 90 "${MEM[@]}" --results-file "$OUT/s_train_b32_mem.json"
step train mem_b32_gc 90 "${MEM[@]}" --grad-checkpointing --results-file "$OUT/s_train_b32_mem_gc.json"

step infer infer_eager 120 "${INFER[@]}" --rnn-engine fused --results-file "$OUT/s_infer_bf16_b256_eager.json"
step infer infer_compiled 400 "${INFER[@]}" --rnn-engine fused --compile --results-file "$OUT/s_infer_bf16_b256_compiled.json"
step infer infer_auto 120 "${INFER[@]}" --rnn-engine auto --results-file "$OUT/s_infer_bf16_b256_auto.json"

step diag tests 300 "$PY" -m pytest -p no:warnings tests/test_fused.py tests/test_triton_norm.py -k cuda
step diag accuracy 60 "$PY" scripts/check_gpu_autocast_accuracy.py
step diag profile_fused 90 "$PY" scripts/profile_step.py --rnn-engine fused --top 30
step diag profile_timm 90 "$PY" scripts/profile_step.py --timm --top 15
step diag recurrence 150 "$PY" scripts/microbench_gpu_recurrence.py --configs --json "$OUT/recurrence.json"
step diag norm 120 "$PY" scripts/microbench_gpu_norm.py --json "$OUT/norm.json"
echo "results in $OUT"
