"""Datasets: the transfer sets' on-disk layouts, seeded samples, sharding."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from sequencer.data.datasets import Samples, ShardSampler, build_dataset, class_names_of, num_classes_of
from sequencer.errors import UserError

from imagedata import make_image_folder


def _jpeg(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(path)


def test_flowers102_layout(tmp_path):
    base = tmp_path / 'flowers-102'
    labels = np.array([1, 2, 102, 5, 7, 9])  # 1-based classes of image_00001 .. image_00006
    for i in range(1, 7):
        _jpeg(str(base / 'jpg' / f'image_{i:05d}.jpg'), i * 20)
    savemat(base / 'imagelabels.mat', {'labels': labels[None, :]})
    savemat(base / 'setid.mat', {'trnid': np.array([[1, 2]]), 'valid': np.array([[3]]), 'tstid': np.array([[4, 5, 6]])})
    train = build_dataset('flowers102', str(tmp_path), 'train', True)
    test = build_dataset('flowers102', str(tmp_path), 'validation', False)
    assert num_classes_of(train) == 102
    assert [t for _, t in train.samples] == [0, 1, 101]  # train + official validation ids
    assert [os.path.basename(p) for p, _ in test.samples] == ['image_00004.jpg', 'image_00005.jpg', 'image_00006.jpg']
    img, target = Samples(test, None)[0]
    assert target == 4 and img.size == (24, 20)
    with pytest.raises(UserError, match='setid.mat: missing'):
        os.unlink(base / 'setid.mat')
        build_dataset('flowers102', str(tmp_path), 'train', True)


def test_stanford_cars_layout(tmp_path):
    root = tmp_path / 'stanford_cars'
    rec = np.dtype([('bbox_x1', 'O'), ('bbox_y1', 'O'), ('bbox_x2', 'O'), ('bbox_y2', 'O'), ('class', 'O'),
                    ('fname', 'O')])

    def annos(items):
        a = np.zeros((1, len(items)), dtype=rec)
        for j, (cls, fname) in enumerate(items):
            a[0, j] = (1, 1, 10, 10, cls, fname)
        return a
    for part, items in (('train', [(1, '00001.jpg'), (196, '00002.jpg')]), ('test', [(3, '00001.jpg')])):
        for _, fname in items:
            _jpeg(str(root / f'cars_{part}' / fname), 100)
    os.makedirs(root / 'devkit')
    savemat(root / 'devkit' / 'cars_train_annos.mat', {'annotations': annos([(1, '00001.jpg'), (196, '00002.jpg')])})
    savemat(root / 'cars_test_annos_withlabels.mat', {'annotations': annos([(3, '00001.jpg')])})
    names = np.array([[f'Car {i}' for i in range(196)]], dtype=object)
    savemat(root / 'devkit' / 'cars_meta.mat', {'class_names': names})
    train = build_dataset('stanford_cars', str(tmp_path), 'train', True)
    test = build_dataset('stanford_cars', str(tmp_path), 'validation', False)
    assert num_classes_of(train) == 196 and class_names_of(train)[195] == 'Car 195'
    assert [t for _, t in train.samples] == [0, 195] and [t for _, t in test.samples] == [2]
    assert Samples(test, None)[0][1] == 2


def test_validation_split_finds_val_folder(tmp_path):
    data = make_image_folder(tmp_path / 'd', classes=2, train_per_class=1, val_per_class=2)
    ds = build_dataset('', data, 'validation', False)
    assert len(ds) == 4 and num_classes_of(ds) == 2


def test_samples_are_seeded_by_epoch_and_index(tmp_path):
    from timm.data import create_transform
    data = make_image_folder(tmp_path / 'd', classes=2, train_per_class=3, val_per_class=1)
    ds = build_dataset('', data, 'train', True)
    tf = create_transform(32, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.5)
    a, b = Samples(ds, tf, seed=1), Samples(ds, tf, seed=1)
    torch.manual_seed(123)  # global RNG state must not matter
    x = a[2][0]
    torch.manual_seed(999)
    assert torch.equal(x, b[2][0])
    b.set_epoch(1)
    assert not torch.equal(x, b[2][0])
    state = torch.get_rng_state()
    a[0]
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left untouched


def test_shard_sampler_splits_a_shared_permutation():
    one = ShardSampler(10, 1, 0, shuffle=True, seed=5, batch_size=4)
    r0 = ShardSampler(10, 2, 0, shuffle=True, seed=5, batch_size=2)
    r1 = ShardSampler(10, 2, 1, shuffle=True, seed=5, batch_size=2)
    full = one.indices()
    assert len(full) == 8
    for step in range(2):  # global batch `step` holds the same images
        assert sorted(full[4 * step:4 * step + 4]) == sorted(r0.indices()[2 * step:2 * step + 2] +
                                                              r1.indices()[2 * step:2 * step + 2])
    one.set_epoch(0, skip_batches=1)
    assert one.indices() == full[4:]
    one.set_epoch(1)
    assert one.indices() != full


def test_atomic_writes_leave_no_temporary_files_and_normal_permissions(tmp_path):
    from sequencer.engine.io import save_torch, write_text
    write_text(str(tmp_path / 'a.txt'), 'one')
    save_torch({'x': torch.ones(2)}, str(tmp_path / 'b.pth'))
    with pytest.raises(RuntimeError):
        from sequencer.engine.io import atomic_open
        with atomic_open(str(tmp_path / 'a.txt')) as f:
            f.write('half')
            raise RuntimeError('crash while writing')
    assert (tmp_path / 'a.txt').read_text() == 'one'  # the old file survives a failed write
    assert sorted(os.listdir(tmp_path)) == ['a.txt', 'b.pth']
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / 'a.txt').st_mode & 0o777 == 0o666 & ~mask


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path):
    """A write that fails (here the disk fills while a checkpoint is serialised) raises a UserError naming the file;
    the previous file is intact and no temporary file is left."""
    import errno

    from sequencer.engine.io import save_torch, write_with
    from sequencer.errors import UserError
    path = str(tmp_path / 'last.pth.tar')
    save_torch({'epoch': 1}, path)

    def fill_disk(f):
        f.write(b'partial')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match=f'^cannot write {path}: No space left on device$'):
        write_with(path, fill_disk)
    assert torch.load(path, weights_only=True) == {'epoch': 1}
    assert os.listdir(tmp_path) == ['last.pth.tar']


def test_randaugment_posterize_at_full_magnitude_gives_a_black_image():
    """The paper's policy (rand-m9-mstd0.5-inc1) reaches posterize with 0 bits, which Pillow 13 refuses; the
    op returns the black image older Pillow computed, for RGB and greyscale images."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    from sequencer.data.loaders import posterize_keeps_zero_bits
    posterize_keeps_zero_bits()
    posterize_keeps_zero_bits()   # idempotent
    rgb = Image.fromarray(np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8))
    for img in (rgb, rgb.convert('L')):
        out = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)(img)   # 4 - 4 = 0 bits kept
        assert out.mode == img.mode and out.size == img.size and not np.asarray(out).any()
        kept = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5)(img)   # 2 bits kept: unchanged behaviour
        assert np.array_equal(np.asarray(kept), np.asarray(img) & 0b11000000)


