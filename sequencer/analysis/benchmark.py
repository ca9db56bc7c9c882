"""Throughput, latency and peak memory of a model, optionally side by side with timm's implementation.

``sequencer benchmark`` (and the root ``benchmark.py``) measures inference (forward under ``no_grad``)
and training (zero_grad, forward, cross-entropy, backward, SGD step) on random inputs for any model of
the table, batch size, input size, precision (fp32 or fp16 / bf16 autocast), torch.compile on or off,
RNN engine and gradient checkpointing.

With ``--compare-timm`` timm's model of the same architecture is built, given exactly the same weights,
and the two are timed *alternately*: every measured iteration runs one step of each, the order swapping
from one iteration to the next, so that noise from other processes on a shared machine falls on both
alike. The result is printed as the ratio ours / timm.

With ``--compare-onnxruntime`` our model is exported to ONNX in the run (``sequencer export``'s exporter, into a
temporary file) and onnxruntime's ``InferenceSession`` on the CPU (``--num-threads`` intra-op threads, one inter-op
thread, sequential execution, no spinning of idle threads, which would take the cores from the next model's step)
is timed in the same alternating loop, on the same batch as a numpy array, for inference only. Before timing, its
output is checked against our model's: the largest absolute difference must be within 1e-3 of the largest output.
The exported copy's classifier, zero-initialised in a fresh model, gets random weights first, so that the check
covers the whole network (values do not change the work). The onnxruntime row reports no peak memory: its arena
keeps memory between runs, out of sight of both CPU probes.

On CPU in float32, the fast engine's GEMMs run on MKL or oneDNN (``sequencer.fast.gemm``), chosen by measurement
per kind of GEMM during the warm-up, or forced with ``--gemm``; the choice is printed after the run and stored in
our rows' ``gemm`` field.

Figures reported per model and mode:

* ``img_per_s``: images per second over the measured steps (batch * steps / total step time);
* ``latency_ms_median`` / ``latency_ms_p90``: per-step wall time;
* ``peak_mem_mb``: on CUDA the maximum allocated memory during one step (weights included; not reported for
  a model replaying CUDA graphs, ``--compile-mode reduce-overhead`` or ``max-autotune``, whose memory pool
  was allocated when the graphs were captured, so a replay's peak leaves it out); on CPU the
  increase of the process's resident set during one step, measured by resetting the kernel's RSS
  high-water mark (``/proc/self/clear_refs``) after returning freed heap memory to the system
  (``malloc_trim``), then reading ``VmHWM``; or, with ``--cpu-memory tensors``, the peak of the bytes of
  live tensors allocated during one step (torch.profiler's memory timeline), which leaves out the C
  allocator's slack (the resident set varies with the state of its heap);
* ``gmacs_per_img`` (forward multiply-accumulates, recurrences included, see ``count_flops``) and the
  achieved ``gmac_per_s``: forward MACs for inference, 3x forward MACs for training (forward + backward
  for inputs and weights; the recomputation of gradient checkpointing is not counted as useful work);
* with ``--matmul-peak``, the machine's measured matrix-multiply peak (the fastest of repeated large
  GEMMs in the benchmark's precision, probed before and after the model steps) and ``fraction_of_peak`` =
  achieved FLOP/s (2 per MAC) / peak FLOP/s.

Results go to stdout as a table, and with ``--results-file`` to CSV or JSON (by extension, written
atomically).

With ``--data DIR`` (an image folder) the benchmark asks whether the input pipeline or the model sets the pace
of training (``--mode train``, the default there) or inference: in one run it times the training command's
loader alone (``-j`` processes), the synthetic step above of the same model, batch, precision and device, and the
step fed by that loader end to end (see ``data_benchmark``), then says which of the two binds.
"""
import argparse
import contextlib
import copy
import csv
import ctypes
import ctypes.util
import datetime
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch import nn
from torch._inductor import list_mode_options

from .. import __version__, fast
from ..data.loaders import check_input_size
from ..engine.args import COUNT, NATURAL, Parser, Range
from ..engine.io import check_output, write_text
from ..engine.malloc import keep_freed_memory
from ..errors import UserError, one_line
from ..export import export_onnx
from ..factory import create_model
from ..fast import cpu_kernel, gemm
from ..fast.cpu_kernel import prepare_for_compile
from ..fast.runtime import triton_ok
from ..models.blocks import RNN2D
from ..models.registry import MODELS, get_spec
from ..models.weights import CheckpointError, load_state_dict
from . import data_benchmark
from .flops import count_flops

PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
MODES = ('infer', 'train', 'both')
OURS, TIMM, ORT = 'sequencer', 'timm', 'onnxruntime'
EXTRA_HINT = "pip install 'sequencer-lstm[export]'"
ORT_RTOL = 1e-3   # onnxruntime's largest absolute difference from ours, relative to our largest output


