"""Decoding and augmenting on the training device: ``sequencer train --device-augment``.

A loader process then neither decodes nor augments. It reads a file's bytes and its header, and draws the random
parameters of timm's training transform: the crop box and its interpolation, the flips, RandAugment's ops with
their magnitudes (or the colour jitter's factors). The draws are timm's own (its transform objects, called in
the same order on the same seeded generators), so a sample gets the same augmentation as timm's transform would
give it. The device then works on whole batches (``DeviceAugment``): JPEG decoding
(``torchvision.io.decode_jpeg``: nvJPEG on CUDA), the crop and antialiased resize, the flips, and the ops,
grouped by op, as tensor ops that follow Pillow's arithmetic (lookup tables, blends and the smoothing filter
exactly; the geometric ops with Pillow's positions, fill and resampling filters, up to rounding at exact
edges). Normalisation and random erasing (timm's prefetcher) and mixup / cutmix (timm's ``Mixup``) already run
on the device batch.

Files that are not RGB or grayscale JPEGs stored upright (PNG, CMYK JPEGs, JPEGs with an EXIF rotation) are
decoded in the loader process as without the flag (``data.images.open_image``), and only augmented on the
device. A JPEG whose data turns out to be corrupt is found when its batch is decoded; it is skipped
(``--bad-samples skip``) or stops the run naming its file, as on the CPU path.
"""
import copy
import io
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from ..errors import UserError
from .images import open_image

EXIF_ORIENTATION = 0x0112
# Pillow's resampling filters (the values timm's RandAugment passes as ``resample``) by name
RESAMPLE = {Image.NEAREST: 'nearest', Image.BILINEAR: 'bilinear', Image.BICUBIC: 'bicubic'}
# torch's resize mode for the crop's interpolation: antialiased as Pillow's resize always is
RESIZE = {'bilinear': dict(mode='bilinear', antialias=True), 'bicubic': dict(mode='bicubic', antialias=True),
          'nearest': dict(mode='nearest-exact')}


@dataclass
class Planned:
    """One training image as a loader process leaves it: its data and the augmentation drawn for it."""
    data: object                # the JPEG file's bytes (``encoded``), else the decoded H x W x C uint8 array
                                # (bytes and arrays pass between processes inline, tensors through shared memory)
    encoded: bool
    where: str                  # the file (or sample) it came from, for messages
    crop: Tuple[int, int, int, int]   # top, left, height, width (timm's RandomResizedCropAndInterpolation)
    interpolation: str          # of the crop's resize: a key of RESIZE
    hflip: bool
    vflip: bool
    ops: Tuple[Tuple[str, tuple, Optional[str]], ...]   # RandAugment: (op, level arguments, resampling)


class EncodedImage:
    """A file read without decoding it: its bytes, and from its header its size, format, mode and EXIF
    orientation."""

    def __init__(self, path: str, mode: str):
        with open(path, 'rb') as f:
            self.data = f.read()
        img = Image.open(io.BytesIO(self.data))   # parses the header only
        self.size, self.format, self.file_mode = img.size, img.format, img.mode
        self.orientation = img.getexif().get(EXIF_ORIENTATION, 1) if self.format == 'JPEG' else 1
        self.path, self.mode = path, mode

    def decodable_on_device(self) -> bool:
        """An RGB or grayscale JPEG stored upright: decoded on the device to what ``open_image`` gives."""
        return self.format == 'JPEG' and self.file_mode in ('RGB', 'L') and self.orientation == 1

    def pixels(self) -> Image.Image:
        """Decoded here, as every other image is read (``data.images.open_image``: EXIF orientation applied,
        16-bit and palette images converted)."""
        return open_image(io.BytesIO(self.data), self.mode)


class _Recorded:
    """What RandAugment's ops are applied to in a loader process: each op, once drawn, is recorded here."""

    def __init__(self):
        self.ops: List[Tuple[str, tuple, Optional[str]]] = []


def _op_name(fn) -> str:
    return fn.__name__.lstrip('_')   # data.loaders' posterize wraps timm's under the same name


def _recorder(name: str):
    def record(img: _Recorded, *args, resample=None, **_):
        if name in AFFINE:   # timm's geometric ops draw their resampling filter, after the magnitude
            resample = random.choice(resample) if isinstance(resample, (list, tuple)) else resample
            img.ops.append((name, tuple(args), RESAMPLE[resample]))
        else:
            img.ops.append((name, tuple(args), None))
        return img
    return record


