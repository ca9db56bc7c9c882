"""The analysis commands: ERF, resolution sweep, robustness (ImageNet-C mCE, A / R / V2 folders)."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sequencer
from sequencer.analysis import erf, resolution, robustness
from sequencer.cli import main

from analysis_helpers import (
    IMAGENET_A_WNIDS,
    TINY_ARGS,
    WNIDS,
    constant_head,
    image_folder,
    save_training_checkpoint,
    tiny_model,
)


def _read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


# ---- ERF ------------------------------------------------------------------------------------------------
def _manual_erf(model, images, stage):
    """The protocol written out independently: a forward hook on the stage, centre features, input gradient."""
    model = model.eval()
    total = None
    for img in images:
        x = img.unsqueeze(0).clone().requires_grad_(True)
        out = {}
        handle = model.stages[stage].register_forward_hook(lambda m, i, o: out.__setitem__('y', o))
        model(x)
        handle.remove()
        y = out['y']  # NHWC inside the model
        h, w = y.shape[1:3]
        y[:, (h - 1) // 2, (w - 1) // 2, :].sum().backward()
        g = torch.relu(x.grad).sum(dim=(0, 1)).double()
        total = g if total is None else total + g
    return total.numpy()


def test_erf_matches_the_protocol_written_out(rand_state):
    torch.manual_seed(0)
    model = rand_state(tiny_model(num_classes=4), scale=0.2)
    images = [torch.randn(3, 42, 42) for _ in range(3)]
    sums = erf.erf_sums(model, images, stages=[0, 2])
    assert sorted(sums) == [0, 2]
    for stage in (0, 2):
        ref = _manual_erf(model, images, stage)
        assert sums[stage].shape == (42, 42)
        np.testing.assert_allclose(sums[stage], ref, rtol=1e-5, atol=1e-10)
        assert (sums[stage] >= 0).all() and sums[stage].max() > 0
    m = erf.erf_map(sums[2])
    np.testing.assert_allclose(m, np.log10(sums[2] + 1))
    assert (m >= 0).all()


@pytest.mark.parametrize('name,axis', [('sequencer2d_vertical', 'column'), ('sequencer2d_s_horizontal', 'row')])
def test_erf_of_a_one_direction_lstm_is_a_band(rand_state, name, axis):
    """A vertical-only BiLSTM mixes tokens within columns: the stage-0 ERF of the centre token is exactly the
    7 px wide column of its patch (a row for the horizontal one). The ERF tool must show that."""
    model = rand_state(sequencer.create_model(name, num_classes=0, layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64),
                                              hidden_sizes=(16, 32, 32, 32)), scale=0.2)
    sums = erf.erf_sums(model, [torch.randn(3, 35, 35) for _ in range(2)], stages=[0])[0]
    # 35 px, patch 7 -> a 5 x 5 token grid, centre token (2, 2) covers pixels 14..20
    band = sums[:, 14:21] if axis == 'column' else sums[14:21, :]
    outside = np.delete(sums, range(14, 21), axis=1 if axis == 'column' else 0)
    assert (outside == 0).all()
    assert (band > 0).mean() > 0.9
    # the band reaches the far ends of the image: the LSTM carries information along the whole column / row
    ends = (band[:7].sum(), band[-7:].sum()) if axis == 'column' else (band[:, :7].sum(), band[:, -7:].sum())
    assert min(ends) > 0


def test_area_ratio():
    point = np.zeros((10, 10))
    point[4, 4] = 5.0
    assert erf.area_ratio(point, 0.99) == pytest.approx(0.01)
    uniform = np.ones((10, 10))
    assert erf.area_ratio(uniform, 0.5) == pytest.approx(0.5)
    assert erf.area_ratio(uniform, 0.2) == pytest.approx(0.2)


def test_erf_command_writes_maps_pngs_and_csv(tmp_path, rand_state):
    data = image_folder(tmp_path / 'data', {WNIDS[0]: 2, WNIDS[1]: 2})
    model = rand_state(tiny_model(num_classes=4), scale=0.2)
    ckpt = save_training_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'), model)
    out = tmp_path / 'erf'
    assert main(['erf', data, '--checkpoint', ckpt, '--img-size', '48', '--num-images', '3', '--stages', '0', '3',
                 '--output', str(out), '--device', 'cpu']) == 0
    for s in (0, 3):
        arr = np.load(out / f'erf_stage{s}.npy')
        assert arr.shape == (48, 48) and arr.dtype == np.float32
        assert np.isfinite(arr).all() and (arr >= 0).all() and arr.max() > 0
        with Image.open(out / f'erf_stage{s}.png') as im:
            assert im.format == 'PNG' and im.size[0] > 100
    assert not (out / 'erf_stage1.npy').exists()
    with Image.open(out / 'erf.png') as im:
        assert im.format == 'PNG'
    rows = _read_csv(out / 'erf.csv')
    assert [r['stage'] for r in rows] == ['0', '3'] and rows[0]['images'] == '3'
    assert 0 < float(rows[0]['area_20']) <= float(rows[0]['area_50']) <= float(rows[0]['area_99']) <= 100
    # the array saved is the one the API computes from the same 3 images (the first 3, sorted)
    import timm.data

    from sequencer.data import data_config
    from sequencer.engine.loading import list_images, load_image
    tf = timm.data.create_transform(**data_config(model, img_size=48))
    ref = erf.erf_sums(model, [tf(load_image(p)) for p in list_images([data])[:3]], [3])[3]
    np.testing.assert_allclose(arr, erf.erf_map(ref).astype(np.float32), rtol=1e-4)


def test_erf_user_errors(tmp_path, capsys):
    data = image_folder(tmp_path / 'data', {WNIDS[0]: 1})
    assert main(['erf', str(tmp_path / 'missing'), '--model', 'sequencer2d_s', '--output', str(tmp_path / 'o')]) == 2
    assert 'missing: no such file or directory' in capsys.readouterr().err
    assert main(['erf', data, '--model', 'sequencer2d_s', '--model-kwargs', *TINY_ARGS, '--stages', '7',
                 '--img-size', '32', '--output', str(tmp_path / 'o')]) == 2
    assert 'out of range' in capsys.readouterr().err
    assert main(['erf', data, '--model', 'sequencer2d_q', '--output', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sequencer erf: error: unknown model 'sequencer2d_q'") and '\n' not in err


# ---- resolution -----------------------------------------------------------------------------------------
def test_resolution_sweep_sees_each_size():
    model = tiny_model(num_classes=4)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    # a tiny val set in a temporary folder
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        image_folder(os.path.join(d, 'val'), {'a': 1, 'b': 1, 'c': 1, 'd': 1})
        rows = resolution.sweep(model, d, [32, 48], batch_size=8, workers=0, log=None)
    assert [r['img_size'] for r in rows] == [32, 48]
    assert sorted(set(seen)) == [(32, 32), (48, 48)]
    assert all(r['count'] == 4 for r in rows)


def test_resolution_command_two_checkpoints_on_one_plot(tmp_path):
    # class n0 holds 3 images, n1 one: a model that always answers n0 scores 75%, one that answers n1 25%
    image_folder(tmp_path / 'imagenet' / 'val', {WNIDS[0]: 3, WNIDS[1]: 1})
    a = save_training_checkpoint(str(tmp_path / 'a.pth.tar'), constant_head(tiny_model(num_classes=2), {0: 1.0}))
    b = save_training_checkpoint(str(tmp_path / 'b.pth.tar'), constant_head(tiny_model(num_classes=2), {1: 1.0}))
    out = tmp_path / 'res'
    assert main(['resolution', str(tmp_path / 'imagenet'), '--model', 'sequencer2d_s', '--checkpoint', a, b,
                 '--labels', 'answers-n0', 'answers-n1', '--sizes', '48', '32', '-j', '0', '-b', '3',
                 '--output', str(out), '--device', 'cpu']) == 0
    rows = _read_csv(out / 'resolution.csv')
    assert [(r['label'], r['img_size']) for r in rows] == [('answers-n0', '32'), ('answers-n0', '48'),
                                                           ('answers-n1', '32'), ('answers-n1', '48')]
    assert [float(r['top1']) for r in rows] == [75.0, 75.0, 25.0, 25.0]
    assert all(r['count'] == '4' and r['model'] == 'sequencer2d_s' for r in rows)
    assert rows[0]['checkpoint'] == a and rows[2]['checkpoint'] == b
    md = (out / 'resolution.md').read_text()
    assert '| answers-n0 | 75.00 | 75.00 |' in md and '| model | 32 px | 48 px |' in md
    with Image.open(out / 'resolution.png') as im:
        assert im.format == 'PNG' and im.size[0] > 300


def test_resolution_pairs_models_and_checkpoints(tmp_path, capsys):
    image_folder(tmp_path / 'val', {'a': 1})
    assert main(['resolution', str(tmp_path), '--model', 'sequencer2d_s', 'sequencer2d_m', '--checkpoint', 'x', 'y',
                 'z', '--sizes', '32', '--output', str(tmp_path / 'o')]) == 2
    assert '2 models but 3 checkpoints' in capsys.readouterr().err


# ---- robustness -----------------------------------------------------------------------------------------
def test_mce_formula_on_known_numbers():
    errors = {'gaussian_noise': [0.1, 0.2, 0.3, 0.4, 0.5], 'brightness': [0.2] * 5}
    ces = robustness.corruption_errors(errors)
    assert ces['gaussian_noise']['error'] == pytest.approx(0.3)
    assert ces['gaussian_noise']['ce'] == pytest.approx(0.3 / 0.886428)
    assert ces['brightness']['ce'] == pytest.approx(0.2 / 0.564592)
    r = robustness.mce(ces)
    assert r['mce'] == pytest.approx(100 * (0.3 / 0.886428 + 0.2 / 0.564592) / 2)
    assert r['mean_error'] == pytest.approx(25.0)
    # AlexNet itself has an mCE of exactly 100
    alex = {c: [e] * 5 for c, e in robustness.ALEXNET_ERRORS.items()}
    assert robustness.mce(robustness.corruption_errors(alex))['mce'] == pytest.approx(100.0)
    assert len(robustness.CORRUPTIONS) == 15


def test_imagenet_class_index_maps_wnids_and_indices():
    from timm.data import ImageNetInfo
    names = ImageNetInfo().label_names()
    idx = robustness.imagenet_class_index(IMAGENET_A_WNIDS)
    assert [names[i] for i in idx.tolist()] == IMAGENET_A_WNIDS
    assert robustness.imagenet_class_index(['0', '12', '999']).tolist() == [0, 12, 999]
    with pytest.raises(sequencer.errors.UserError, match='neither an ImageNet-1K wnid'):
        robustness.imagenet_class_index(['cats'])


def test_robustness_command_imagenet_c_a_and_v2(tmp_path):
    # logits favour class 0 (n01440764) most, then n01443537 (1), then IMAGENET_A_WNIDS[1] (index 11)
    info_idx = robustness.imagenet_class_index(IMAGENET_A_WNIDS).tolist()
    model = constant_head(tiny_model(), {0: 3.0, 1: 2.0, info_idx[1]: 1.0})
    ckpt = save_training_checkpoint(str(tmp_path / 'run' / 'model_best.pth.tar'), model)
    # ImageNet-C: two corruptions x 5 severities, classes n0 and n1 one image each -> always "n0": 50% error
    c_root = tmp_path / 'imagenet-c'
    corruptions = ['gaussian_noise', 'brightness']
    for k, corruption in enumerate(corruptions):
        for sev in range(1, 6):
            image_folder(c_root / corruption / str(sev), {WNIDS[0]: 1, WNIDS[1]: 1}, seed=k * 10 + sev)
    # ImageNet-A subset: 3 of its wnids, 2 images each; restricted to them the model answers info_idx[1]
    a_root = image_folder(tmp_path / 'imagenet-a', {w: 2 for w in IMAGENET_A_WNIDS})
    # ImageNetV2 layout (class-index folders): '0' and '1' -> always class 0: 1 of 3 images right
    v2_root = image_folder(tmp_path / 'imagenetv2', {'0': 1, '1': 2})
    out = tmp_path / 'rob'
    assert main(['robustness', '--checkpoint', ckpt, '--img-size', '32', '--imagenet-c', str(c_root),
                 '--corruptions', *corruptions, '--imagenet-a', a_root, '--imagenetv2', v2_root, '-j', '0', '-b', '8',
                 '--output', str(out), '--device', 'cpu']) == 0
    expected_mce = 100 * (0.5 / 0.886428 + 0.5 / 0.564592) / 2
    summary = {(r['benchmark'], r['metric']): r for r in _read_csv(out / 'robustness.csv')}
    assert float(summary[('ImageNet-C', 'mCE (lower is better)')]['value']) == pytest.approx(expected_mce, abs=1e-3)
    assert float(summary[('ImageNet-C', 'mean top-1 error, unnormalised')]['value']) == pytest.approx(50.0)
    assert float(summary[('ImageNet-A', 'top-1')]['value']) == pytest.approx(100 / 3, abs=1e-3)
    assert summary[('ImageNet-A', 'top-1')]['note'] == '6 images, 3 classes'
    assert float(summary[('ImageNetV2', 'top-1')]['value']) == pytest.approx(100 / 3, abs=1e-3)
    per = _read_csv(out / 'imagenet_c.csv')
    assert [r['corruption'] for r in per] == corruptions
    assert all(float(r[f'error_s{s}']) == 0.5 for r in per for s in range(1, 6))
    assert float(per[0]['ce']) == pytest.approx(0.5 / 0.886428, rel=1e-5)
    md = (out / 'robustness.md').read_text()
    assert f"| ImageNet-C | mCE (lower is better) | {expected_mce:.2f} |" in md
    data = json.loads((out / 'robustness.json').read_text())
    assert data['results']['imagenet_c']['complete'] is False  # 2 of the 15 corruptions
    assert 'partial: 2 of the 15 corruptions' in md


def test_robustness_user_errors(tmp_path, capsys):
    c_root = tmp_path / 'c'
    image_folder(c_root / 'fog' / '1', {WNIDS[0]: 1})
    args = ['robustness', '--model', 'sequencer2d_s', '--model-kwargs', *TINY_ARGS, '--img-size', '32', '-j', '0',
            '--output', str(tmp_path / 'o')]
    assert main(args + ['--imagenet-c', str(c_root)]) == 2
    assert 'missing 74 corruption/severity folder(s)' in capsys.readouterr().err
    assert main(args) == 2
    assert 'give at least one of --imagenet-c' in capsys.readouterr().err
    assert main(args + ['--imagenet-a', str(tmp_path / 'nope')]) == 2
    assert 'nope: imagenet-a folder does not exist' in capsys.readouterr().err
    # partial ImageNet-C is averaged on request, and the table says it is partial
    assert main(args + ['--imagenet-c', str(c_root), '--allow-partial']) == 0
    assert 'partial: 1 of the 15 corruptions' in (tmp_path / 'o' / 'robustness.md').read_text()


@pytest.mark.parametrize('command,words', [
    ('erf', ['log10(x + 1)', 'erf_stage<i>.npy', 'erf.png']),
    ('resolution', ['resolution.csv', 'resolution.png', 'without retraining']),
    ('robustness', ['mCE', 'AlexNet', 'robustness.md', 'restricted']),
    ('avg-checkpoints', ['--last', '--best', "'metric'"]),
    ('clean-checkpoint', ['sha256', 'safetensors', '--use-ema']),
    ('predict', ['--topk', '--json', 'ImageNet-1K']),
    ('export', ['onnxruntime', 'opset', 'torchscript', '--tolerance']),
])
def test_every_command_explains_itself(capsys, command, words):
    with pytest.raises(SystemExit) as exit_:
        main([command, '--help'])
    assert exit_.value.code == 0
    out = ' '.join(capsys.readouterr().out.split())
    for word in words:
        assert word in out, word