# ---- arguments --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument('--model', '-m', default='sequencer2d_s', help="a model name from `sequencer models` "
                        "(default: sequencer2d_s)")
    parser.add_argument('--mode', choices=MODES, default=None,
                        help='infer: forward under no_grad; train: zero_grad + forward + loss + backward + SGD step; '
                             'both (default; with --data: train, and both is not offered)')
    parser.add_argument('--batch-size', '-b', type=COUNT, default=8, help='images per step (default 8)')
    parser.add_argument('--img-size', type=COUNT, default=None,
                        help="square input side in pixels (default: the model's input size, e.g. 224)")
    parser.add_argument('--input-size', type=COUNT, nargs=3, metavar=('C', 'H', 'W'), default=None,
                        help='full input size, for non-square inputs or other channel counts; overrides --img-size')
    parser.add_argument('--num-classes', type=NATURAL, default=1000, help='classifier width (default 1000)')
    parser.add_argument('--layers', default=None, metavar='N,N,N,N',
                        help='blocks per stage, overriding the model\'s (e.g. 1,1,1,1 for a quick smoke run)')
    parser.add_argument('--precision', choices=sorted(PRECISIONS), default='fp32',
                        help='fp32 (default), or fp16 / bf16 mixed precision through torch.autocast; the weights '
                             'stay fp32')
    parser.add_argument('--compile', action='store_true',
                        help='run the model(s) through torch.compile (dynamic=False: the benchmark\'s shapes are '
                             'fixed; compilation happens in the warm-up steps)')
    parser.add_argument('--compile-mode', default=None,
                        help="torch.compile mode ('default', 'reduce-overhead', 'max-autotune', ...); "
                             "implies --compile")
    parser.add_argument('--timm-eager', action='store_true',
                        help="with --compile and --compare-timm: compile our model only and time timm's eager (the "
                             "comparison of the GPU training target)")
    parser.add_argument('--rnn-engine', choices=('auto', 'native', 'fused'), default=None,
                        help="how our model runs its recurrences (default: the model's default, 'auto'); timm's "
                             "model always runs nn.LSTM")
    parser.add_argument('--no-fused-mlp', action='store_true',
                        help="run our model's channel MLPs as timm's Mlp does (fc1, GELU, fc2 as separate ops) instead "
                             "of the fused CPU path")
    parser.add_argument('--no-fused-norm', action='store_true',
                        help="run our model's pre-norms as plain LayerNorms on CUDA instead of the Triton kernels "
                             "(LayerNorm fused with the residual's gradient and the autocast cast)")
    parser.add_argument('--grad-checkpointing', action='store_true',
                        help='recompute every block in the backward pass (both models with --compare-timm)')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='cpu (default) or cuda')
    parser.add_argument('--num-threads', type=COUNT, default=None,
                        help='CPU threads for torch (torch.set_num_threads; default: torch\'s own choice)')
    parser.add_argument('--warmup', type=NATURAL, default=3,
                        help='untimed steps per model and mode before measuring (default 3; compilation happens here)')
    parser.add_argument('--iters', type=COUNT, default=20, help='measured steps per model and mode (default 20)')
    parser.add_argument('--compare-timm', nargs='*', metavar='MODEL', default=None,
                        help="also time timm models alternately with ours in this one run and print ours / theirs: "
                             "without names, timm's model of the same architecture with identical weights; with names, "
                             "those timm models (e.g. convnext_tiny swin_tiny_patch4_window7_224 sequencer2d_s; "
                             "a Sequencer of our architecture gets our weights, others their own initialisation)")
    parser.add_argument('--compare-onnxruntime', action='store_true',
                        help="also time our model exported to ONNX (as by `sequencer export`) in onnxruntime on the "
                             "CPU, alternately with the others, inference only (--num-threads intra-op threads); its "
                             "output is checked against ours first. Needs the export extra")
    parser.add_argument('--gemm', choices=('auto',) + gemm.BACKENDS, default='auto',
                        help='CPU float32 GEMMs of our fast engine: measured choice (auto), MKL, or oneDNN')
    parser.add_argument('--pack-weights', action='store_true',
                        help="inference: our fast engine keeps the recurrence's stacked weights instead of rebuilding "
                             "them at every call, and its forward GEMMs on oneDNN use weights packed once into "
                             "oneDNN's layout (as `sequencer validate` and `predict` do; SEQUENCER_PACK_WEIGHTS=1)")
    parser.add_argument('--matmul-peak', action='store_true',
                        help='measure the machine\'s matrix-multiply peak (a large GEMM in the benchmark precision) '
                             'and report achieved FLOP/s as a fraction of it')
    parser.add_argument('--matmul-size', type=Range(int, 16), default=None,
                        help='side of the square GEMM of --matmul-peak (default 2048 on CPU, 8192 on CUDA)')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory step')
    parser.add_argument('--malloc-tuning', action='store_true',
                        help="keep freed heap memory for reuse (glibc: no mmap, high trim threshold), as "
                             "`sequencer train` does on CPU; applies to every model of the run")
    parser.add_argument('--cpu-memory', choices=('rss', 'tensors'), default='rss',
                        help="how peak memory is measured on CPU: 'rss' (default), the growth of the process's "
                             "resident set over one step, allocator slack included; 'tensors', the peak of the "
                             "bytes of live tensors allocated during one step (from torch.profiler's memory "
                             "timeline, about 4x slower than a step), the CPU analogue of CUDA's max allocated")
    parser.add_argument('--seed', type=int, default=0, help='seed for weights and inputs (default 0)')
    parser.add_argument('--data', metavar='DIR', default=None,
                        help="time the input pipeline too: the training command's loader over this image folder "
                             "(DIR/train/<class>/*.jpg, or DIR/<class>/*.jpg) with the Sequencer2D-S recipe's "
                             "augmentations (--mode infer: the evaluation transform), alone and feeding the step, "
                             "beside the synthetic step, and which of the two sets the pace")
    parser.add_argument('-j', '--workers', type=NATURAL, default=None,
                        help=f"with --data: loader processes (default {data_benchmark.default_workers()}, the "
                             f"training command's; 0 loads in the main process)")
    parser.add_argument('--device-augment', action='store_true',
                        help="with --data --mode train: the training command's --device-augment (JPEG decoding, "
                             "crop, flips and RandAugment on the device); also times the loader with that device "
                             "work, without the step")
    parser.add_argument('--results-file', default=None,
                        help='also write the results to this .csv or .json file (atomically, after each mode)')
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress lines on stderr')


def _check_args(args) -> Tuple[int, int, int]:
    """Validate what argparse cannot; return the input size (C, H, W)."""
    data = getattr(args, 'data', None)
    if args.mode is None:
        args.mode = 'train' if data else 'both'
    if data is None and getattr(args, 'workers', None) is not None:
        raise UserError("-j/--workers: loader processes are used with --data DIR only")
    if getattr(args, 'device_augment', False) and (data is None or args.mode != 'train'):
        raise UserError("--device-augment: augments training batches; give --data DIR (and --mode train)")
    if data is not None:
        if args.mode == 'both':
            raise UserError("--mode both: with --data give train or infer (one loader per run)")
        for flag, given in (('--compare-timm', _comparisons(args) is not None), ('--matmul-peak', args.matmul_peak),
                            ('--compare-onnxruntime', getattr(args, 'compare_onnxruntime', False))):
            if given:
                raise UserError(f"{flag}: not with --data (it times the model on synthetic inputs only)")
    if args.mode in ('train', 'both') and args.num_classes == 0:
        raise UserError("training needs a classifier: --num-classes 0 works only with --mode infer")
    if args.results_file and os.path.splitext(args.results_file)[1].lower() not in ('.csv', '.json'):
        raise UserError(f"--results-file {args.results_file}: the name must end in .csv or .json")
    if args.results_file:
        check_output(args.results_file, '--results-file')
    if getattr(args, 'compare_onnxruntime', False):
        if args.mode == 'train':
            raise UserError("--compare-onnxruntime: inference only; not with --mode train (use infer or both)")
        if args.device == 'cuda':
            raise UserError("--compare-onnxruntime: onnxruntime runs on the CPU here; not with --device cuda")
        if args.precision != 'fp32':
            raise UserError(f"--compare-onnxruntime: the ONNX model runs in float32; not with --precision "
                            f"{args.precision}")
        if args.input_size is not None and args.input_size[1] != args.input_size[2]:
            raise UserError(f"--compare-onnxruntime: the ONNX export takes square inputs; not --input-size "
                            f"{' '.join(map(str, args.input_size))}")
        _import_onnxruntime()
    if getattr(args, 'gemm', 'auto') != 'auto':
        if args.rnn_engine == 'native':
            raise UserError(f"--gemm {args.gemm}: with --rnn-engine native our model is plain PyTorch, whose GEMMs "
                            f"are torch's own")
        if args.device == 'cuda':
            raise UserError(f"--gemm {args.gemm}: chooses CPU GEMMs; not with --device cuda")
    if getattr(args, 'pack_weights', False) and (args.rnn_engine == 'native' or args.device == 'cuda'):
        raise UserError("--pack-weights: packs the weights of our fast engine's CPU GEMMs; not with "
                        + ('--rnn-engine native' if args.rnn_engine == 'native' else '--device cuda'))
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to torch on this machine")
    if args.compile_mode is not None:
        if args.compile_mode not in list_mode_options():
            raise UserError(f"--compile-mode {args.compile_mode}: unknown mode; torch.compile knows "
                            f"{', '.join(list_mode_options())}")
    if args.timm_eager and not (_comparisons(args) is not None and (args.compile or args.compile_mode is not None)):
        raise UserError("--timm-eager compiles our model only: it needs --compare-timm and --compile (or "
                        "--compile-mode)")
    spec = get_spec(args.model)  # unknown names: one line with suggestions
    if args.input_size is not None:
        size = tuple(args.input_size)
    elif args.img_size is not None:
        size = (spec.input_size[0], args.img_size, args.img_size)
    else:
        size = tuple(spec.input_size)
    return size


