"""validate and resolution: which weights are evaluated, and one-line errors, before the work, for data the
model cannot score (more classes than outputs), a split that does not exist and unreadable images."""
import dataclasses
import json
import os

import pytest
import torch

import sequencer
from sequencer.analysis import resolution
from sequencer.cli import main
from sequencer.engine.evaluate import evaluate
from sequencer.errors import UserError
from sequencer.models import registry

from imagedata import make_image_folder

KWARGS = dict(layers=(1, 1, 1, 1), embed_dims=(8, 8, 8, 8), hidden_sizes=(4, 4, 4, 4))
TINY = ['--model', 'sequencer2d_s', '--model-kwargs', 'layers=(1,1,1,1)', 'embed_dims=(8,8,8,8)',
        'hidden_sizes=(4,4,4,4)', '--img-size', '32']


def tiny(num_classes, favourite=None):
    """A tiny Sequencer2D-S; with ``favourite`` its logits ignore the image and always pick that class."""
    model = sequencer.create_model('sequencer2d_s', num_classes=num_classes, **KWARGS)
    if favourite is not None:
        with torch.no_grad():
            model.head.fc.weight.zero_()
            model.head.fc.bias.zero_()
            model.head.fc.bias[favourite] = 1.0
    return model


def training_checkpoint(path, model):
    torch.save({'epoch': 1, 'arch': 'sequencer2d_s', 'state_dict': model.state_dict(),
                'num_classes': model.num_classes, 'model_kwargs': dict(KWARGS)}, path)
    return str(path)


@pytest.fixture
def data(tmp_path):
    """3 classes, 2 validation images each."""
    return make_image_folder(tmp_path / 'data', classes=3, train_per_class=1, val_per_class=2, size=(32, 32))


def one_error(capsys, command):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f'sequencer {command}: error: '), err
    return err


