#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, for a machine with one CUDA device:
#   bash benchmarks/gpu.sh [WHAT] [LOG_DIR]            (default: all, output/bench_gpu)
# WHAT is 'all', a part (train, infer, compare, diag, data) or a comma-separated list of step names and parts, e.g.
#   bash benchmarks/gpu.sh train_fused,train_fused_cudagraphs,tests
# Each `sequencer benchmark` step writes its results to benchmarks/results/gpu-<GPU>-<step>.json (<GPU>: the
# device's name from nvidia-smi, lower case, e.g. nvidia-h200; RESULTS_DIR=... writes them elsewhere), and
# every step its log to LOG_DIR/<step>.log. A step that fails or overruns does not stop the others.
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
#          infer_auto   both models eager, ours with the default engine ('auto': cuDNN or the Triton kernels,
#                       whichever was faster the first time a layer shape ran)
# compare: Sequencer2D-S against timm's sequencer2d_s (same weights), ConvNeXt-T and Swin-T, all eager, bf16,
#          batch 256, in one run each:
#          compare_train, compare_infer   ours with the fused engine
# diag:    tests        the CUDA tests (Triton kernels against float64, fp32 and bf16 autocast, torch.compile;
#                       the Triton pre-norms against plain LayerNorms)
#          accuracy     each engine's error under bf16 autocast (benchmarks/gpu_accuracy.py)
#          parity       Sequencer2D-S trained 240 steps under bf16 autocast, ours fused / ours native (3 seeds) /
#                       timm from the same weights: the loss curves against native's seed-to-seed envelope
#                       (benchmarks/gpu_parity.py; plot docs/gpu-parity.png)                (about 3-4 min)
#          profile_fused, profile_timm   one training step of each model under torch.profiler
#                       (benchmarks/profile_step.py)
# data:    the input pipeline against the model (`sequencer benchmark --data`): Sequencer2D-S training, 224 px,
#          bf16, batch 256, fed by the training command's loader with the seed recipe's augmentations
#          (RandAugment, random erasing, mixup / cutmix) over a synthetic JPEG folder (JPEG_DIR=..., default
#          LOG_DIR/jpegs); each run times the loader alone, the synthetic step and the two together:
#          data_jpegs          2,560 random-content 500x375 JPEGs in 10 classes (benchmarks/make_jpegs.py,
#                              every core)                                           (under 0.5 min)
#          data_j8, data_j16   eager, 8 and 16 loader processes                      (about 1.5 min each)
#          data_j8_device      eager, 8 loader processes, --device-augment (decoding, crop, flips and
#                              RandAugment on the GPU; also times the loader with that GPU work alone)
#          data_j16_compiled   under torch.compile, 16 loader processes              (about 4 min, compiling)
#          About 8 minutes in all. The data part runs only when named (not in 'all'); data_jpegs must have
#          run on the machine before the other data steps.
# session: what one short device session runs (about 8 minutes): train_fused, infer_eager, infer_auto,
#          compare_train, compare_infer, tests.
# session2: a second call where device time is left (about 6 minutes): parity, data_jpegs, data_j8,
#          data_j8_device.
# The minute figures are estimates (compilation dominates the compiled steps), not measurements.
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
OUT=${2:-output/bench_gpu}
RESULTS=${RESULTS_DIR:-benchmarks/results}
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# each step is a process of its own: with this, Triton versions that know the variable keep the LSTM kernels'
# autotuning results on disk beside the compiled kernels, so only the first step times the launch candidates
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
PARTS=(train infer compare diag data)
STEPS=(train_fused train_fused_plain_norm train_fused_compiled train_native train_fused_cudagraphs mem_b32 mem_b32_gc
       infer_eager infer_compiled infer_auto compare_train compare_infer tests accuracy parity profile_fused
       profile_timm data_jpegs data_j8 data_j8_device data_j16 data_j16_compiled)