def _comparisons(args) -> Optional[List[str]]:
    """The timm models to compare with: None (no --compare-timm), [] (timm's model of our architecture), or names."""
    compare = getattr(args, 'compare_timm', None)
    if compare is True:
        return []
    if compare is False or compare is None:
        return None
    return list(compare)


def _parse_layers(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    if text is None:
        return None
    try:
        layers = tuple(int(t) for t in text.replace(' ', '').split(',') if t)
    except ValueError:
        raise UserError(f"--layers {text!r}: expected comma-separated integers such as 1,1,1,1") from None
    if not layers or min(layers) < 1:
        raise UserError(f"--layers {text!r}: every stage needs at least one block")
    return layers


def _import_onnxruntime():
    """onnxruntime, once onnx (which the exporter writes with) is known to be there too; a one-line error naming
    the extra otherwise."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise UserError(f"--compare-onnxruntime needs the export extra ({EXTRA_HINT}): {e}") from None
    return onnxruntime


# ---- models -----------------------------------------------------------------------------------------

def build_ours(args, input_size, overrides: Dict) -> nn.Module:
    try:
        model = create_model(args.model, num_classes=args.num_classes, rnn_engine=args.rnn_engine,
                             in_chans=input_size[0], **overrides)
    except (TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{args.model}: cannot build with {overrides or 'these settings'}: {e}") from None
    if fast.engine_of(model) != 'native':
        fast.set_engine(model, args.rnn_engine or 'auto', fused_mlp=not getattr(args, 'no_fused_mlp', False),
                        fused_norm=not getattr(args, 'no_fused_norm', False))
    return model


def timm_name_for(name: str) -> str:
    """timm's model of the same architecture: the same name, or a table row with identical constructor args
    (the ``_392`` rows share their 224 px parent's architecture)."""
    available = set(timm.list_models('sequencer*'))
    if name in available:
        return name
    spec = get_spec(name)
    for other, s in MODELS.items():
        if other in available and s.family is spec.family and s.args == spec.args:
            return other
    raise UserError(f"--compare-timm: timm has no model with the architecture of {name} "
                    f"(timm offers {', '.join(sorted(available)) or 'no Sequencer models'})")


def build_timm(args, ours: nn.Module, input_size, overrides: Dict, name: Optional[str] = None) -> Tuple[nn.Module, str]:
    """timm's model of the same architecture, loaded with ``ours``' weights (strict: every key must match); or, with
    ``name`` of another architecture, that timm model with its own initialisation."""
    same = timm_name_for(args.model)
    if name is not None and name != same:
        if name not in timm.list_models():
            close = ', '.join(timm.list_models(f'*{name[:4]}*')[:5])
            raise UserError(f"--compare-timm {name}: timm has no such model" + (f" (e.g. {close})" if close else ''))
        try:
            other = timm.create_model(name, pretrained=False, num_classes=args.num_classes, in_chans=input_size[0])
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"--compare-timm {name}: cannot build it: {e}") from None
        return other, name
    name = same
    kwargs = dict(overrides)
    if 'layers' in kwargs:
        kwargs['layers'] = list(kwargs['layers'])
    other = timm.create_model(name, pretrained=False, num_classes=args.num_classes, in_chans=input_size[0], **kwargs)
    # our layout is timm's: load timm's random init into ours through our checked loader, so both hold the same
    try:
        load_state_dict(ours, other.state_dict(), source=f"timm's {name}")
    except CheckpointError as e:
        raise UserError(f"--compare-timm: {e}") from None
    return other, name


def build_onnxruntime(ours: nn.Module, x: torch.Tensor, threads: int, seed: int) -> Tuple[object, Dict]:
    """An onnxruntime session (CPU, ``threads`` intra-op threads, one inter-op thread, sequential) of ``ours``
    exported to ONNX in a temporary file, removed once loaded; checked on ``x`` against ``ours`` run in PyTorch (an
    error where the largest absolute difference exceeds ``ORT_RTOL`` of the largest output, or either is not
    finite). Returns the session and what to report: versions, exporter, opset, the differences."""
    ort = _import_onnxruntime()
    import onnx
    model = copy.deepcopy(ours).eval()   # the exporter puts what it exports on the plain engine, in place
    if hasattr(model, 'set_grad_checkpointing'):
        model.set_grad_checkpointing(False)
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if isinstance(head, nn.Linear):   # zero-initialised: give it values, so that the check sees the whole network
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
    with torch.no_grad():
        ref = model(x).float()
    with tempfile.TemporaryDirectory(prefix='sequencer-benchmark-') as tmp:
        info = export_onnx(model, os.path.join(tmp, 'model.onnx'), img_size=x.shape[-1])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # its threads would otherwise spin for a while after each run, taking the cores from the next model's step
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        options.add_session_config_entry('session.inter_op.allow_spinning', '0')
        session = ort.InferenceSession(os.path.join(tmp, 'model.onnx'), options, providers=['CPUExecutionProvider'])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if out.shape != ref.shape:
        raise UserError(f"--compare-onnxruntime: onnxruntime gives outputs of shape {tuple(out.shape)}, our model "
                        f"{tuple(ref.shape)}")
    if not torch.isfinite(ref).all():
        raise UserError("--compare-onnxruntime: our model's own outputs are NaN/inf; nothing to compare")
    if not torch.isfinite(out).all():
        raise UserError("--compare-onnxruntime: onnxruntime gives NaN/inf where our model's outputs are finite")
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    relative = diff / scale if scale > 0 else (0.0 if diff == 0 else float('inf'))
    if relative > ORT_RTOL:
        raise UserError(f"--compare-onnxruntime: onnxruntime's output differs from our model's by {diff:.3g} (max "
                        f"|difference|, {relative:.3g} of the largest output, above {ORT_RTOL:g}); nothing timed")
    return session, dict(onnxruntime=ort.__version__, onnx=onnx.__version__, exporter=info['exporter'],
                         opset=info['opset'], provider='CPUExecutionProvider', intra_op_threads=threads,
                         max_abs_difference=diff, relative_difference=relative)


def _resolved_engine(model: nn.Module, mode: str, device: torch.device, precision: str,
                     compiled: bool = False) -> str:
    """The engine our recurrences run with in ``mode`` ('auto' may choose by device, grad mode, autocast).

    The fused engine is labelled with the implementation of its recurrence: on CPU 'fused[kernel]' (the
    compiled CPU kernel, which ``--compile`` loads before tracing) or 'fused[torch]' (where it is not
    available); on CUDA 'fused[triton]' (Triton installed; its kernels are torch ops, kept in compiled graphs)
    or 'fused[torch]'. ' (measured)' follows where 'auto' chose by timing the engines (``fast.autotune``).
    """
    with torch.set_grad_enabled(mode == 'train'), _autocast(device, precision):
        decisions = {m.engine_decision(compiling=compiled) if isinstance(m, fast.FastRNN2D) else ('native', 'set')
                     for m in model.modules() if isinstance(m, RNN2D)}
    engines = sorted({e for e, _ in decisions})
    measured = ' (measured)' if any(how == 'measured' for _, how in decisions) else ''
    if 'fused' in engines:
        if device.type == 'cpu':
            impl = 'kernel' if cpu_kernel.available() else 'torch'
        else:
            impl = 'triton' if triton_ok() else 'torch'
        engines = [f'fused[{impl}]' if e == 'fused' else e for e in engines]
    return ('+'.join(engines) + measured) if engines else 'native'


def _gemm_label(model: nn.Module, device: torch.device, precision: str, compiled: bool) -> Optional[str]:
    """The backends of our fast engine's CPU float32 GEMMs so far (``gemm.describe()``: chosen on first use, in the
    warm-up); None for a plain PyTorch model (``--rnn-engine native``) or a GPU. Under autocast or torch.compile the
    GEMMs are torch's own."""
    if device.type != 'cpu' or fast.engine_of(model) == 'native':
        return None
    if precision != 'fp32':
        return f'torch ({precision} autocast)'
    return 'torch (compiled)' if compiled else gemm.describe()


def _fused_mlp_active(model: nn.Module, mode: str, device: torch.device, precision: str, compiled: bool) -> bool:
    """Whether our model's channel MLPs take the fused CPU path in ``mode`` (never inside compiled graphs)."""
    mlps = [m for m in model.modules() if isinstance(m, fast.FastMlp)]
    if not mlps or compiled:
        return False
    x = torch.zeros(1, mlps[0].fc1.in_features, device=device)
    with torch.set_grad_enabled(mode == 'train'), _autocast(device, precision):
        return mlps[0].fusable(x)


def _fused_norm_active(model: nn.Module, device: torch.device, compiled: bool) -> bool:
    """Whether our model's pre-norms run the Triton kernels (CUDA with Triton, eager, not ``--no-fused-norm``)."""
    blocks = [m for m in model.modules() if isinstance(m, fast.FastSequencerBlock)]
    return bool(blocks) and blocks[0].fused_norm and device.type == 'cuda' and not compiled and triton_ok()


# ---- measurement ------------------------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == 'fp32':
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def _check_precision(device: torch.device, precision: str):
    """Fail with one line where this torch / device cannot autocast to the requested type."""
    if precision == 'fp32':
        return
    if device.type == 'cuda' and precision == 'bf16' and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this CUDA device does not support bfloat16")
    try:
        with _autocast(device, precision):
            a = torch.ones(4, 4, device=device)
            y = a @ a
        if y.dtype != PRECISIONS[precision]:
            raise RuntimeError(f"autocast produced {y.dtype}")
    except RuntimeError as e:
        raise UserError(f"--precision {precision}: torch {torch.__version__} cannot autocast to {precision} "
                        f"on {device.type} ({e})") from None


class Step:
    """One model's inference or training step on a fixed random batch."""

    def __init__(self, model: nn.Module, mode: str, x: torch.Tensor, target: torch.Tensor, precision: str,
                 compile_mode: Optional[str], compile_: bool):
        self.model, self.mode, self.x, self.target, self.precision = model, mode, x, target, precision
        if compile_:
            prepare_for_compile(x.device)
        self.fn = torch.compile(model, mode=compile_mode, dynamic=False) if compile_ else model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9) if mode == 'train' else None
        self.loss_fn = nn.CrossEntropyLoss()

    def prepare(self):
        self.model.train(self.mode == 'train')

    def __call__(self, x: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None):
        """One step on the fixed batch, or on ``x`` and ``target`` (class indices, or class probabilities)."""
        x = self.x if x is None else x
        target = self.target if target is None else target
        if self.mode == 'infer':
            with torch.no_grad(), _autocast(x.device, self.precision):
                return self.fn(x)
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(x.device, self.precision):
            loss = self.loss_fn(self.fn(x), target)
        loss.backward()
        self.optimizer.step()
        return loss