class Plan:
    """The loader process's half (the transform given to ``data.datasets.Samples``): built from timm's training
    transform (``create_transform(..., use_prefetcher=True)``), it draws what that transform would draw, and
    leaves a ``Planned``. Transforms it cannot hand to the device are refused here, by name."""

    reads_files = True   # Samples gives it an EncodedImage rather than a decoded image

    def __init__(self, transform: transforms.Compose, channels: int):
        self.channels = channels
        self.crop: Optional[RandomResizedCropAndInterpolation] = None
        self.hflip = self.vflip = 0.
        self.randaugment: Optional[RandAugment] = None
        self.jitter: Optional[transforms.ColorJitter] = None
        self.fill = (0,) * channels
        for t in transform.transforms:
            if isinstance(t, RandomResizedCropAndInterpolation) and self.crop is None:
                self.crop = t
                modes = t.interpolation if isinstance(t.interpolation, (list, tuple)) else (t.interpolation,)
                bad = [m.value for m in modes if m.value not in RESIZE]
                if bad:
                    raise UserError(f"--device-augment: the crop's {bad[0]} interpolation is not run on the device "
                                    f"(use --train-interpolation random, bilinear, bicubic or nearest)")
            elif isinstance(t, transforms.RandomHorizontalFlip):
                self.hflip = t.p
            elif isinstance(t, transforms.RandomVerticalFlip):
                self.vflip = t.p
            elif isinstance(t, RandAugment) and self.randaugment is None and self.jitter is None:
                self.randaugment = self._recording(t)
            elif isinstance(t, transforms.ColorJitter) and t.hue is None and self.jitter is self.randaugment is None:
                self.jitter = t   # torchvision's: on a PIL image, ImageEnhance's brightness, contrast and colour
            elif not isinstance(t, MaybePILToTensor):
                raise UserError(f"--device-augment: timm's {type(t).__name__} is not run on the device (it runs "
                                f"the random-resized crop, flips, RandAugment or colour jitter without hue; leave "
                                f"out AugMix and AutoAugment policies, --no-aug, or --device-augment)")
        if self.crop is None:
            raise UserError("--device-augment: the training transform has no random-resized crop")
        self.size = self.crop.size   # (height, width)

    def _recording(self, ra: RandAugment) -> RandAugment:
        ops = []
        for op in ra.ops:
            name = _op_name(op.aug_fn)
            if name not in DEVICE_OPS:
                raise UserError(f"--device-augment: RandAugment's {op.name} is not run on the device (choose a "
                                f"policy without it, or leave out --device-augment)")
            self.fill = tuple(op.kwargs['fillcolor'])[:self.channels] if op.kwargs.get('fillcolor') else self.fill
            rec = copy.copy(op)
            rec.aug_fn = _recorder(name)
            ops.append(rec)
        recording = copy.copy(ra)
        recording.ops = ops
        return recording

    def __call__(self, img) -> Planned:
        """``img``: an EncodedImage (a file), or a decoded PIL image (datasets that are not folders)."""
        if isinstance(img, EncodedImage):
            where, encoded = img.path, img.decodable_on_device()
            pixels = None if encoded else img.pixels()
            size = img.size if encoded else pixels.size   # upright: EXIF rotations may swap the sides
            data = img.data if encoded else _pixels(pixels)
        else:
            where, size, encoded, data = 'sample', img.size, False, _pixels(img)
        shape_only = torch.empty(()).expand(1, size[1], size[0])   # all get_params reads of an image is its size
        i, j, h, w = self.crop.get_params(shape_only, self.crop.scale, self.crop.ratio)
        interp = self.crop.interpolation
        interp = random.choice(interp) if isinstance(interp, (list, tuple)) else interp
        hflip = bool(self.hflip) and torch.rand(1).item() < self.hflip   # torchvision's flips: torch's generator
        vflip = bool(self.vflip) and torch.rand(1).item() < self.vflip
        ops = self.randaugment(_Recorded()).ops if self.randaugment is not None else []
        if self.jitter is not None:   # its factors and their order, as ColorJitter draws them
            cj = self.jitter
            order, *factors = cj.get_params(cj.brightness, cj.contrast, cj.saturation, None)
            ops = [(JITTER[k], (factors[k],), None) for k in order.tolist() if k < 3 and factors[k] is not None]
        return Planned(data, encoded, where, (i, j, h, w), interp.value, hflip, vflip, tuple(ops))


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], -1)


