"""Weight files: reading them safely, recognising their layout, converting, loading.

Layouts recognised (after unwrapping a training checkpoint's ``state_dict`` / ``model`` /
``state_dict_ema`` and a DDP ``module.`` prefix):

* the reference code's: ``blocks.{stage}.{i}...``, the downsample as ``blocks.{stage}.{depth}.down``,
  ``head.weight``;
* timm's, which is also this project's own: ``stages.{stage}.blocks.{i}...``,
  ``stages.{stage}.downsample.down``, ``head.fc.weight``.

Pickled files are opened with ``weights_only=True``: they cannot execute code when loaded.
"""
import hashlib
import os
import re
import socket
import warnings
import zipfile
from typing import Dict, Iterable, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import UserError, first_line

__all__ = ['CheckpointError', 'load_checkpoint', 'load_pretrained', 'read_state_dict', 'convert_state_dict',
           'resolve_path']

_WRAPPERS = ('state_dict', 'model', 'state_dict_ema', 'model_ema')


class CheckpointError(UserError):
    """A weight file that cannot be read or does not fit the model; the message is one line."""


def resolve_path(path_or_url: str, check_hash: Optional[str] = None) -> str:
    """A local file for a path, an http(s) URL (via the torch hub cache) or an ``hf-hub:org/name`` id."""
    path_or_url = os.fspath(path_or_url)
    if path_or_url.startswith('hf-hub:'):
        return _from_hub(path_or_url)
    if path_or_url.startswith(('http://', 'https://')):
        name = os.path.basename(urlparse(path_or_url).path)
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
        if not os.path.exists(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            try:
                torch.hub.download_url_to_file(path_or_url, cached, hash_prefix=None, progress=True)
            except Exception as e:
                raise CheckpointError(f"{path_or_url}: download failed ({type(e).__name__}: {e})") from None
        if check_hash:
            _check_sha256(cached, check_hash)
        return cached
    if not os.path.isfile(path_or_url):
        raise CheckpointError(f"{path_or_url}: no such checkpoint file")
    if check_hash:
        _check_sha256(path_or_url, check_hash)
    return path_or_url


_HUB_FILES = ('model.safetensors', 'pytorch_model.bin')
_PROXY_VARS = ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'ALL_PROXY', 'all_proxy')


def _hub_unreachable(endpoint: str, timeout: float = 5.0) -> Optional[str]:
    """Why the hub at ``endpoint`` cannot be reached ('HOST cannot be reached (...)'), or None: a name that
    does not resolve or a refused or timed-out connection to its first address (the endpoint's port).
    Not checked through a proxy (the proxy decides) or without a host name."""
    u = urlparse(endpoint)
    if not u.hostname or any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    try:
        port = u.port or (443 if u.scheme == 'https' else 80)
        family, kind, proto, _, address = socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout)
            s.connect(address)
    except (OSError, ValueError) as e:
        return f"{u.hostname} cannot be reached ({e})"
    return None


def _from_hub(spec: str) -> str:
    """A local file for an ``hf-hub:org/name`` id: downloaded (or found up to date in the cache) by
    huggingface_hub. Where the hub cannot be reached (a short check first: offline, huggingface_hub retries
    each request for tens of seconds before it gives up) or ``HF_HUB_OFFLINE`` is set, the cached copy,
    else one line saying why."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import validate_repo_id
    repo = spec[len('hf-hub:'):]
    try:
        validate_repo_id(repo)
    except Exception as e:  # HFValidationError
        raise CheckpointError(f"{spec}: not a Hugging Face repository id ({first_line(e)})") from None
    offline = 'HF_HUB_OFFLINE is set' if getattr(constants, 'HF_HUB_OFFLINE', False) else \
        _hub_unreachable(constants.ENDPOINT)
    if offline:
        for filename in _HUB_FILES:
            try:
                return hf_hub_download(repo, filename, local_files_only=True)
            except Exception:  # not in the cache
                pass
        raise CheckpointError(f"{spec}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                              f"{offline}; fetch it where there is a network, or pass a local file")
    errors = []
    for filename in _HUB_FILES:
        try:
            return hf_hub_download(repo, filename)
        except Exception as e:  # missing file, unknown repo, network
            errors.append(f"{filename}: {type(e).__name__}")
    raise CheckpointError(f"{spec}: could not fetch weights from the Hugging Face hub ({'; '.join(errors)})")


def _check_sha256(path: str, expected: str):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    if not h.hexdigest().startswith(expected):
        raise CheckpointError(f"{path}: sha256 {h.hexdigest()[:12]} does not match the expected {expected}")


def _format(path: str) -> str:
    """'torch' (a torch.save zip or pickle), 'safetensors', 'empty' or '' (anything else), from the leading bytes."""
    with open(path, 'rb') as f:
        head = f.read(9)
    if not head:
        return 'empty'
    if head.startswith(b'PK\x03\x04') or (head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5):
        return 'torch'  # zip archive, or pickle protocol 2-5
    if len(head) == 9 and head[8:] == b'{' and 8 + int.from_bytes(head[:8], 'little') <= os.path.getsize(path):
        return 'safetensors'  # 8-byte little-endian header length, then the JSON header
    return ''


def _check_archive(path: str) -> None:
    """A torch.save zip archive whose stored checksums do not match its bytes (torch.load does not check them, and
    would load the damaged tensors) raises ``CheckpointError``; a pickle has no checksum to check."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (damaged archive: {first_line(e)})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: not a readable checkpoint (damaged: the checksum of {bad} does not match; "
                              "the file was corrupted after it was written)")