class OnnxRuntimeStep:
    """onnxruntime's inference on the benchmark's fixed batch, handed over as a numpy array once."""

    def __init__(self, session, x: torch.Tensor):
        self.session = session
        self.feed = {session.get_inputs()[0].name: x.detach().cpu().contiguous().numpy()}

    def prepare(self):
        pass

    def __call__(self):
        return self.session.run(None, self.feed)


class Progress:
    """Occasional progress lines on stderr (at most one per ``every`` seconds)."""

    def __init__(self, quiet: bool, every: float = 10.0):
        self.quiet, self.every, self.last = quiet, every, time.perf_counter()

    def say(self, text: str, force: bool = False):
        now = time.perf_counter()
        if not self.quiet and (force or now - self.last >= self.every):
            print(f"benchmark: {text}", file=sys.stderr, flush=True)
            self.last = now


def run_interleaved(steps: Dict[str, Callable], warmup: int, iters: int, device: torch.device,
                    progress: Progress, label: str) -> Dict[str, List[float]]:
    """Warm up, then time ``iters`` steps of every model, one of each per iteration, swapping the order
    every iteration. Returns the per-step wall times in seconds."""
    names = list(steps)
    for s in steps.values():
        s.prepare()
    t0 = time.perf_counter()
    for i in range(warmup):
        for name in (names if i % 2 == 0 else names[::-1]):
            steps[name]()
            _sync(device)
        progress.say(f"{label}: warm-up {i + 1}/{warmup} ({time.perf_counter() - t0:.0f} s)")
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
        progress.say(f"{label}: step {i + 1}/{iters}, median so far " + ', '.join(
            f"{n} {statistics.median(t) * 1e3:.0f} ms" for n, t in times.items()))
    return times