# ---- the device's half -------------------------------------------------------------------------------------
# Every op takes a float batch (N, C, H, W) of whole values in [0, 255], its level arguments (N, k) as timm's
# RandAugment drew them, and returns the batch as Pillow would leave it (whole values in [0, 255]).

def _on(device: torch.device, values, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor of host values on ``device``, copied without waiting for the device's queued work (a
    blocking copy would make the prefetch stream wait for the training step)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L conversion (ITU-R 601-2, its fixed-point rounding), as (N, 1, H, W)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).to(x.dtype)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, x, factor)`` (ImageEnhance): clipped to [0, 255], then truncated."""
    return (degenerate + factor.view(-1, 1, 1, 1).to(x.dtype) * (x - degenerate)).clamp_(0, 255).floor_()


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per image and channel lookup tables ``lut`` (N, C, 256) applied to ``x``."""
    n, c = x.shape[:2]
    return torch.gather(lut.to(x.dtype), 2, x.reshape(n, c, -1).long()).reshape(x.shape)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    index = (x.reshape(n, c, -1).long() + torch.arange(n * c, device=x.device).view(n, c, 1) * 256).flatten()
    counts = torch.zeros(n * c * 256, dtype=torch.long, device=x.device)   # not bincount: it reads its size back
    return counts.index_add_(0, index, torch.ones_like(index)).view(n, c, 256)


def auto_contrast(x, _args):
    lo, hi = x.amin(dim=(2, 3)).double(), x.amax(dim=(2, 3)).double()   # ImageOps.autocontrast, no cutoff
    scale = 255.0 / (hi - lo).clamp(min=1)
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = (levels * scale[..., None] - (lo * scale)[..., None]).trunc().clamp(0, 255)
    lut = torch.where((hi > lo)[..., None], lut, levels)
    return _lut(x, lut)


def equalize(x, _args):
    h = _histogram(x)   # ImageOps.equalize: step from all but the last used level; identity where it is 0
    last = torch.gather(h, 2, (255 - (h.flip(2) > 0).long().argmax(2, keepdim=True)))
    step = (h.sum(2, keepdim=True) - last) // 255
    used = (h > 0).sum(2, keepdim=True)
    before = h.cumsum(2) - h
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    levels = torch.arange(256, device=x.device)
    return _lut(x, torch.where((step > 0) & (used > 1), lut, levels))


def invert(x, _args):
    return 255 - x


def solarize(x, args):
    thresh = args[:, 0].view(-1, 1, 1, 1).to(x.dtype)
    return torch.where(x >= thresh, 255 - x, x)


def solarize_add(x, args):
    add = args[:, 0].view(-1, 1, 1, 1).to(x.dtype)
    return torch.where(x < 128, (x + add).clamp_(max=255), x)


def posterize(x, args):
    bits = args[:, 0].long().clamp(0, 8)
    mask = ((0xFF << (8 - bits)) & 0xFF).view(-1, 1, 1, 1)
    return (x.to(torch.int32) & mask.to(torch.int32)).to(x.dtype)


def color(x, args):
    return _blend(_luma(x).expand_as(x), x, args[:, 0])


def contrast(x, args):
    mean = (_luma(x).mean(dim=(1, 2, 3), dtype=torch.float64) + 0.5).floor().to(x.dtype)
    return _blend(mean.view(-1, 1, 1, 1).expand_as(x), x, args[:, 0])


def brightness(x, args):
    return _blend(torch.zeros_like(x), x, args[:, 0])


def sharpness(x, args):
    kernel = _on(x.device, [[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]], x.dtype) / 13
    c = x.shape[1]
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)
    degenerate = x.clone()   # ImageFilter.SMOOTH keeps the border pixels, rounds the rest
    degenerate[:, :, 1:-1, 1:-1] = (smooth + 0.5).floor_().clamp_(0, 255)
    return _blend(degenerate, x, args[:, 0])


def desaturate(x, args):
    return color(x, (1. - args).clamp(0., 1.))


def _affine_shear_x(args, w, h):
    one, zero = torch.ones_like(args[:, 0]), torch.zeros_like(args[:, 0])
    return torch.stack([one, args[:, 0], zero, zero, one, zero], 1)