def read_file(path: str) -> Dict:
    """The raw object of a torch.save (.pth / .pt / .bin) or safetensors file, whatever its name; pickles are read
    with weights_only=True. A file of another kind, or one that holds no tensors, raises ``CheckpointError``."""
    path = os.fspath(path)
    try:
        kind = _format(path)
        if kind == 'safetensors':
            from safetensors.torch import load_file
            obj = load_file(path, device='cpu')
        elif kind == 'torch':
            _check_archive(path)
            with warnings.catch_warnings():   # an old pickle protocol is no reason to print more than one line
                warnings.filterwarnings('ignore', message='.*pickle protocol', category=UserWarning)
                obj = torch.load(path, map_location='cpu', weights_only=True)
        else:
            what = 'the file is empty' if kind == 'empty' else 'not a PyTorch (torch.save) or safetensors file'
            raise CheckpointError(f"{path}: not a readable checkpoint ({what})")
    except CheckpointError:
        raise
    except Exception as e:
        msg = first_line(e)
        if 'weights_only' in str(e):  # a real pickle the safe unpickler rejected
            msg = 'it holds Python objects that would execute code when unpickled; refusing to load it'
        raise CheckpointError(f"{path}: not a readable checkpoint ({msg})") from None
    if isinstance(obj, dict) and not (_tensors(obj) or _tensors(obj, use_ema=True)):
        raise CheckpointError(f"{path}: holds no weights (no tensors; keys: {_summarise(map(str, obj)) or 'none'})")
    return obj


