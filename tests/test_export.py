"""Deployment: ONNX (onnxruntime) and TorchScript exports agree with PyTorch; predict; torch.hub entry points."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sequencer
from sequencer.cli import main
from sequencer.export import export_onnx, verify_onnx
from sequencer.fast import set_engine

from analysis_helpers import TINY, TINY_ARGS, constant_head, image_folder, save_training_checkpoint, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def trained(tmp_path, rand_state):
    """A tiny 5-class model with random (non-zero) weights, saved as a training checkpoint."""
    model = rand_state(tiny_model(num_classes=5), scale=0.1).eval()
    return model, save_training_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'), model)


def test_onnx_export_matches_pytorch_under_onnxruntime(tmp_path, trained, capsys):
    import onnx
    import onnxruntime as ort
    model, ckpt = trained
    out = tmp_path / 'model.onnx'
    assert main(['export', '--checkpoint', ckpt, '--format', 'onnx', '--img-size', '42', '--output', str(out)]) == 0
    assert 'verified with onnxruntime' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ['model.onnx', 'run']  # one self-contained file: no side or temporary files
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta['img_size'] == '42' and json.loads(meta['mean']) == pytest.approx([0.485, 0.456, 0.406])
    assert max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # a symbolic (dynamic) batch axis
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    x = torch.randn(5, 3, 42, 42)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    set_engine(model, 'native')
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == (5, 5)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1e-2  # the comparison is not between two near-zero outputs


def test_onnx_torchscript_based_exporter_opset_17(tmp_path, rand_state):
    model = rand_state(sequencer.create_model('gru_sequencer2d_s', num_classes=3, **TINY), scale=0.1)
    info = export_onnx(model, str(tmp_path / 'gru.onnx'), img_size=35, opset=17, dynamo=False)
    assert info['opset'] == 17
    assert verify_onnx(model, str(tmp_path / 'gru.onnx'), img_size=35, batches=(1, 4)) <= 1e-4


def test_torchscript_export_matches_pytorch(tmp_path, trained):
    model, ckpt = trained
    out = tmp_path / 'model.pt'
    assert main(['export', '--checkpoint', ckpt, '--format', 'torchscript', '--img-size', '35',
                 '--output', str(out)]) == 0
    scripted = torch.jit.load(str(out))
    x = torch.randn(4, 3, 35, 35)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-4, rtol=0)


def test_export_failed_verification_writes_nothing_and_keeps_the_earlier_file(tmp_path, trained, capsys,
                                                                               monkeypatch):
    """The new file is checked as a temporary file beside --output, which it replaces only once it passes: a
    failed check leaves no file of its own, and an earlier good export of that name as it was. The failures are
    simulated: a runtime reporting a difference of 0.5, and one whose loaded file gives NaN (a weight set to NaN
    after loading), which ``max`` used to drop from the difference."""
    import sequencer.export.export as export_mod
    _, ckpt = trained
    out = tmp_path / 'model.pt'
    argv = ['export', '--checkpoint', ckpt, '--format', 'torchscript', '--img-size', '35', '--tolerance', '0.1',
            '--output', str(out)]
    assert main(argv) == 0
    good = out.read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(export_mod, 'verify_torchscript', lambda *a, **k: 0.5)
        assert main(argv) == 2
    assert (f'{out}: torch.jit.load differs from PyTorch by 0.5 (> tolerance 0.1); not written'
            in capsys.readouterr().err)
    assert out.read_bytes() == good

    def load_with_a_nan_weight(*a, **k):
        scripted = real_load(*a, **k)
        with torch.no_grad():
            next(scripted.parameters()).view(-1)[0] = float('nan')
        return scripted
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, 'load', load_with_a_nan_weight)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1
    assert f"{out}: TorchScript gives NaN/inf logits for batch 1 where PyTorch's are finite" in err
    assert out.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ['model.pt', 'run']  # no temporary file left beside it


def test_export_of_a_model_giving_nan_fails(tmp_path, trained, capsys):
    """A NaN weight makes the logits NaN in PyTorch and in the exported file alike: the export fails naming the
    checkpoint (it used to pass, a NaN difference being dropped by ``max``), and verify_* refuse NaN on either
    side rather than report a difference of 0."""
    from sequencer.export import ExportError, export_torchscript, verify_torchscript
    model, _ = trained
    broken = tiny_model(num_classes=5)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.head.fc.weight[0, 0] = float('nan')
    ckpt = save_training_checkpoint(str(tmp_path / 'nan.pth'), broken)
    out = tmp_path / 'nan.pt'
    assert main(['export', '--checkpoint', ckpt, '--format', 'torchscript', '--img-size', '35',
                 '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'{ckpt}: the model itself gives NaN/inf logits' in err
    assert not out.exists()
    export_torchscript(broken, str(out), img_size=35)
    with pytest.raises(ExportError, match="TorchScript gives NaN/inf logits for batch 1 where PyTorch's are finite"):
        verify_torchscript(model, str(out), img_size=35)
    export_torchscript(model, str(tmp_path / 'good.pt'), img_size=35)
    with pytest.raises(ExportError, match="PyTorch's own logits are NaN/inf for batch 1: the model itself"):
        verify_torchscript(broken, str(tmp_path / 'good.pt'), img_size=35)


def test_export_user_errors_are_one_line(tmp_path, capsys):
    proc = subprocess.run([sys.executable, '-m', 'sequencer.cli', 'export', '--model', 'sequencer3d_s', '--format',
                           'onnx', '--output', str(tmp_path / 'x.onnx')], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith("sequencer export: error: unknown model 'sequencer3d_s'")
    assert proc.stderr.count('\n') == 1
    for args, expected in (
            (['--model', 'sequencer2d_s', '--checkpoint', str(tmp_path / 'missing.pth')], 'no such checkpoint file'),
            (['--model', 'sequencer2d_m', '--model-kwargs', *TINY_ARGS, '--opset', '13'], 'opsets 18 to'),
            (['--model', 'sequencer2d_m', '--model-kwargs', *TINY_ARGS, '--opset', '17'],
             'with --exporter torchscript'),
            (['--model', 'sequencer2d_m', '--model-kwargs', *TINY_ARGS, '--opset', '99'], '--opset 99: the dynamo')):
        assert main(['export', *args, '--format', 'onnx', '--output', str(tmp_path / 'x.onnx')]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and expected in err
    assert not (tmp_path / 'x.onnx').exists()


# ---- predict --------------------------------------------------------------------------------------------
def test_predict_imagenet_names_json(tmp_path, capsys):
    model = constant_head(tiny_model(), {1: 4.0, 0: 3.0, 2: 2.0})  # goldfish, tench, great white shark
    ckpt = save_training_checkpoint(str(tmp_path / 'w.pth.tar'), model)
    data = image_folder(tmp_path / 'imgs', {'x': 3, 'y': 2})
    assert main(['predict', data, '--checkpoint', ckpt, '--topk', '3', '--json', '-b', '2', '--img-size', '32']) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 5 and results[0]['image'].endswith(os.path.join('x', '0.JPEG'))
    for r in results:
        assert [t['index'] for t in r['topk']] == [1, 0, 2]
        assert [t['label'] for t in r['topk']] == ['goldfish', 'tench', 'great white shark']
        probs = [t['prob'] for t in r['topk']]
        expected = torch.softmax(torch.tensor([4.0, 3.0, 2.0] + [0.0] * 997), 0)[:3].tolist()
        np.testing.assert_allclose(probs, expected, rtol=1e-4)


def test_predict_class_names_of_the_run_and_class_map(tmp_path, capsys):
    model = constant_head(tiny_model(num_classes=3), {2: 5.0})
    run = tmp_path / 'run'
    ckpt = save_training_checkpoint(str(run / 'model_best.pth.tar'), model)
    (run / 'class_map.txt').write_text('cat\ndog\nbird\n')
    img = os.path.join(image_folder(tmp_path / 'imgs', {'x': 1}), 'x', '0.JPEG')
    assert main(['predict', img, '--checkpoint', ckpt, '--topk', '1', '--img-size', '32']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == img and out[1].startswith('  1. bird (2): ')
    other = tmp_path / 'names.txt'
    other.write_text('ant\nbee\nwasp\n')
    assert main(['predict', img, '--checkpoint', ckpt, '--topk', '2', '--class-map', str(other), '--json',
                 '--img-size', '32']) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r['topk'][0]['label'] == 'wasp' and len(r['topk']) == 2
    other.write_text('ant\nbee\n')
    assert main(['predict', img, '--checkpoint', ckpt, '--class-map', str(other), '--img-size', '32']) == 2
    assert '2 class names for a model with 3 outputs' in capsys.readouterr().err


def test_a_runs_recorded_preprocessing_and_class_names_are_used(tmp_path):
    """A checkpoint as the training loop writes it: architecture arguments, class names and the data
    settings of the run travel with it, so no --model-kwargs / --img-size / --mean are needed."""
    from sequencer.engine.loading import build_model, class_names
    model = tiny_model(num_classes=3)
    ckpt = save_training_checkpoint(str(tmp_path / 'last.pth.tar'), model, model_kwargs={}, class_names=['a', 'b', 'c'],
                                    args={'model': 'sequencer2d_s', 'img_size': 40, 'mean': [0.5] * 3,
                                          'std': [0.25] * 3, 'crop_pct': 1.0, 'interpolation': 'bilinear'})
    torch.save(dict(torch.load(ckpt, weights_only=True), model_kwargs=dict(TINY)), ckpt)
    loaded = build_model(checkpoint=ckpt, log=None)
    assert loaded.name == 'sequencer2d_s' and loaded.model.num_classes == 3
    cfg = loaded.data_config()
    assert cfg['input_size'] == (3, 40, 40) and cfg['mean'] == (0.5, 0.5, 0.5) and cfg['std'] == (0.25, 0.25, 0.25)
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear'
    assert loaded.data_config(img_size=64, crop_pct=0.9)['input_size'] == (3, 64, 64)
    assert class_names(loaded) == ['a', 'b', 'c']


def test_predict_user_errors(tmp_path, capsys):
    (tmp_path / 'broken.jpg').write_bytes(b'not an image')
    args = ['--model', 'sequencer2d_s', '--model-kwargs', *TINY_ARGS, '--img-size', '32']
    assert main(['predict', str(tmp_path / 'broken.jpg'), *args]) == 2
    assert 'broken.jpg: not a readable image' in capsys.readouterr().err
    assert main(['predict', str(tmp_path / 'none.jpg'), *args]) == 2
    assert 'none.jpg: no such file or directory' in capsys.readouterr().err


# ---- torch.hub ------------------------------------------------------------------------------------------
def test_hubconf_exposes_every_model():
    spec = importlib.util.spec_from_file_location('sequencer_hubconf', os.path.join(ROOT, 'hubconf.py'))
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    assert 'torch' in hub.dependencies and 'timm' in hub.dependencies
    for name in sequencer.list_models():
        assert callable(getattr(hub, name)) and getattr(hub, name).__doc__
    public = {n for n in dir(hub) if not n.startswith('_') and callable(getattr(hub, n))}
    assert public == set(sequencer.list_models())


def test_torch_hub_load_local():
    model = torch.hub.load(ROOT, 'sequencer2d_s', source='local', pretrained=False, num_classes=7, **TINY)
    assert isinstance(model, sequencer.Sequencer2D)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    vanilla = torch.hub.load(ROOT, 'v_sequencer_s', source='local', num_classes=2, layers=(1, 1, 1, 1))
    assert isinstance(vanilla, sequencer.VanillaSequencer)