WHAT=${WHAT//session2/parity,data_jpegs,data_j8,data_j8_device}
WHAT=${WHAT//session/train_fused,infer_eager,infer_auto,compare_train,compare_infer,tests}
IFS=, read -ra ITEMS <<<"$WHAT"
if [[ ${#ITEMS[@]} -eq 0 ]]; then ITEMS=(""); fi
for w in "${ITEMS[@]}"; do
  if [[ $w != all && ! " ${PARTS[*]} ${STEPS[*]} " == *" $w "* ]] || [[ -z $w || $w == *" "* ]]; then
    echo "gpu.sh: error: unknown step or part '$w' in '$WHAT' (a comma-separated list of: all," \
         "${PARTS[*]}, ${STEPS[*]})" >&2
    exit 2
  fi
done
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
SLUG=$(printf '%s' "${GPU:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/\((r|tm)\)//g; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
mkdir -p "$OUT" "$RESULTS"
want() {  # want PART NAME: whether WHAT selects this step (all but for the data part, its part, or its name)
  [[ ( $1 != data && ",$WHAT," == *,all,* ) || ",$WHAT," == *",$1,"* || ",$WHAT," == *",$2,"* ]]
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
bench() {  # bench PART NAME SECONDS OPTIONS...: a `sequencer benchmark` step writing RESULTS/gpu-SLUG-NAME.json
  local part=$1 name=$2 limit=$3; shift 3
  step "$part" "$name" "$limit" "$PY" -m sequencer.cli benchmark --model sequencer2d_s --device cuda "$@" \
      --results-file "$RESULTS/gpu-$SLUG-$name.json"
}
TRAIN=(--compare-timm --quiet --batch-size 256 --precision bf16 --mode train --matmul-peak --warmup 5 --iters 20)
MEM=(--batch-size 32 --precision bf16 --mode train --rnn-engine fused --warmup 2 --iters 3)
INFER=(--compare-timm --quiet --batch-size 256 --precision bf16 --mode infer --warmup 5 --iters 30)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"

bench train train_fused 150 "${TRAIN[@]}" --rnn-engine fused
bench train train_fused_plain_norm 150 "${TRAIN[@]}" --rnn-engine fused --no-fused-norm
bench train train_fused_compiled 420 "${TRAIN[@]}" --rnn-engine fused --compile --timm-eager
bench train train_native 150 "${TRAIN[@]}" --rnn-engine native
bench train train_fused_cudagraphs 420 "${TRAIN[@]}" --rnn-engine fused --compile-mode reduce-overhead --timm-eager
bench train mem_b32 90 "${MEM[@]}"
bench train mem_b32_gc 90 "${MEM[@]}" --grad-checkpointing

bench infer infer_eager 120 "${INFER[@]}" --rnn-engine fused
bench infer infer_compiled 400 "${INFER[@]}" --rnn-engine fused --compile
bench infer infer_auto 120 "${INFER[@]}" --rnn-engine auto

OTHERS=(sequencer2d_s convnext_tiny swin_tiny_patch4_window7_224)
bench compare compare_train 240 "${TRAIN[@]}" --rnn-engine fused --compare-timm "${OTHERS[@]}" --iters 10
bench compare compare_infer 150 "${INFER[@]}" --rnn-engine fused --compare-timm "${OTHERS[@]}" --iters 15

step diag tests 300 "$PY" -m pytest -p no:warnings tests/test_fused.py tests/test_triton_norm.py tests/test_numerics.py tests/test_autotune.py \
    tests/test_device_augment.py -k "cuda or gpu"
step diag accuracy 60 "$PY" benchmarks/gpu_accuracy.py
step diag parity 420 "$PY" benchmarks/gpu_parity.py --results "$RESULTS/gpu-$SLUG-parity.json" --plot docs/gpu-parity.png
step diag profile_fused 90 "$PY" benchmarks/profile_step.py --rnn-engine fused --top 30
step diag profile_timm 90 "$PY" benchmarks/profile_step.py --timm --top 15

JPEGS=${JPEG_DIR:-$OUT/jpegs}
DATA=(--data "$JPEGS" --precision bf16 --batch-size 256 --mode train)
step data data_jpegs 120 "$PY" benchmarks/make_jpegs.py "$JPEGS" --classes 10 --per-class 256 --size 500 375
bench data data_j8 240 "${DATA[@]}" --workers 8
bench data data_j8_device 240 "${DATA[@]}" --workers 8 --device-augment
bench data data_j16 240 "${DATA[@]}" --workers 16
bench data data_j16_compiled 480 "${DATA[@]}" --workers 16 --compile
echo "logs in $OUT, results in $RESULTS"
