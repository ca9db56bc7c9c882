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