# ---- validate: which weights --------------------------------------------------------------------------------
def test_validate_without_weight_options_says_it_evaluates_the_published_weights(tmp_path, data, monkeypatch,
                                                                                   capsys):
    """As timm's validate.py: neither --checkpoint nor --pretrained evaluates the published weights, but a note
    says so before they are fetched (here 'published' from a local file, for a tiny sequencer2d_s)."""
    published = str(tmp_path / 'published.pth')
    torch.save(tiny(1000, favourite=1).state_dict(), published)
    spec = registry.MODELS['sequencer2d_s']
    monkeypatch.setitem(registry.MODELS, 'sequencer2d_s',
                        dataclasses.replace(spec, args={**spec.args, **KWARGS}, weights=(published,)))
    out = tmp_path / 'r.json'
    assert main(['validate', data, '--model', 'sequencer2d_s', '--img-size', '32', '-j', '0',
                 '--results-file', str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('note: neither --checkpoint nor --pretrained given: evaluating the published '
                               'sequencer2d_s weights'), lines
    assert 'published weights' in lines[1]
    res = json.loads(out.read_text())
    assert res['images'] == 6 and res['top1'] == pytest.approx(100 / 3, abs=1e-3)  # always class 1: 2 of 6
    # an explicit --pretrained needs no note
    assert main(['validate', data, '--model', 'sequencer2d_s', '--img-size', '32', '-j', '0', '--pretrained']) == 0
    assert 'note:' not in capsys.readouterr().out


@pytest.mark.parametrize('argv, message', [
    (TINY, "sequencer2d_s with layers=(1, 1, 1, 1) embed_dims=(8, 8, 8, 8) hidden_sizes=(4, 4, 4, 4): no "
           "--checkpoint given, and the published weights (evaluated without one, as by timm's validate.py) do not "
           "fit this configuration (stem.proj.weight (8, 3, 7, 7) vs (192, 3, 7, 7)); pass --checkpoint FILE"),
    ([*TINY, '--pretrained'], "--pretrained: the published weights do not fit this configuration"),
    (['--model', 'sequencer2d_s_add', '--img-size', '32'],
     "sequencer2d_s_add: no --checkpoint given, and the model has no published weights to evaluate instead; "
     "pass --checkpoint FILE"),
])
def test_validate_refuses_published_weights_that_cannot_apply_before_any_download(data, monkeypatch, capsys,
                                                                                   argv, message):
    """No weight file, and published weights that do not exist or do not fit --model-kwargs: one line naming
    --checkpoint, without a download attempt (offline, those retries took a minute before failing anyway)."""
    def no_download(*a, **k):
        raise AssertionError('a download was attempted')
    monkeypatch.setattr('sequencer.models.weights.resolve_path', no_download)
    assert main(['validate', data, *argv, '-j', '0']) == 2
    assert message in one_error(capsys, 'validate')


def test_validate_pretrained_path_is_evaluated_like_checkpoint(tmp_path, data, capsys):
    ckpt = training_checkpoint(tmp_path / 'three.pth.tar', tiny(3, favourite=0))
    plain = tmp_path / 'three.pth'
    torch.save(tiny(3, favourite=2).state_dict(), plain)
    results = {}
    for name, flag, path in (('ckpt', '--checkpoint', ckpt), ('path', '--pretrained-path', ckpt),
                             ('plain', '--pretrained-path', str(plain))):
        out = tmp_path / f'{name}.json'
        assert main(['validate', data, *TINY, '-j', '0', flag, path, '--results-file', str(out)]) == 0, name
        results[name] = json.loads(out.read_text())
    assert results['ckpt']['top1'] == results['path']['top1'] == pytest.approx(100 / 3, abs=1e-3)
    assert results['path']['checkpoint'] == ckpt and results['plain']['checkpoint'] == str(plain)
    assert results['plain']['top1'] == pytest.approx(100 / 3, abs=1e-3) and results['plain']['images'] == 6
    assert 'published' not in capsys.readouterr().out


def test_validate_checkpoint_and_pretrained_path_together_are_refused(tmp_path, data, capsys):
    a = training_checkpoint(tmp_path / 'a.pth.tar', tiny(3))
    b = training_checkpoint(tmp_path / 'b.pth.tar', tiny(3))
    assert main(['validate', data, *TINY, '-j', '0', '--checkpoint', a, '--pretrained-path', b]) == 2
    assert one_error(capsys, 'validate').endswith(
        f"--checkpoint {a} and --pretrained-path {b}: both name the weights to evaluate; give one")


# ---- more classes than outputs ---------------------------------------------------------------------------
def test_validate_checkpoint_with_fewer_outputs_than_classes_fails_before_evaluating(tmp_path, data, capsys):
    two = training_checkpoint(tmp_path / 'two.pth.tar', tiny(2))
    plain = tmp_path / 'two.pth'
    torch.save(tiny(2).state_dict(), plain)  # head width read from the weights
    for weights in (two, str(plain)):
        assert main(['validate', data, *TINY, '-j', '0', '--checkpoint', weights]) == 2
        captured = capsys.readouterr()
        assert 'validating' not in captured.out  # refused before any image is read
        err = captured.err.strip()
        assert err == (f"sequencer validate: error: {weights}: the model has 2 outputs but "
                       f"{os.path.join(data, 'val')} has 3 classes (the labels past its outputs cannot be scored); "
                       f"evaluate it on data with at most 2 classes"), err
    # --num-classes below the data's classes (published weights) fails the same way, before any download
    assert main(['validate', data, '--model', 'sequencer2d_s', '--num-classes', '2', '-j', '0']) == 2
    assert "sequencer2d_s (published weights, --num-classes 2): the model has 2 outputs but" in \
        one_error(capsys, 'validate')


def test_validate_more_outputs_than_classes_is_fine(tmp_path, data):
    """An ImageNet-style head evaluated on a subset of its classes."""
    five = training_checkpoint(tmp_path / 'five.pth.tar', tiny(5, favourite=1))
    out = tmp_path / 'r.json'
    assert main(['validate', data, *TINY, '-j', '0', '--checkpoint', five, '--results-file', str(out)]) == 0
    res = json.loads(out.read_text())
    assert res['images'] == 6 and res['top1'] == pytest.approx(100 / 3, abs=1e-3)


def test_evaluate_names_a_label_past_the_outputs_instead_of_an_index_error():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    loader = [(torch.zeros(2, 3), torch.tensor([0, 1])), (torch.zeros(2, 3), torch.tensor([1, 2]))]
    with pytest.raises(UserError, match=r"^label 2 in the data, but the model has 2 outputs"):
        evaluate(model, loader)


def test_resolution_checkpoint_with_fewer_outputs_than_classes_fails_before_any_sweep(tmp_path, data, capsys):
    ok = training_checkpoint(tmp_path / 'three.pth.tar', tiny(3))
    two = training_checkpoint(tmp_path / 'two.pth.tar', tiny(2))
    out = tmp_path / 'res'
    assert main(['resolution', data, '--checkpoint', ok, two, '--sizes', '32', '-j', '0', '--device', 'cpu',
                 '--output', str(out)]) == 2
    err = one_error(capsys, 'resolution')
    assert err.endswith(f"{two}: the model has 2 outputs but {os.path.join(data, 'val')} has 3 classes (the labels "
                        f"past its outputs cannot be scored); evaluate it on data with at most 2 classes"), err
    assert not os.path.exists(out / 'resolution.csv')
    with pytest.raises(UserError, match='the model has 2 outputs but .* has 3 classes'):
        resolution.sweep(tiny(2), data, [32], batch_size=4, workers=0, log=None)


# ---- resolution: splits and unreadable images --------------------------------------------------------------
def test_resolution_unknown_split_is_one_line_naming_data_and_split(tmp_path, data, capsys):
    ckpt = training_checkpoint(tmp_path / 'three.pth.tar', tiny(3))
    assert main(['resolution', data, '--checkpoint', ckpt, '--sizes', '32', '-j', '0', '--split', 'bogus',
                 '--output', str(tmp_path / 'res')]) == 2
    assert one_error(capsys, 'resolution').endswith(
        f"{data}: no 'bogus' split folder found (expected {os.path.join(data, 'bogus')}/)")
    # the synonyms validate knows: 'validation' finds val/, 'train' train/
    rows = resolution.sweep(tiny(3), data, [32], split='train', batch_size=4, workers=0, log=None)
    assert rows[0]['count'] == 3


@pytest.mark.parametrize('workers', ['0', '1'])
def test_resolution_unreadable_image_fails_naming_the_file(tmp_path, data, capsys, workers):
    broken = os.path.join(data, 'val', 'n00000001', 'broken.JPEG')
    with open(broken, 'wb') as f:
        f.write(b'not a jpeg')
    ckpt = training_checkpoint(tmp_path / 'three.pth.tar', tiny(3))
    assert main(['resolution', data, '--checkpoint', ckpt, '--sizes', '32', '-j', workers, '--device', 'cpu',
                 '--output', str(tmp_path / 'res')]) == 2
    err = one_error(capsys, 'resolution')
    assert f"{broken}: unreadable image" in err, err


# ---- validate: what a training checkpoint brings ------------------------------------------------------------
def test_validate_takes_the_runs_architecture_resolution_and_checks_ema_and_classes(tmp_path, data, capsys):
    """Without --model / --img-size, a training checkpoint's architecture and resolution are used (as predict
    and export do); --use-ema on a file without EMA weights is refused; other class folders get a warning."""
    model = sequencer.create_model('sequencer2d_m', num_classes=3, **KWARGS)
    path = str(tmp_path / 'm.pth.tar')
    torch.save({'epoch': 1, 'arch': 'sequencer2d_m', 'state_dict': model.state_dict(), 'num_classes': 3,
                'model_kwargs': dict(KWARGS), 'class_names': sorted(os.listdir(os.path.join(data, 'val'))),
                'args': {'model': 'sequencer2d_m', 'img_size': 40, 'crop_pct': 1.0}}, path)
    out = tmp_path / 'r.json'
    assert main(['validate', data, '--checkpoint', path, '-j', '0', '--results-file', str(out)]) == 0
    result = json.loads(out.read_text())
    assert result['model'] == 'sequencer2d_m' and result['img_size'] == 40 and result['crop_pct'] == 1.0
    logged = capsys.readouterr()
    assert 'img_size 40' in logged.out + logged.err and 'warning' not in logged.out + logged.err
    # the command line wins over the run's settings
    assert main(['validate', data, '--checkpoint', path, '-j', '0', '--img-size', '32', '--results-file',
                 str(out)]) == 0
    assert json.loads(out.read_text())['img_size'] == 32
    capsys.readouterr()
    assert main(['validate', data, '--checkpoint', path, '-j', '0', '--use-ema']) == 2
    assert '--use-ema given but the file holds no EMA weights' in one_error(capsys, 'validate')
    obj = torch.load(path, weights_only=True)
    obj['class_names'] = ['x', 'y', 'z']
    torch.save(obj, path)
    assert main(['validate', data, '--checkpoint', path, '-j', '0']) == 0
    logged = capsys.readouterr()
    assert "warning: the data's classes are not those" in logged.out + logged.err