class _CpuPeakRss:
    """Peak resident-set increase of this process across a block of work (Linux).

    Freed heap memory is first handed back to the system (``malloc_trim``) and the kernel's high-water
    mark reset (writing 5 to ``/proc/self/clear_refs``), so that ``VmHWM - VmRSS(before)`` is the block's
    own peak. Without ``clear_refs`` the growth of ``ru_maxrss`` is used, which only sees new maxima of
    the process."""

    def __init__(self):
        self._trim = None
        path = ctypes.util.find_library('c')
        if path:
            try:
                self._trim = ctypes.CDLL(path).malloc_trim
            except (OSError, AttributeError):
                self._trim = None
        self.resettable = self._reset_hwm()
        self.method = ('cpu-rss: VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS before the step'
                       if self.resettable else 'cpu-rss: growth of getrusage ru_maxrss (new process maxima only)')

    @staticmethod
    def _status_kb(field: str) -> int:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
        raise OSError(field)

    def _reset_hwm(self) -> bool:
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            self._status_kb('VmHWM')
            return True
        except OSError:
            return False

    def _maxrss_kb(self) -> int:
        import resource  # Unix only
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r // 1024 if sys.platform == 'darwin' else r

    def measure(self, fn: Callable[[], object]) -> float:
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        if self.resettable:
            self._reset_hwm()
            before = self._status_kb('VmRSS')
            fn()
            return max(self._status_kb('VmHWM') - before, 0) / 1024
        before = self._maxrss_kb()
        fn()
        return max(self._maxrss_kb() - before, 0) / 1024


class _CpuPeakTensors:
    """Peak of the bytes of live tensors allocated during a block of work, from the memory timeline of
    ``torch.profiler`` (every allocation and free of the CPU allocator, kernels' scratch included): the
    running sum of allocations minus frees, its maximum. Independent of the C allocator's slack and of the
    state of its heap, unlike the resident set."""

    method = 'cpu-tensors: peak of live tensor bytes allocated during the step (torch.profiler memory timeline)'

    def measure(self, fn: Callable[[], object]) -> float:
        from torch.profiler import ProfilerActivity, profile
        try:
            from torch.profiler._memory_profiler import Action
        except ImportError as e:
            raise UserError(f'--cpu-memory tensors: this torch ({torch.__version__}) has no profiler memory '
                            f'timeline ({e}); use --cpu-memory rss') from None
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        try:
            timeline = prof._memory_profile().timeline
        except (AttributeError, RuntimeError) as e:
            raise UserError(f'--cpu-memory tensors: the profiler gave no memory timeline ({e}); '
                            f'use --cpu-memory rss') from None
        live = peak = 0
        for _, action, _, size in timeline:
            if action == Action.CREATE:
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return peak / 2 ** 20


def _uses_cuda_graphs(compile_mode: Optional[str]) -> bool:
    """Whether torch.compile's mode replays CUDA graphs ('reduce-overhead', 'max-autotune')."""
    if compile_mode is None:
        return False
    return bool(list_mode_options(compile_mode).get('triton.cudagraphs'))


def peak_memory_mb(step: Step, device: torch.device, cpu_probe) -> float:
    step.prepare()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = step()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) / 2 ** 20

    def work():
        out = step()
        del out
    return cpu_probe.measure(work)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, progress: Progress,
                        min_seconds: float = 2.0) -> float:
    """GFLOP/s of the fastest of several ``size`` x ``size`` GEMMs (2 * size^3 FLOPs each), repeated for
    at least ``min_seconds``. The benchmark probes twice, before and after the model steps, and keeps the
    higher figure."""
    g = torch.Generator(device='cpu').manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    progress.say(f"matmul peak: {size}x{size} {str(dtype).replace('torch.', '')} GEMM", force=True)
    torch.mm(a, b)
    _sync(device)
    best, spent, runs = float('inf'), 0.0, 0
    while runs < 3 or (spent < min_seconds and runs < 50):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        dt = time.perf_counter() - start
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return 2 * size ** 3 / best / 1e9


def _percentile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---- environment and output -------------------------------------------------------------------------

def environment(device: torch.device) -> Dict:
    cpu = cpu_kernel.cpu_model_name() or platform.processor() or ''
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
               sequencer=__version__, torch=torch.__version__, timm=timm.__version__,
               python=platform.python_version(), cpu=cpu, cpu_isa=cpu_kernel.isa_level(), cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(), device=device.type,
               device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu,
               aten_cpu_capability=torch.backends.cpu.get_cpu_capability())
    sig = cpu_kernel.cpu_signature()   # vendor, family and model numbers: what the model name may not tell apart
    for key in ('vendor', 'family', 'model', 'features'):
        if key in sig:
            env[f'cpu_{key}' if key != 'model' else 'cpu_model_number'] = sig[key]
    if device.type != 'cuda':
        env['device_name'] = cpu_kernel.cpu_description()
    limits = cpu_kernel.isa_limits()
    if limits:   # instruction sets held below the processor's (e.g. as on an AVX2 processor)
        env['isa_limits'] = limits
    return env


FIELDS = ('model', 'impl', 'timm_model', 'mode', 'device', 'precision', 'batch_size', 'input_size', 'compile',
          'rnn_engine', 'fused_mlp', 'fused_norm', 'gemm', 'grad_checkpointing', 'threads', 'warmup', 'iters',
          'img_per_s', 'latency_ms_median',
          'latency_ms_p90', 'latency_ms_mean', 'peak_mem_mb', 'memory_method', 'gmacs_per_img', 'gmac_per_s',
          'gflop_per_s', 'matmul_peak_gflop_s', 'fraction_of_peak', 'ratio_vs_timm', 'ratio_vs_timm_median',
          'ours_ratio', 'ours_ratio_median',
          'torch', 'timm', 'onnxruntime', 'python', 'cpu', 'device_name', 'date')


def _fmt(v) -> str:
    if v is None:
        return ''
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_results(path: str, rows: List[Dict], env: Dict, fields: Sequence[str] = FIELDS, **extra):
    """``rows`` to ``path``: JSON ``{'environment', 'results', **extra}``, or CSV with ``fields`` as columns."""
    if path.lower().endswith('.json'):
        write_text(path, json.dumps({'environment': env, 'results': rows, **extra}, indent=2) + '\n')
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(r.get(k)) for k in fields})
    write_text(path, buf.getvalue())


