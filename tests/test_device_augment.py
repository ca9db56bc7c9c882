"""--device-augment: the loader processes draw timm's augmentation, the device decodes and applies it. The
tensor ops are checked against timm's Pillow ops, the whole pipeline against timm's transform with the same
seeds, and the training command end to end."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import ROOT, TINY, run
from timm.data import auto_augment, create_transform
from torchvision.transforms.functional import pil_to_tensor

from sequencer.data import device_augment as da
from sequencer.data.datasets import seeded
from sequencer.data.images import open_image
from sequencer.data.loaders import posterize_keeps_zero_bits
from sequencer.errors import UserError
from sequencer.models.weights import read_file

from imagedata import make_image_folder

FILL = (124, 116, 104)


def photo(seed, w=96, h=80):
    """Smooth colour fields with grain: what a photograph's histogram and edges look like, unlike noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 10, (h, w, 1))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def batch(images):
    return torch.stack([pil_to_tensor(im) for im in images]).float()


PIXEL_CASES = [('auto_contrast', ()), ('equalize', ()), ('invert', ()), ('solarize', (128,)), ('solarize', (20,)),
               ('solarize_add', (60,)), ('posterize', (1,)), ('posterize', (5,)), ('color', (0.2,)),
               ('color', (1.9,)), ('contrast', (0.1,)), ('contrast', (1.8,)), ('brightness', (0.5,)),
               ('brightness', (1.7,)), ('sharpness', (0.1,)), ('sharpness', (1.9,))]


@pytest.mark.parametrize('name,args', PIXEL_CASES)
def test_pixel_ops_equal_pillow(name, args):
    images = [photo(s) for s in range(4)]
    ref = batch([getattr(auto_augment, name)(im, *args) for im in images])
    out = da.DEVICE_OPS[name](batch(images), torch.tensor([list(args) or [0.]] * 4, dtype=torch.float64))
    assert torch.equal(out, ref)


def test_low_contrast_images_left_alone_as_pillow_does():
    flat = [Image.new('RGB', (16, 16), (7, 7, 7)), Image.fromarray(np.full((16, 16, 3), 200, np.uint8))]
    for name in ('auto_contrast', 'equalize'):
        ref = batch([getattr(auto_augment, name)(im) for im in flat])
        assert torch.equal(da.DEVICE_OPS[name](batch(flat), torch.zeros(2, 1, dtype=torch.float64)), ref)


@pytest.mark.parametrize('name,args', [('shear_x', (0.3,)), ('shear_x', (-0.2,)), ('shear_y', (0.25,)),
                                       ('translate_x_rel', (-0.3,)), ('translate_y_rel', (0.4,)),
                                       ('rotate', (27.5,)), ('rotate', (-13.0,))])
@pytest.mark.parametrize('resample', [Image.BILINEAR, Image.NEAREST, Image.BICUBIC])
def test_geometric_ops_follow_pillow(name, args, resample):
    images = [photo(s) for s in range(3)]
    ref = batch([getattr(auto_augment, name)(im, *args, resample=resample, fillcolor=FILL) for im in images])
    a = torch.tensor([list(args)] * 3, dtype=torch.float64)
    out = da.affine(batch(images), da.AFFINE[name](a, 96, 80), da.RESAMPLE[resample], FILL)
    diff = (out - ref).abs()
    # the same positions and fill: pixels exactly on the image's edge may fall either side (rounding)
    assert (diff > 1).float().mean() < {Image.BILINEAR: 0.005, Image.NEAREST: 0.03, Image.BICUBIC: 0.005}[resample]
    assert diff.mean() < {Image.BILINEAR: 0.2, Image.NEAREST: 0.3, Image.BICUBIC: 0.2}[resample]


def jpeg_files(tmp_path, n=10):
    files = []
    for k in range(n):
        path = str(tmp_path / f'{k}.jpg')
        photo(k, 160 + 8 * k, 120).save(path, quality=90)
        files.append(path)
    return files


