"""Deployment formats: ONNX (run with onnxruntime) and TorchScript, each checked against the PyTorch model.

The recurrences are exported from the native engine (``torch.nn.LSTM`` / ``GRU`` / ``RNN``), which both
exporters translate into ONNX's own LSTM / GRU / RNN operators. ONNX files have a dynamic batch axis;
the spatial size is fixed at export time (``--img-size``). After writing, the file is loaded back and
run on a random batch of another size; the largest absolute difference from the PyTorch logits is
reported and must be within the tolerance (1e-4 by default) or the export fails; NaN or inf in either
output fails it too. The check runs on a temporary file beside the output, which replaces the output only once
it passes: a failed export leaves an earlier file of that name as it was. An ONNX file is self-contained (its
weights inside, no external-data side files; protobuf limits it to 2 GB, far above any Sequencer) and records
the preprocessing it expects (mean, std, resolution, crop_pct, interpolation) in its metadata_props.
"""
import argparse
import io
import json
import warnings
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..engine.args import COUNT, NONNEG
from ..engine.io import check_output, write_with
from ..engine.loading import add_model_arguments, model_from_args
from ..errors import UserError
from ..fast import set_engine

__all__ = ['export_onnx', 'export_torchscript', 'verify_onnx', 'verify_torchscript', 'ExportError']

FORMATS = ('onnx', 'torchscript')


class ExportError(UserError):
    """The exported file does not reproduce the model's outputs, or the exporter failed."""


def _prepare(model: nn.Module) -> nn.Module:
    model = model.eval().cpu().float()
    return set_engine(model, 'native')   # the paper's plain modules: standard ops only


def _input(model: nn.Module, img_size: Optional[int], batch: int, seed: int = 0) -> torch.Tensor:
    size = img_size or model.pretrained_cfg['input_size'][-1]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, getattr(model, 'in_chans', 3), size, size, generator=g)


def check_opset(opset: int, dynamo: bool = True) -> None:
    """Opsets from 17 (LayerNormalization; 18 for the dynamo exporter, whose conversion down to 17 fails on these
    models' reductions) to the newest torch's exporter supports (its own constants; a newer one fails only after
    the whole export)."""
    from torch.onnx import _constants
    newest = getattr(_constants, 'ONNX_MAX_OPSET' if dynamo else 'ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET', 10 ** 6)
    oldest = 18 if dynamo else 17
    if not oldest <= opset <= newest:
        raise UserError(f"--opset {opset}: the {'dynamo' if dynamo else 'torchscript'} exporter of this torch writes "
                        f"opsets {oldest} to {newest} of these models"
                        + (" (17, the first with LayerNormalization, with --exporter torchscript)" if dynamo else ''))


def export_onnx(model: nn.Module, path: str, img_size: Optional[int] = None, opset: int = 18,
                dynamo: bool = True, metadata: Optional[Dict[str, str]] = None,
                check: Optional[Callable[[str], None]] = None) -> Dict:
    """Write ``model`` as ONNX with a dynamic batch axis (input 'input' NCHW float32, output 'logits').

    ``dynamo=True`` uses torch.export (the supported exporter); ``False`` the TorchScript-based one.
    ``metadata`` is stored in the file's metadata_props (e.g. the preprocessing it expects). The file is
    self-contained (no external data). ``check(temporary_path)`` runs on the written file before it replaces
    ``path``; if it raises, ``path`` stays as it was. Returns a dict with the exporter used and the opset written.
    """
    check_opset(opset, dynamo)
    model = _prepare(model)
    x = _input(model, img_size, batch=2)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            if dynamo:
                program = torch.onnx.export(
                    model, (x,), input_names=['input'], output_names=['logits'], opset_version=opset, dynamo=True,
                    dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=4096)},), verbose=False)
                buf.write(program.model_proto.SerializeToString())
            else:
                torch.onnx.export(model, (x,), buf, input_names=['input'], output_names=['logits'],
                                  opset_version=opset, dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}},
                                  dynamo=False)
        except ImportError as e:
            raise ExportError(f"ONNX export needs the export extra (pip install 'sequencer-lstm[export]'): "
                              f"{e}") from None
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"ONNX export failed ({type(e).__name__}: {first[:300]})") from None
    import onnx
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    written = max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx'))
    if written != opset:   # the dynamo exporter falls back to its own opset where it cannot convert down
        raise ExportError(f"--opset {opset}: the {'dynamo' if dynamo else 'torchscript-based'} exporter wrote opset "
                          f"{written} instead (it cannot convert this model to {opset}); nothing written. Use "
                          f"--opset {written}" + (", or --exporter torchscript for opset 17" if dynamo else ''))
    data = proto.SerializeToString()
    write_with(path, lambda f: f.write(data), check=check)
    return dict(exporter='dynamo' if dynamo else 'torchscript-based', opset=written, size=x.shape[-1])