def test_a_missing_torchvision_dataset_points_to_the_download_option(tmp_path):
    with pytest.raises(UserError, match=r"cannot read split 'train' \(.*pass --dataset-download to download it"):
        build_dataset('torch/cifar10', str(tmp_path), 'train', True, '', False)


def _exif_rotated_jpeg(path):
    """A 40 x 20 JPEG whose EXIF orientation (6: rotated 90 degrees) makes it 20 x 40; left and right halves of
    different colours, so that a decoder ignoring the orientation gives another picture."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (200, 30, 30)
    pixels[:, 20:] = (30, 30, 200)
    exif = Image.Exif()
    exif[0x0112] = 6
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)


def test_an_exif_rotated_jpeg_gives_the_same_tensor_in_training_and_predict(tmp_path):
    """Training's loader path (build_dataset, Samples, the evaluation transform) and predict decode an image the
    same way (sequencer.data.images): the same tensor, EXIF orientation applied; erf uses the same decoder."""
    import timm.data
    from torch import nn

    from sequencer.analysis import erf
    from sequencer.data import images
    from sequencer.export.predict import predict
    path = str(tmp_path / 'd' / 'val' / 'a' / 'rotated.jpg')
    _exif_rotated_jpeg(path)
    cfg = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
               crop_pct=1.0, crop_mode='center')
    transform = timm.data.create_transform(**cfg, is_training=False)
    ds = build_dataset('', str(tmp_path / 'd'), 'validation', False)
    trained_on, _ = Samples(ds, transform)[0]

    class Recorder(nn.Module):
        def forward(self, x):
            self.seen = x
            return torch.zeros(x.shape[0], 2)

    model = Recorder()
    predict(model, [path], ['a', 'b'], topk=1, cfg=cfg)
    assert torch.equal(model.seen[0], trained_on)
    # the orientation was applied: the top rows of the 20 x 40 picture are the image's left (red) half
    assert trained_on[0, 0].mean() > 0 > trained_on[2, 0].mean()
    assert erf.load_image is images.load_image


def test_aug_repeats_take_timms_sampler_and_augment_each_copy_differently(tmp_path):
    """--aug-repeats: timm's RepeatAugSampler chooses the images (with or without torch.distributed), every copy of
    an image is a variant with its own augmentation, and the ranks' copies differ too."""
    from timm.data import create_transform
    from timm.data.distributed_sampler import RepeatAugSampler

    from sequencer.data.datasets import RepeatAugShards
    n = 12
    ranks = [RepeatAugShards(n, 3, world_size=2, rank=r, seed=1, batch_size=2) for r in range(2)]
    for r, shards in enumerate(ranks):
        shards.set_epoch(4)
        timm_sampler = RepeatAugSampler(range(n), num_replicas=2, rank=r, num_repeats=3)
        timm_sampler.set_epoch(1 + 4)
        chosen = list(timm_sampler)
        keys = shards.indices()
        assert [k if isinstance(k, int) else k[0] for k in keys] == chosen[:len(chosen) // 2 * 2]
        assert len(set(keys)) == len(keys)   # a copy seen twice on one rank is another variant
    every = ranks[0].indices() + ranks[1].indices()
    assert len(set(every)) == len(every)     # and so is a copy on the other rank
    data = make_image_folder(tmp_path / 'd', classes=1, train_per_class=2, val_per_class=1)
    ds = build_dataset('', data, 'train', True)
    samples = Samples(ds, create_transform(32, is_training=True), seed=1)
    assert torch.equal(samples[0][0], samples[(0, 0)][0])
    assert not torch.equal(samples[(0, 0)][0], samples[(0, 1)][0])
    # --epoch-repeats: two passes over the data an epoch, the second as variants
    twice = ShardSampler(n, shuffle=True, seed=1, batch_size=2, repeats=2).indices()
    assert len(twice) == 2 * n and sorted(k for k in twice if isinstance(k, int)) == list(range(n))
    assert sorted(k for k in twice if not isinstance(k, int)) == [(i, 1) for i in range(n)]


def test_resplit_erasing_leaves_the_first_half_of_a_batch_clean_and_repeats_itself():
    from sequencer.data.datasets import SplitErasing
    erase = SplitErasing(1.0, 'pixel', 1, seed=3)
    batch = torch.zeros(4, 3, 16, 16)
    a = erase(batch.clone(), epoch=0, step=5, rank=0)
    assert not a[:2].any() and a[2].any() and a[3].any()
    assert torch.equal(a, erase(batch.clone(), epoch=0, step=5, rank=0))     # a resumed run erases alike
    assert not torch.equal(a, erase(batch.clone(), epoch=0, step=6, rank=0))


def test_the_prefetcher_gives_the_batches_of_the_plain_loader(tmp_path):
    """timm's PrefetchLoader (used on CUDA) over the seeded loader: the same normalised images and targets as the
    loader without it, the skipped-sample counts of each batch, and None for a batch of unreadable images only."""
    from timm.data import create_transform

    from sequencer.data.datasets import Prefetched, make_loader
    data = make_image_folder(tmp_path / 'd', classes=2, train_per_class=3, val_per_class=1)
    open(os.path.join(data, 'train', 'n00000001', 'zz_empty.JPEG'), 'wb').close()
    ds = build_dataset('', data, 'train', True)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)

    def loader(prefetch):
        tf = create_transform(32, is_training=False, mean=mean, std=std, crop_pct=1.0, use_prefetcher=prefetch)
        return make_loader(Samples(ds, tf, bad_samples='skip'), ShardSampler(len(ds), shuffle=False, drop_last=False,
                                                                                batch_size=1), 1, 0)
    plain = list(loader(False))
    fetched = list(Prefetched(loader(True), (3, 32, 32), mean, std, torch.device('cpu')))
    assert len(plain) == len(fetched) == 7 and [b[2] for b in fetched] == [0] * 6 + [1]
    assert fetched[-1][:2] == (None, None)
    for (x, y, _), (px, py, _) in zip(plain[:-1], fetched[:-1]):
        assert px.dtype == torch.float32 and torch.equal(y, py)
        assert torch.allclose(x, px, atol=1e-5)


def test_a_streamed_dataset_is_refused_in_one_line(tmp_path, monkeypatch):
    """Samples are read by index (seeded augmentation, exact resume): a streamed (iterable) dataset of timm's
    create_dataset is refused naming --dataset, not failed on at the first batch."""
    from sequencer.data import datasets

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    monkeypatch.setattr(datasets, 'create_dataset', lambda *a, **k: Stream())
    with pytest.raises(UserError, match=r'^--dataset wds/imagenet: a streamed dataset'):
        build_dataset('wds/imagenet', str(tmp_path), 'train', True)
