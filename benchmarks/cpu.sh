#!/usr/bin/env bash
# The CPU figures of BENCHMARKS.md, for the processor this runs on:
#   bash benchmarks/cpu.sh [EXTRA BENCHMARK OPTIONS...]
# Sequencer2D-S, 224 px, float32, 2 threads, against timm's sequencer2d_s with the same weights (alternating step
# by step), with our default engine ('auto') and with the native one (nn.LSTM, timm's layers):
#   auto-b8, native-b8   batch 8, inference and training (--mode both)
#   auto-b1, native-b1   batch 1, inference
#   auto-b8-malloc       batch 8, training, with --malloc-tuning (glibc's allocator as `sequencer train` sets it,
#                        for both models)
#   gemm-shapes-b8       benchmarks/gemm_shapes.py: the fast engine's GEMMs of a batch-8 training step on MKL and
#                        oneDNN, against a large GEMM, and their share of the step (what limits training)
# Each run writes benchmarks/results/cpu-<processor>-<engine>-b<N>.json (and -gemm-shapes-b8.json), <processor>
# being the `model name` of /proc/cpuinfo in lower case with its family and model numbers (e.g.
# amd-epyc-family-25-model-17); RESULTS_DIR=... writes them elsewhere. Options given
# to this script are added to every run (e.g. `--warmup 3 --iters 15`; later options win over earlier ones).
# A run that fails does not stop the others; the exit status is that of the last failure (0 if none).
# With onnxruntime installed (the export extra), the 'auto' runs time it too on our exported model (inference).
# MKL_ENABLE_INSTRUCTIONS=AVX2 (say) restricts PyTorch's MKL to that instruction set, which makes its sgemm slow
# on an AVX-512 processor, as it is on some AMD ones: the results' names then end in -mkl-avx2.
# AS_AVX2=1 runs everything as on an AVX2 processor: PyTorch's own kernels, MKL, oneDNN and our CPU kernel
# (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, SEQUENCER_CPU_ISA); names end in -as-avx2.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS_DIR:-benchmarks/results}
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
CPU=$(grep -m 1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2-)
if [[ -z ${CPU// /} ]]; then CPU=$(lscpu 2>/dev/null | grep -m 1 '^Model name' | cut -d: -f2-); fi
if [[ -z ${CPU// /} ]]; then CPU=$(uname -m); fi
SLUG=$(printf '%s' "$CPU" | tr '[:upper:]' '[:lower:]' | sed -E 's/\((r|tm)\)//g; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
# one model name can cover several micro-architectures (a virtual machine's 'AMD EPYC' is Zen 4 or Zen 5): the
# family and model numbers go into the name too, e.g. amd-epyc-family-25-model-17
FAMILY=$(grep -m 1 '^cpu family' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | tr -d ' ')
MODEL=$(grep -m 1 -P '^model\s*:' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | tr -d ' ')
if [[ $FAMILY =~ ^[0-9]+$ && $MODEL =~ ^[0-9]+$ ]]; then SLUG="$SLUG-family-$FAMILY-model-$MODEL"; fi
if [[ ${AS_AVX2:-0} == 1 ]]; then
  export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 SEQUENCER_CPU_ISA=x86_64_v3
  SLUG="$SLUG-as-avx2"
elif [[ -n ${MKL_ENABLE_INSTRUCTIONS:-} ]]; then
  SLUG="$SLUG-mkl-$(printf '%s' "$MKL_ENABLE_INSTRUCTIONS" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g')"
fi
ORT=()
if "$PY" -c 'import onnx, onnxruntime' 2>/dev/null; then ORT=(--compare-onnxruntime); fi
mkdir -p "$RESULTS"
echo "processor: $(echo $CPU) ($SLUG)"
status=0
run() {  # run ENGINE BATCH MODE SUFFIX [EXTRA OPTIONS...]
  local engine=$1 batch=$2 mode=$3 suffix=$4
  shift 4
  local file="$RESULTS/cpu-$SLUG-$engine-b$batch$suffix.json"
  echo "== $engine, batch $batch, $mode ($(date -u +%T)) -> $file"
  "$PY" -m sequencer.cli benchmark --model sequencer2d_s --num-threads 2 --compare-timm --no-memory \
      -b "$batch" --mode "$mode" --rnn-engine "$engine" "$@" --results-file "$file" || status=$?
}
run auto 8 both '' "${ORT[@]}" "${@}"
run native 8 both '' "${@}"
run auto 1 infer '' "${ORT[@]}" "${@}"
run native 1 infer '' "${@}"
run auto 8 train -malloc --malloc-tuning "${@}"
# what limits training here: the fast engine's GEMMs of one step on MKL and oneDNN, and their share of the step
file="$RESULTS/cpu-$SLUG-gemm-shapes-b8.json"
echo "== GEMMs of a training step, batch 8 ($(date -u +%T)) -> $file"
"$PY" benchmarks/gemm_shapes.py --batch-size 8 --threads 2 --results "$file" || status=$?
exit $status