def _tensors(obj: Dict, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of ``obj`` or of its first non-empty wrapper (``state_dict``, ``model``, ...)."""
    order = ('state_dict_ema', 'model_ema') + _WRAPPERS if use_ema else _WRAPPERS
    for key in order:
        if isinstance(obj.get(key), dict) and obj[key]:
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def unwrap(obj, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a training checkpoint (``state_dict_ema`` first when ``use_ema``)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict of tensors, found {type(obj).__name__}")
    sd = _tensors(obj, use_ema)
    if not sd:
        raise CheckpointError("holds no weights (no tensors)")
    if all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path_or_url: str, use_ema: bool = False, sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    path = resolve_path(path_or_url, check_hash=sha256)
    try:
        return unwrap(read_file(path), use_ema=use_ema)
    except CheckpointError as e:
        if str(e).startswith(path):
            raise
        raise CheckpointError(f"{path}: {e}") from None


_REF_DOWN = re.compile(r'^blocks\.(\d+)\.\d+\.down\.')
_REF_BLOCK = re.compile(r'^blocks\.(\d+)\.(\d+)\.')


def convert_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Any recognised layout -> this project's (timm's) layout."""
    if not any(k.startswith('blocks.') for k in sd):
        return dict(sd)  # already timm / project layout
    out = {}
    for k, v in sd.items():
        k = _REF_DOWN.sub(lambda m: f'stages.{int(m.group(1)) + 1}.downsample.down.', k)
        k = _REF_BLOCK.sub(r'stages.\1.blocks.\2.', k)
        if k in ('head.weight', 'head.bias'):
            k = 'head.fc.' + k.split('.')[1]
        out[k] = v
    return out


def _summarise(keys: Iterable[str], limit: int = 6) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def _fit(model: nn.Module, sd: Dict[str, torch.Tensor], adapt_in_chans: bool = False) -> Dict[str, torch.Tensor]:
    """Adapt what may legitimately differ: a position embedding trained at another resolution, and (with
    ``adapt_in_chans``, for pretrained weights) a first convolution trained on another number of input channels,
    as timm adapts it: summed over the channels for one, repeated and rescaled for more."""
    pos = getattr(model, 'absolute_pos_embed', None)
    if isinstance(pos, torch.Tensor) and 'absolute_pos_embed' in sd and sd['absolute_pos_embed'].shape != pos.shape:
        from .sequencer import resample_pos_embed
        sd['absolute_pos_embed'] = resample_pos_embed(sd['absolute_pos_embed'], pos.shape[1:3])
    first = getattr(model, 'pretrained_cfg', {}).get('first_conv')
    key = f'{first}.weight' if first else None
    own = dict(model.named_parameters()).get(key) if key else None
    if (adapt_in_chans and own is not None and key in sd and sd[key].dim() == own.dim() == 4
            and sd[key].shape[1] != own.shape[1] and sd[key].shape[0] == own.shape[0]):
        from timm.models import adapt_input_conv
        sd[key] = adapt_input_conv(own.shape[1], sd[key], base_chans=sd[key].shape[1])
    return sd


def load_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], strict: bool = True, source: str = 'state dict',
                    reset_head: bool = False, adapt_in_chans: bool = False) -> Tuple[list, list]:
    """Load a converted state dict; strict mismatches raise one line naming the model and the keys.

    ``reset_head`` drops head weights whose shape differs (fine-tuning to another number of classes);
    ``adapt_in_chans`` adapts the first convolution to the model's number of input channels (as timm does for
    pretrained weights: grayscale or multispectral inputs).
    """
    sd = _fit(model, convert_state_dict(sd), adapt_in_chans)
    own = model.state_dict()
    if reset_head:
        sd = {k: v for k, v in sd.items() if not (k.startswith('head.') and (k not in own or own[k].shape != v.shape))}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
             for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and not (reset_head and k.startswith('head.'))]
    unexpected = [k for k in sd if k not in own]
    name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
    if wrong or (strict and (missing or unexpected)):
        parts = [f"{label}: {_summarise(keys)}" for label, keys in
                 (('wrong shape', wrong), ('missing', missing), ('unexpected', unexpected)) if keys]
        hint = ''
        if wrong and all(w.startswith('head.') for w in wrong) and 'head.fc.weight' in sd and 'head.fc.weight' in own:
            hint = (f" (the checkpoint's head has {sd['head.fc.weight'].shape[0]} classes, the model's "
                    f"{own['head.fc.weight'].shape[0]}: set the number of classes to match, or load it as "
                    f"pretrained weights to get a new head)")
        raise CheckpointError(f"{source} does not fit {name}: " + '; '.join(parts) + hint)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return missing, unexpected


def load_checkpoint(model: nn.Module, path_or_url: str, strict: bool = True, use_ema: bool = False,
                    reset_head: bool = False, sha256: Optional[str] = None, adapt_in_chans: bool = False) -> nn.Module:
    """Load weights in any recognised layout and format from a path, URL or ``hf-hub:`` id into ``model``.

    ``sha256`` (a hex prefix) is checked before the file is read; ``reset_head`` keeps the model's own
    head where the checkpoint's has another shape; ``adapt_in_chans`` adapts the first convolution to the
    model's number of input channels (``load_state_dict``).
    """
    sd = read_state_dict(path_or_url, use_ema=use_ema, sha256=sha256)
    load_state_dict(model, sd, strict=strict, source=path_or_url, reset_head=reset_head,
                    adapt_in_chans=adapt_in_chans)
    return model


def load_pretrained(model: nn.Module, spec) -> nn.Module:
    """The published weights of ``spec``: the reference release first, timm's hub copy second."""
    if not spec.weights:
        raise CheckpointError(f"{spec.name}: no published weights (models with weights: "
                              f"sequencer2d_s, sequencer2d_m, sequencer2d_l and their _392 variants)")
    errors = []
    for source in spec.weights:
        try:
            sd = read_state_dict(source)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        head = model.get_classifier()
        load_state_dict(model, sd, source=source, adapt_in_chans=True,
                        reset_head=not isinstance(head, nn.Linear) or head.out_features != 1000)
        return model
    raise CheckpointError(f"{spec.name}: published weights unavailable: " + ' | '.join(errors))