def _affine_shear_y(args, w, h):
    one, zero = torch.ones_like(args[:, 0]), torch.zeros_like(args[:, 0])
    return torch.stack([one, zero, zero, args[:, 0], one, zero], 1)


def _translate(dx, dy):
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    return torch.stack([one, zero, dx, zero, one, dy], 1)


def _affine_rotate(args, w, h):
    """Pillow's ``Image.rotate(degrees)`` about the centre, no expansion, as its inverse affine matrix."""
    angle = -torch.deg2rad(args[:, 0] % 360.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    return torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], 1)


# timm's geometric ops: their affine matrices (Pillow's AFFINE data: output pixel centre -> input position)
AFFINE = {
    'shear_x': _affine_shear_x,
    'shear_y': _affine_shear_y,
    'translate_x_rel': lambda a, w, h: _translate(a[:, 0] * w, torch.zeros_like(a[:, 0])),
    'translate_y_rel': lambda a, w, h: _translate(torch.zeros_like(a[:, 0]), a[:, 0] * h),
    'translate_x_abs': lambda a, w, h: _translate(a[:, 0], torch.zeros_like(a[:, 0])),
    'translate_y_abs': lambda a, w, h: _translate(torch.zeros_like(a[:, 0]), a[:, 0]),
    'rotate': _affine_rotate,
}


def affine(x: torch.Tensor, matrices: torch.Tensor, resample: str, fill: Sequence[int]) -> torch.Tensor:
    """Pillow's ``Image.transform(size, AFFINE, matrix, resample, fillcolor)`` for a batch: every output pixel
    centre maps to an input position; one outside the image takes ``fill``, one inside is resampled with the
    image's edges repeated."""
    n, c, h, w = x.shape
    m = matrices.to(torch.float64).view(n, 2, 3)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=x.device, dtype=torch.float64) + 0.5, indexing='ij')
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    src = (pts @ m.transpose(1, 2)).view(n, h, w, 2)   # input positions (pixel centres at .5)
    inside = ((src[..., 0] >= 0) & (src[..., 0] < w) & (src[..., 1] >= 0) & (src[..., 1] < h)).unsqueeze(1)
    flat = x.reshape(n, c, h * w)

    def pixels(xs, ys):   # the pixels at integer positions, edges repeated
        index = ys.long().clamp(0, h - 1) * w + xs.long().clamp(0, w - 1)
        return torch.gather(flat, 2, index.view(n, 1, h * w).expand(n, c, h * w)).view(x.shape)

    if resample == 'nearest':   # the pixel the position falls in
        out = pixels(src[..., 0].floor(), src[..., 1].floor())
    elif resample == 'bilinear':
        grid = torch.stack([src[..., 0] * (2 / w) - 1, src[..., 1] * (2 / h) - 1], -1).to(x.dtype)
        out = F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    else:   # Pillow's bicubic for transforms: a 4 x 4 cubic convolution with a = -1
        base = (src - 0.5).floor()
        t = (src - 0.5 - base).to(x.dtype).unsqueeze(1)   # (n, 1, h, w, 2)
        t2, t3 = t * t, t * t * t
        weight = (-t + 2 * t2 - t3, 1 - 2 * t2 + t3, t + t2 - t3, t3 - t2)
        out = sum(weight[i][..., 0] * weight[k][..., 1] * pixels(base[..., 0] + i - 1, base[..., 1] + k - 1)
                  for i in range(4) for k in range(4))
    out = out.clamp_(0, 255).floor_()   # Pillow truncates
    fill = _on(x.device, list(fill), x.dtype).view(1, -1, 1, 1)
    return torch.where(inside, out, fill)


# timm's RandAugment ops (by the name of timm's function) that run on the device
DEVICE_OPS = {'auto_contrast': auto_contrast, 'equalize': equalize, 'invert': invert, 'solarize': solarize,
              'solarize_add': solarize_add, 'posterize': posterize, 'color': color, 'contrast': contrast,
              'brightness': brightness, 'sharpness': sharpness, 'desaturate': desaturate, **AFFINE}


# ColorJitter's adjustments in the order of its ``get_params`` (hue, the fourth, is not run on the device)
JITTER = ('brightness', 'contrast', 'color')


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class DecodeError(Exception):
    """A sample that could not be decoded on the device (its ``where`` and the reason)."""