def summary(rows: List[Dict]) -> str:
    cols = [('impl', 'impl', '{}'), ('mode', 'mode', '{}'), ('img/s', 'img_per_s', '{:.2f}'),
            ('median ms', 'latency_ms_median', '{:.1f}'), ('p90 ms', 'latency_ms_p90', '{:.1f}'),
            ('peak MB', 'peak_mem_mb', '{:.0f}'), ('GMAC/s', 'gmac_per_s', '{:.1f}'),
            ('of peak', 'fraction_of_peak', '{:.0%}')]
    table = [[c[0] for c in cols]]
    for r in rows:
        table.append([fmt.format(r[k]) if r.get(k) is not None else '-' for _, k, fmt in cols])
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ['  '.join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths))).rstrip()
             for line in table]
    for r in rows:
        if r.get('ours_ratio') is not None:
            lines.append(f"{r['mode']}: ours / {r['impl']} = {r['ours_ratio']:.3f}x throughput "
                         f"({r['ours_ratio_median']:.3f}x by median step time)")
    return '\n'.join(lines)


# ---- the command ------------------------------------------------------------------------------------

def run(args) -> int:
    input_size = _check_args(args)
    gemm.set_backend(getattr(args, 'gemm', 'auto'))
    packing = gemm.packing_on() if getattr(args, 'pack_weights', False) else contextlib.nullcontext()
    try:
        with packing:
            if getattr(args, 'data', None) is not None:
                return run_data(args, input_size)
            return run_synthetic(args, input_size)
    finally:
        gemm.set_backend(None)


def run_synthetic(args, input_size) -> int:
    """The model(s) on a fixed random batch: ours, timm's and onnxruntime's alternately."""
    layers = _parse_layers(args.layers)
    overrides = {'layers': layers} if layers is not None else {}
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    _check_precision(device, args.precision)
    compile_ = args.compile or args.compile_mode is not None
    progress = Progress(args.quiet)
    env = environment(device)
    if args.malloc_tuning:
        env['malloc_tuning'] = keep_freed_memory()
        progress.say('malloc tuning: ' + ('freed heap memory stays mapped' if env['malloc_tuning']
                                          else 'not available here (glibc only): no effect'), force=True)

    torch.manual_seed(args.seed)
    ours = build_ours(args, input_size, overrides)
    check_input_size(ours, input_size, '--input-size' if args.input_size else '--img-size')
    models = {OURS: ours}
    timm_names: Dict[str, str] = {}   # impl label -> timm model name
    compare = _comparisons(args)
    if compare is not None:
        for wanted in compare or [None]:
            model, name = build_timm(args, ours, input_size, overrides, wanted)
            label = TIMM if name == timm_name_for(args.model) else f'{TIMM}:{name}'
            models[label], timm_names[label] = model, name
    macs = count_flops(ours, input_size)
    for m in models.values():
        m.to(device)
        if args.grad_checkpointing:
            m.set_grad_checkpointing(True)

    peak = None
    if args.matmul_peak:
        size = args.matmul_size or (8192 if device.type == 'cuda' else 2048)
        peak = measure_matmul_peak(device, PRECISIONS[args.precision], size, progress)
        progress.say(f"matmul peak: {peak:.1f} GFLOP/s", force=True)

    g = torch.Generator(device='cpu').manual_seed(args.seed)
    x = torch.randn(args.batch_size, *input_size, generator=g).to(device)
    target = torch.randint(0, max(args.num_classes, 1), (args.batch_size,), generator=g).to(device)
    session, ort_info = None, None
    if getattr(args, 'compare_onnxruntime', False):
        progress.say(f"onnxruntime: exporting {args.model} to ONNX and checking onnxruntime's output against ours",
                     force=True)
        session, ort_info = build_onnxruntime(ours, x, torch.get_num_threads(), args.seed)
        env['onnxruntime'], env['onnx'] = ort_info['onnxruntime'], ort_info['onnx']
        env['onnxruntime_check'] = {k: v for k, v in ort_info.items() if k not in ('onnxruntime', 'onnx')}
        progress.say(f"onnxruntime {ort_info['onnxruntime']}: max |difference| from ours "
                     f"{ort_info['max_abs_difference']:.3g} ({ort_info['relative_difference']:.3g} of the largest "
                     f"output)", force=True)
    cpu_probe = None
    if device.type == 'cpu' and not args.no_memory:
        cpu_probe = _CpuPeakTensors() if args.cpu_memory == 'tensors' else _CpuPeakRss()
    mem_method = None if args.no_memory else ('cuda-max-allocated' if device.type == 'cuda' else cpu_probe.method)

    rows, engines, gemms = [], [], []
    for mode in (('infer', 'train') if args.mode == 'both' else (args.mode,)):
        compiled = {name: compile_ and not (name != OURS and args.timm_eager) for name in models}
        steps: Dict[str, Callable] = {name: Step(m, mode, x, target, args.precision, args.compile_mode,
                                                 compiled[name]) for name, m in models.items()}
        if session is not None and mode == 'infer':
            steps[ORT], compiled[ORT] = OnnxRuntimeStep(session, x), False
        progress.say(f"{mode}: {args.model} batch {args.batch_size}, {' vs '.join(steps)}, "
                     f"{args.warmup} warm-up + {args.iters} measured steps each", force=True)
        times = run_interleaved(steps, args.warmup, args.iters, device, progress, mode)
        mems = {}
        if not args.no_memory:
            for name, s in steps.items():
                if device.type == 'cuda' and compiled[name] and _uses_cuda_graphs(args.compile_mode):
                    continue   # the graphs' memory pool was allocated at capture: a replay's peak omits it
                if name == ORT:
                    continue   # its arena keeps memory between runs; torch's profiler does not see it
                mems[name] = peak_memory_mb(s, device, cpu_probe)
        work = macs * (3 if mode == 'train' else 1)
        engine = _resolved_engine(ours, mode, device, args.precision, compiled=compile_)
        fused_mlp = _fused_mlp_active(ours, mode, device, args.precision, compile_)
        fused_norm = _fused_norm_active(ours, device, compile_)
        engines.append(f"{mode}: {engine}" + (' + fused MLP' if fused_mlp else '')
                       + (' + fused norm' if fused_norm else ''))
        gemm_label = _gemm_label(ours, device, args.precision, compile_)   # chosen in the warm-up
        gemms.append(gemm_label)
        for name, ts in times.items():
            mean = sum(ts) / len(ts)
            ips = args.batch_size / mean
            same_arch = name in (OURS, TIMM, ORT)   # the MAC count is ours: other architectures get none
            row = dict(model=args.model, impl=name, timm_model=timm_names.get(name), mode=mode, device=device.type,
                       precision=args.precision, batch_size=args.batch_size,
                       input_size='x'.join(map(str, input_size)), compile=compiled[name],
                       rnn_engine={OURS: engine, ORT: 'ONNX LSTM'}.get(name, 'nn.LSTM'),
                       fused_mlp=fused_mlp and name == OURS, fused_norm=fused_norm and name == OURS,
                       gemm=gemm_label if name == OURS else None,
                       grad_checkpointing=args.grad_checkpointing,
                       threads=torch.get_num_threads(), warmup=args.warmup, iters=args.iters,
                       img_per_s=ips, latency_ms_median=statistics.median(ts) * 1e3,
                       latency_ms_p90=_percentile(ts, 0.9) * 1e3, latency_ms_mean=mean * 1e3,
                       peak_mem_mb=mems.get(name), memory_method=mem_method,
                       gmacs_per_img=macs / 1e9 if same_arch else None,
                       gmac_per_s=ips * work / 1e9 if same_arch else None,
                       gflop_per_s=2 * ips * work / 1e9 if same_arch else None,
                       matmul_peak_gflop_s=peak,
                       fraction_of_peak=(2 * ips * work / 1e9 / peak) if peak and same_arch else None,
                       ratio_vs_timm=None, ratio_vs_timm_median=None, ours_ratio=None, ours_ratio_median=None,
                       onnxruntime=env.get('onnxruntime'),
                       **{k: env[k] for k in ('torch', 'timm', 'python', 'cpu', 'device_name', 'date')})
            rows.append(row)
        mode_rows = rows[-len(times):]
        ours_row = mode_rows[0]
        for other in mode_rows[1:]:   # ours / theirs, in each row of theirs; the first timm comparison also in ours
            other['ours_ratio'] = ours_row['img_per_s'] / other['img_per_s']
            other['ours_ratio_median'] = other['latency_ms_median'] / ours_row['latency_ms_median']
            if ours_row['ratio_vs_timm'] is None and other['impl'] != ORT:
                ours_row['ratio_vs_timm'] = other['ours_ratio']
                ours_row['ratio_vs_timm_median'] = other['ours_ratio_median']
        del steps
        gc.collect()
        if args.results_file:  # partial results survive an interrupted long run
            write_results(args.results_file, rows, env)

    if args.matmul_peak:  # a second probe: on a shared machine the first may have met a busy moment
        peak2 = measure_matmul_peak(device, PRECISIONS[args.precision], size, progress)
        progress.say(f"matmul peak, second probe: {peak2:.1f} GFLOP/s", force=True)
        if peak2 > peak:
            peak = peak2
            for r in rows:
                r['matmul_peak_gflop_s'] = peak
                r['fraction_of_peak'] = r['gflop_per_s'] / peak if r['gflop_per_s'] is not None else None

    print(f"{args.model}  input {'x'.join(map(str, input_size))}  batch {args.batch_size}  {args.precision}  "
          f"{device.type} ({env['device_name']}, {torch.get_num_threads()} threads)  compile={compile_}  "
          f"engine ({', '.join(engines)})  grad_checkpointing={args.grad_checkpointing}  {macs / 1e9:.2f} GMACs/img"
          + (f"  matmul peak {peak:.1f} GFLOP/s" if peak else ''))
    if device.type == 'cpu' and env.get('isa_limits'):
        print('instruction sets held below this processor\'s: '
              + ', '.join(f'{k}={v}' for k, v in env['isa_limits'].items())
              + (' (not onnxruntime\'s kernels)' if ort_info else ''))
    gemm_labels = list(dict.fromkeys(g for g in gemms if g))
    if gemm_labels:
        print(f"GEMMs of our fast engine: {gemm_labels[-1]}")
    for label, name in timm_names.items():
        print(f"compared with timm's {name}" + (' (same weights)' if label == TIMM else ' (its own initialisation)')
              + ', timed alternately' + (" (timm's model eager)" if args.timm_eager else ''))
    if ort_info:
        print(f"compared with onnxruntime {ort_info['onnxruntime']} (inference): our model exported to ONNX opset "
              f"{ort_info['opset']} ({ort_info['exporter']} exporter), {ort_info['provider']}, "
              f"{ort_info['intra_op_threads']} intra-op threads, timed alternately; max |difference| from ours "
              f"{ort_info['max_abs_difference']:.3g} ({ort_info['relative_difference']:.3g} of the largest output)")
    if mem_method:
        print(f"peak memory: {mem_method}")
    print(summary(rows))
    if args.results_file:
        write_results(args.results_file, rows, env)
        print(f"results written to {args.results_file}")
    return 0