def timm_and_planned(tf, plan, files):
    """timm's transform of each file, and the plan's draws for it, under the same seed (the k-th file's, k)."""
    ref, planned = [], []
    for k, f in enumerate(files):
        with seeded(k):
            ref.append(tf(open_image(f, 'RGB')))
        with seeded(k):
            planned.append(plan(da.EncodedImage(f, 'RGB')))
    return ref, planned


def test_pipeline_draws_what_timm_draws(tmp_path):
    """The same seeded sample gets the same crop, flip and RandAugment ops as timm's transform gives it: the
    images agree to rounding (a different draw would differ by tens of levels)."""
    posterize_keeps_zero_bits()
    tf = create_transform(64, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', interpolation='random',
                          use_prefetcher=True)
    plan = da.Plan(tf, 3)
    ref, planned = timm_and_planned(tf, plan, jpeg_files(tmp_path, 16))
    assert all(p.encoded for p in planned) and sum(len(p.ops) for p in planned) > 8
    out, kept, failures = da.DeviceAugment(plan, torch.device('cpu'))(planned)
    assert out.dtype == torch.uint8 and out.shape == (16, 3, 64, 64) and kept == list(range(16)) and not failures
    per_image = (out.float() - torch.stack(ref).float()).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 1.0 and per_image.mean() < 0.5


def test_colour_jitter_draws_what_torchvision_draws(tmp_path):
    """Without --aa, timm's training transform jitters brightness, contrast and saturation (the training
    command's default --color-jitter 0.4): the same factors in the same order, applied as Pillow does."""
    tf = create_transform(48, is_training=True, color_jitter=0.4, interpolation='bilinear', use_prefetcher=True)
    plan = da.Plan(tf, 3)
    ref, planned = timm_and_planned(tf, plan, jpeg_files(tmp_path, 8))
    assert all(len(p.ops) == 3 for p in planned)
    assert {tuple(name for name, _, _ in p.ops) for p in planned} != {da.JITTER}   # the order is drawn too
    out, _, _ = da.DeviceAugment(plan, torch.device('cpu'))(planned)
    assert (out.float() - torch.stack(ref).float()).abs().mean(dim=(1, 2, 3)).max() < 1.0