class DeviceAugment:
    """The device's half: ``Planned`` samples in, a uint8 batch (N, C, H, W) on ``device`` out, with the indices
    of the samples kept; a sample that cannot be decoded is skipped where ``skip_bad``, else raises."""

    def __init__(self, plan: Plan, device: torch.device, skip_bad: bool = False):
        self.size, self.fill, self.device, self.skip_bad = tuple(plan.size), plan.fill, device, skip_bad
        self.read_mode = ImageReadMode.GRAY if plan.channels == 1 else ImageReadMode.RGB

    def __call__(self, planned: List[Planned]) -> Tuple[torch.Tensor, List[int], List[str]]:
        images, failures = self.decode(planned)
        kept = [k for k, img in enumerate(images) if img is not None]
        if not kept:
            return torch.zeros((0, len(self.fill), *self.size), dtype=torch.uint8, device=self.device), kept, failures
        x = torch.stack([self.crop(images[k], planned[k]) for k in kept])
        x = self.flip(x, [planned[k] for k in kept])
        x = self.randaugment(x, [planned[k].ops for k in kept])
        return x.to(torch.uint8), kept, failures

    def decode(self, planned: List[Planned]) -> Tuple[List[Optional[torch.Tensor]], List[str]]:
        images: List[Optional[torch.Tensor]] = [None] * len(planned)
        encoded = [k for k, p in enumerate(planned) if p.encoded]
        try:
            decoded = decode_jpeg([_bytes(planned[k].data) for k in encoded], mode=self.read_mode,
                                  device=self.device) if encoded else []
        except RuntimeError:   # one bad file fails the batch: decode one by one to find it
            decoded = [self._decode_one(planned[k]) for k in encoded]
        failures = []
        for k, img in zip(encoded, decoded):
            if isinstance(img, str):
                failures.append(img)
            else:
                images[k] = img
        for k, p in enumerate(planned):
            if not p.encoded:
                images[k] = torch.from_numpy(np.array(p.data)).permute(2, 0, 1).to(self.device, non_blocking=True)
        return images, failures

    def _decode_one(self, p: Planned):
        try:
            return decode_jpeg(_bytes(p.data), mode=self.read_mode, device=self.device)
        except RuntimeError:
            pass
        try:   # a file the device's decoder does not take (nvJPEG's limits) may still be a valid JPEG
            return decode_jpeg(_bytes(p.data), mode=self.read_mode).to(self.device, non_blocking=True)
        except RuntimeError as e:
            reason = str(e).splitlines()[0].rsplit(', ', 1)[-1]   # torchvision prefixes its source file
            message = f"{p.where}: unreadable image ({reason})"
            if not self.skip_bad:
                raise DecodeError(message) from None
            return message

    def crop(self, img: torch.Tensor, p: Planned) -> torch.Tensor:
        i, j, h, w = p.crop
        region = img[:, i:i + h, j:j + w].unsqueeze(0).float()
        out = F.interpolate(region, size=self.size, **RESIZE[p.interpolation])
        return out.round_().clamp_(0, 255)[0]

    @staticmethod
    def flip(x: torch.Tensor, planned: List[Planned]) -> torch.Tensor:
        for attr, dim in (('hflip', 3), ('vflip', 2)):
            chosen = [getattr(p, attr) for p in planned]
            if any(chosen):
                chosen = _on(x.device, chosen, torch.bool)
                x = torch.where(chosen.view(-1, 1, 1, 1), x.flip(dim), x)
        return x

    def randaugment(self, x: torch.Tensor, ops: List[tuple]) -> torch.Tensor:
        """The k-th op of every image together, grouped by op (and resampling filter)."""
        for k in range(max((len(o) for o in ops), default=0)):
            groups: Dict[tuple, List[int]] = {}
            for n, o in enumerate(ops):
                if k < len(o):
                    groups.setdefault((o[k][0], o[k][2]), []).append(n)
            for (name, resample), members in groups.items():
                index = _on(x.device, members, torch.long)
                args = _on(x.device, [list(ops[n][k][1]) or [0.] for n in members], torch.float64)
                part = x.index_select(0, index)
                if name in AFFINE:
                    out = affine(part, AFFINE[name](args, self.size[1], self.size[0]), resample, self.fill)
                else:
                    out = DEVICE_OPS[name](part, args)
                x = x.index_copy(0, index, out)
        return x