def _warn_if_constant(ref: torch.Tensor, log=print):
    if ref.abs().max().item() < 1e-6 and log is not None:
        log("export: note: the model's logits are all zero (an untrained head), so the comparison below checks "
            "little of the network; export trained weights to check it fully")


def verify_onnx(model: nn.Module, path: str, img_size: Optional[int] = None, batches: Sequence[int] = (1, 3),
                log=None) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's logits over random batches (an
    ``ExportError`` where either gives NaN/inf or the shapes differ)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(f"verifying ONNX needs onnxruntime (pip install 'sequencer-lstm[export]'): {e}") from None
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return _max_difference(model, lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]),
                           'onnxruntime', img_size, batches, log)


def _max_difference(model: nn.Module, exported, runtime: str, img_size: Optional[int],
                    batches: Sequence[int], log) -> float:
    """Largest absolute difference between ``exported(x)`` and the PyTorch logits over random batches; NaN or inf
    in either, or differing shapes, is an ``ExportError`` (``max`` would silently drop a NaN difference)."""
    model = _prepare(model)
    worst = 0.0
    for i, b in enumerate(batches):
        x = _input(model, img_size, batch=b, seed=1 + i)
        with torch.no_grad():
            ref = model(x)
            out = exported(x)
        if not torch.isfinite(ref).all():
            raise ExportError(f"PyTorch's own logits are NaN/inf for batch {b}: the model itself produces them")
        if i == 0:
            _warn_if_constant(ref, log)
        if out.shape != ref.shape:
            raise ExportError(f"{runtime} gives shape {tuple(out.shape)} for batch {b}, PyTorch "
                              f"{tuple(ref.shape)}")
        if not torch.isfinite(out).all():
            raise ExportError(f"{runtime} gives NaN/inf logits for batch {b} where PyTorch's are finite")
        worst = max(worst, (out - ref).abs().max().item())
    return worst


def export_torchscript(model: nn.Module, path: str, img_size: Optional[int] = None,
                       check: Optional[Callable[[str], None]] = None) -> Dict:
    """Write ``model`` as TorchScript (traced on the native RNN engine; any batch size). ``check``: as for
    ``export_onnx``."""
    model = _prepare(model)
    x = _input(model, img_size, batch=2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')
        try:
            traced = torch.jit.trace(model, x, check_trace=False)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"TorchScript trace failed ({type(e).__name__}: {first[:300]})") from None
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    data = buf.getvalue()
    write_with(path, lambda f: f.write(data), check=check)
    return dict(exporter='torch.jit.trace', size=x.shape[-1])