def test_other_files_bad_files_and_grayscale(tmp_path):
    good = jpeg_files(tmp_path, 2)
    png = str(tmp_path / 'a.png')
    photo(7).save(png)
    cmyk = str(tmp_path / 'cmyk.jpg')
    photo(8).convert('CMYK').save(cmyk)
    truncated = str(tmp_path / 'truncated.jpg')
    data = open(good[0], 'rb').read()
    open(truncated, 'wb').write(data[:len(data) // 2])
    tf = create_transform(32, is_training=True, color_jitter=None, use_prefetcher=True)
    plan = da.Plan(tf, 3)
    with seeded(0):
        planned = [plan(da.EncodedImage(f, 'RGB')) for f in (good[0], png, truncated, cmyk, good[1])]
    assert [p.encoded for p in planned] == [True, False, True, False, True]   # Pillow decodes PNG and CMYK
    out, kept, failures = da.DeviceAugment(plan, torch.device('cpu'), skip_bad=True)(planned)
    assert kept == [0, 1, 3, 4] and out.shape == (4, 3, 32, 32)
    assert len(failures) == 1 and failures[0].startswith(f"{truncated}: unreadable image")
    with pytest.raises(da.DecodeError, match='truncated.jpg: unreadable image'):
        da.DeviceAugment(plan, torch.device('cpu'))(planned)
    rotated = str(tmp_path / 'rotated.jpg')   # stored sideways, with the EXIF orientation that turns it upright
    exif = Image.Exif()
    exif[da.EXIF_ORIENTATION] = 6
    photo(9, 64, 40).save(rotated, exif=exif)
    with seeded(3):
        upright = plan(da.EncodedImage(rotated, 'RGB'))
    assert not upright.encoded and upright.data.shape == (64, 40, 3)   # decoded upright, as open_image does
    with seeded(3):
        ref = tf(open_image(rotated, 'RGB'))
    out, _, _ = da.DeviceAugment(plan, torch.device('cpu'))([upright])
    assert (out[0].float() - ref.float()).abs().mean() < 1.0
    gray = da.Plan(tf, 1)
    with seeded(0):
        out, kept, _ = da.DeviceAugment(gray, torch.device('cpu'))([gray(da.EncodedImage(good[0], 'L'))])
    assert out.shape == (1, 1, 32, 32)


@pytest.mark.parametrize('kwargs,named', [(dict(color_jitter=(0.4, 0.4, 0.4, 0.1)), 'ColorJitter'),
                                          (dict(auto_augment='augmix-m5-w4-d2'), 'AugMixAugment'),
                                          (dict(auto_augment='original'), 'AutoAugment'),
                                          (dict(interpolation='lanczos'), 'lanczos')])
def test_transforms_the_device_does_not_run_are_refused(kwargs, named):
    with pytest.raises(UserError, match=f'--device-augment: .*{named}'):
        da.Plan(create_transform(32, is_training=True, use_prefetcher=True, **kwargs), 3)


def test_train_with_device_augment(tmp_path):
    """The training command end to end with --device-augment (on the CPU, the device here), the seed's
    augmentations included; and the flag's conflicts as one line, exit 2."""
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=4, size=(40, 48))
    out = tmp_path / 'out'
    common = [sys.executable, os.path.join(ROOT, 'train.py'), data, *TINY, '-b', '4', '--epochs', '1',
              '--output', str(out), '-j', '1', '--device-augment']
    proc = run([*common, '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0',
                '--experiment', 'da'], ROOT)
    assert 'top-1' in proc.stdout + proc.stderr
    assert os.path.exists(out / 'da' / 'last.pth.tar')
    bad = run([*common, '--no-prefetcher'], ROOT, check=False)
    assert bad.returncode == 2 and '--device-augment and --no-prefetcher' in bad.stderr
    bad = run([*common, '--aa', 'augmix'], ROOT, check=False)
    assert bad.returncode == 2 and "--device-augment: timm's AugMixAugment" in bad.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_decodes_and_augments_as_the_cpu(tmp_path):
    """nvJPEG and the CUDA ops against the CPU's: the same planned samples give the same images, up to the
    decoders' IDCT rounding and the resampling kernels' float arithmetic."""
    posterize_keeps_zero_bits()
    tf = create_transform(64, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', use_prefetcher=True)
    plan = da.Plan(tf, 3)
    with seeded(1):
        planned = [plan(da.EncodedImage(f, 'RGB')) for f in jpeg_files(tmp_path, 12)]
    cpu, _, _ = da.DeviceAugment(plan, torch.device('cpu'))(planned)
    cuda, kept, _ = da.DeviceAugment(plan, torch.device('cuda'))(planned)
    assert cuda.device.type == 'cuda' and kept == list(range(12))
    assert (cuda.cpu().float() - cpu.float()).abs().mean(dim=(1, 2, 3)).max() < 2.0


def test_resume_with_device_augment_is_exact(tmp_path):
    """Every sample's augmentation is drawn from its own seed, and the batch erasing's generator is saved with
    the run: a run resumed from its first epoch's checkpoint ends with the same weights as the uninterrupted one."""
    from test_train import _train_tiny
    data = make_image_folder(tmp_path / 'data', classes=3, train_per_class=4, val_per_class=2, size=(36, 36))
    flags = ['-j', '1', '--device-augment', '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.5', '--mixup', '0.5']
    _train_tiny(tmp_path, data, 'full', *flags, epochs=2)
    full = tmp_path / 'runs' / 'full'
    _train_tiny(tmp_path, data, 'resumed', *flags, '--resume', str(full / 'checkpoint-0.pth.tar'), epochs=2)
    a, b = read_file(full / 'last.pth.tar'), read_file(tmp_path / 'runs' / 'resumed' / 'last.pth.tar')
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])