DATA_FIELDS = ('measurement', 'model', 'layers', 'mode', 'device', 'precision', 'batch_size', 'input_size', 'compile',
               'rnn_engine', 'gemm', 'grad_checkpointing', 'workers', 'threads', 'warmup', 'iters', 'seconds',
               'img_per_s', 'img_per_s_per_process', 'latency_ms_mean', 'latency_ms_median', 'latency_ms_p90', 'data',
               'images', 'classes', 'transform', 'pace', 'end_to_end_fraction', 'workers_needed_estimate',
               'torch', 'timm', 'python', 'cpu', 'device_name', 'date')
VERDICT_KEYS = ('pace', 'end_to_end_fraction', 'workers_needed_estimate')


def run_data(args, input_size) -> int:
    """``--data DIR``: the loader alone, the synthetic step and the two together, and which sets the pace."""
    layers = _parse_layers(args.layers)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    _check_precision(device, args.precision)
    compile_ = args.compile or args.compile_mode is not None
    workers = data_benchmark.default_workers() if args.workers is None else args.workers
    progress = Progress(args.quiet)
    env = environment(device)
    if args.malloc_tuning:
        env['malloc_tuning'] = keep_freed_memory()

    dataset, folder, classes = data_benchmark.open_dataset(args.data, args.mode)
    if args.mode == 'train' and classes > args.num_classes:
        raise UserError(f"--num-classes {args.num_classes}: fewer than the {classes} classes of {folder}")
    torch.manual_seed(args.seed)
    model = build_ours(args, input_size, {'layers': layers} if layers is not None else {})
    check_input_size(model, input_size, '--input-size' if args.input_size else '--img-size')
    model.to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)

    # the loader's counts in whole rounds of its processes (data_benchmark's docstring); one epoch serves all
    warmup, iters = data_benchmark.rounds(max(args.warmup, 1), workers), data_benchmark.rounds(args.iters, workers)
    repeats = data_benchmark.repeats_for(warmup + iters, args.batch_size, len(dataset))
    train_args = data_benchmark.train_arguments(args.data, os.path.relpath(folder, args.data), args.batch_size,
                                                workers, input_size, args.seed, repeats, device,
                                                device_augment=args.device_augment)
    loaders = data_benchmark.DataLoaders(args.mode, dataset, train_args, model, device, args.num_classes)
    processes = f"{workers} loader process{'es' if workers != 1 else ''}" if workers else 'loading in-process'
    progress.say(f"data: {len(dataset)} images, {classes} classes in {folder}; {loaders.description}; "
                 f"{processes}", force=True)

    common = dict(model=args.model, layers=','.join(map(str, layers)) if layers is not None else None,
                  mode=args.mode, device=device.type, precision=args.precision,
                  batch_size=args.batch_size, input_size='x'.join(map(str, input_size)), compile=compile_,
                  grad_checkpointing=args.grad_checkpointing, threads=torch.get_num_threads(), data=folder,
                  images=len(dataset), classes=classes, transform=loaders.description,
                  **{k: env[k] for k in ('torch', 'timm', 'python', 'cpu', 'device_name', 'date')})
    rows: List[Dict] = []

    def save(**extra):
        if args.results_file:   # partial results survive an interrupted long run
            write_results(args.results_file, rows, env, DATA_FIELDS, **extra)

    # 1. the loader alone: batches received, nothing done with them
    progress.say(f"loader alone: {warmup} warm-up + {iters} measured batches of {args.batch_size}", force=True)
    seconds = data_benchmark.time_batches(loaders.host, warmup, iters, lambda images, targets: None,
                                          lambda: None, progress.say, 'loader')
    loader_ips = iters * args.batch_size / seconds
    rows.append(dict(common, measurement='loader', workers=workers, warmup=warmup, iters=iters, seconds=seconds,
                     img_per_s=loader_ips, img_per_s_per_process=loader_ips / max(workers, 1),
                     latency_ms_mean=seconds / iters * 1e3))
    save()
    paced_by = loader_ips
    if args.device_augment:   # 1b. the loader and the device's decoding and augmentation, still without a step
        progress.say(f"loader + device augmentation: {warmup} warm-up + {iters} measured batches", force=True)
        seconds = data_benchmark.time_batches(loaders.feed, warmup, iters, lambda images, targets: None,
                                              lambda: _sync(device), progress.say, 'loader + device')
        paced_by = iters * args.batch_size / seconds
        rows.append(dict(common, measurement='loader_and_device', workers=workers, warmup=warmup, iters=iters,
                         seconds=seconds, img_per_s=paced_by, latency_ms_mean=seconds / iters * 1e3))
        save()

    # 2. the synthetic step: the same model, batch, precision and device on a fixed random batch
    g = torch.Generator(device='cpu').manual_seed(args.seed)
    x = torch.randn(args.batch_size, *input_size, generator=g).to(device)
    target = torch.randint(0, max(args.num_classes, 1), (args.batch_size,), generator=g).to(device)
    step = Step(model, args.mode, x, target, args.precision, args.compile_mode, compile_)
    progress.say(f"synthetic step: {args.model} batch {args.batch_size}, {args.warmup} warm-up + {args.iters} "
                 f"measured steps", force=True)
    times = run_interleaved({OURS: step}, args.warmup, args.iters, device, progress, 'synthetic')[OURS]
    engine = _resolved_engine(model, args.mode, device, args.precision, compiled=compile_)
    gemm_label = _gemm_label(model, device, args.precision, compile_)
    synthetic_ips = args.batch_size * len(times) / sum(times)
    rows.append(dict(common, measurement='synthetic', rnn_engine=engine, gemm=gemm_label, warmup=args.warmup,
                     iters=args.iters, seconds=sum(times), img_per_s=synthetic_ips,
                     latency_ms_mean=sum(times) / len(times) * 1e3, latency_ms_median=statistics.median(times) * 1e3,
                     latency_ms_p90=_percentile(times, 0.9) * 1e3))
    save()

    # 3. end to end: the step fed by the loader, batches copied to the device (by the prefetcher on CUDA) and
    # mixed (mixup / cutmix) there, as the training command does
    def fed_step(images, targets):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if loaders.mixup is not None:
            images, targets = loaders.mixup(images, targets)
        step(images, targets)

    step.prepare()
    progress.say(f"end to end: {warmup} warm-up + {iters} measured steps fed by the loader", force=True)
    seconds = data_benchmark.time_batches(loaders.feed, warmup, iters, fed_step, lambda: _sync(device),
                                          progress.say, 'end to end')
    e2e_ips = iters * args.batch_size / seconds
    rows.append(dict(common, measurement='end_to_end', rnn_engine=engine, gemm=gemm_label, workers=workers,
                     warmup=warmup, iters=iters, seconds=seconds, img_per_s=e2e_ips,
                     latency_ms_mean=seconds / iters * 1e3))

    # 4. where a loader process's time goes (decoding, each augmentation), and the verdict
    stages = data_benchmark.stage_times(loaders.host.dataset)
    verdict = data_benchmark.verdict(paced_by, synthetic_ips, e2e_ips, workers, os.cpu_count(),
                                     processes_alone=loader_ips if args.device_augment else None)
    for r in rows:   # in every row too, for the CSV
        r.update({k: verdict[k] for k in VERDICT_KEYS})
    save(verdict=verdict, loader_stages_ms_per_image=stages)

    print(f"{args.model}  {args.mode}  input {'x'.join(map(str, input_size))}  batch {args.batch_size}  "
          f"{args.precision}  {device.type} ({env['device_name']}, {torch.get_num_threads()} threads)  "
          f"compile={compile_}  engine {engine}")
    if gemm_label:
        print(f"GEMMs of our fast engine: {gemm_label}")
    print(f"data: {folder}, {len(dataset)} images, {classes} classes; {processes}")
    print(f"{loaders.description}")
    table = [('measurement', 'batches', 'img/s', 'per process', 'ms/batch')]
    for r in rows:
        per = r.get('img_per_s_per_process')
        table.append((r['measurement'].replace('_', ' '), f"{r['warmup']}+{r['iters']}", f"{r['img_per_s']:.1f}",
                      f"{per:.1f}" if per is not None else '-', f"{r['latency_ms_mean']:.1f}"))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print('  '.join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))).rstrip())
    print(data_benchmark.describe_stages(stages))
    print(data_benchmark.describe(verdict))
    if args.results_file:
        print(f"results written to {args.results_file}")
    return 0


def main(argv=None) -> int:
    """Entry point of the root ``benchmark.py``: the same options as ``sequencer benchmark``."""
    parser = Parser(prog='benchmark.py', description=__doc__.split('\n\n')[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return run(args) or 0
    except UserError as e:
        print(f"benchmark.py: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmark.py: interrupted", file=sys.stderr)
        return 130