def verify_torchscript(model: nn.Module, path: str, img_size: Optional[int] = None,
                       batches: Sequence[int] = (1, 3), log=None) -> float:
    """Largest absolute difference between the TorchScript file's and PyTorch's logits over random batches (an
    ``ExportError`` where either gives NaN/inf or the shapes differ)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = torch.jit.load(path, map_location='cpu')
    return _max_difference(model, loaded, 'TorchScript', img_size, batches, log)


# ---- command --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser):
    parser.description = (
        "Export a model for deployment. onnx: an ONNX file (opset >= 17, dynamic batch axis, input 'input' "
        "N x 3 x S x S float32 normalised as for evaluation, output 'logits'); torchscript: a traced "
        "TorchScript file (torch.jit.load). The file is loaded back and run on random batches of 1 and 3 "
        "images (onnxruntime for ONNX); the largest absolute difference from the PyTorch logits is printed "
        "and must be within --tolerance, or the command fails.")
    add_model_arguments(parser, device=False)
    parser.add_argument('--format', required=True, choices=FORMATS, help='output format')
    parser.add_argument('--output', '-o', required=True, metavar='FILE', help='output file (.onnx / .pt)')
    parser.add_argument('--img-size', type=COUNT, default=None,
                        help="input resolution (default: the run's training resolution, else the model's)")
    parser.add_argument('--opset', type=int, default=18,
                        help="ONNX opset, from 17 to the newest torch's exporter supports (default: %(default)s)")
    parser.add_argument('--exporter', default='dynamo', choices=['dynamo', 'torchscript'],
                        help="ONNX exporter: torch.export ('dynamo', the supported one) or the older "
                             "TorchScript-based one, faster (default: %(default)s)")
    parser.add_argument('--tolerance', type=NONNEG, default=1e-4,
                        help='largest allowed absolute difference (default: %(default)s)')
    parser.add_argument('--no-verify', action='store_true', help='skip loading the file back and comparing')


def run(args) -> int:
    check_output(args.output, '--output')
    if args.format == 'onnx':
        check_opset(args.opset, args.exporter == 'dynamo')
    loaded = model_from_args(args, device=torch.device('cpu'))
    model = _prepare(loaded.model)
    args.img_size = args.img_size or loaded.img_size
    cfg = loaded.data_config(img_size=args.img_size)
    with torch.no_grad():
        if not torch.isfinite(model(_input(model, args.img_size, batch=1))).all():
            raise ExportError(f"{loaded.checkpoint or loaded.label}: the model itself gives NaN/inf logits (NaN/inf "
                              f"weights?); nothing exported")
    print(f"export: {loaded.label} -> {args.output} ({args.format})")
    runtime = 'onnxruntime' if args.format == 'onnx' else 'torch.jit.load'
    verify = verify_onnx if args.format == 'onnx' else verify_torchscript

    def check(tmp: str):  # on the temporary file, which replaces args.output only if this returns
        try:
            diff = verify(model, tmp, img_size=args.img_size, log=print)
        except ExportError as e:
            raise ExportError(f"{args.output}: {e}; not written") from None
        if not diff <= args.tolerance:
            raise ExportError(f"{args.output}: {runtime} differs from PyTorch by {diff:.3g} (> tolerance "
                              f"{args.tolerance:g}); not written")
        print(f"export: verified with {runtime}: max |difference| {diff:.3g} <= {args.tolerance:g} "
              f"(batches of 1 and 3)")

    check = None if args.no_verify else check
    if args.format == 'onnx':
        meta = dict(architecture=loaded.name, img_size=args.img_size, mean=list(cfg['mean']), std=list(cfg['std']),
                    crop_pct=cfg['crop_pct'], interpolation=cfg['interpolation'], num_classes=model.num_classes)
        info = export_onnx(model, args.output, img_size=args.img_size, opset=args.opset,
                           dynamo=args.exporter == 'dynamo', check=check,
                           metadata={k: json.dumps(v) if isinstance(v, list) else v for k, v in meta.items()})
        print(f"export: wrote {args.output} (ONNX opset {info['opset']}, {info['exporter']} exporter, "
              f"input N x {getattr(model, 'in_chans', 3)} x {info['size']} x {info['size']})")
    else:
        info = export_torchscript(model, args.output, img_size=args.img_size, check=check)
        print(f"export: wrote {args.output} (TorchScript, input N x {getattr(model, 'in_chans', 3)} x "
              f"{info['size']} x {info['size']})")
    if args.no_verify:
        return 0
    kind = 'grayscale' if getattr(model, 'in_chans', 3) == 1 else 'RGB'
    print(f"export: inputs are {kind} in [0, 1] normalised with mean {tuple(round(m, 4) for m in cfg['mean'])} and std "
          f"{tuple(round(s, 4) for s in cfg['std'])}, resized and centre-cropped to {args.img_size} px "
          f"(crop_pct {cfg['crop_pct']}, {cfg['interpolation']})")
    return 0
