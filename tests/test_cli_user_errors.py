"""User errors of train / validate / predict / export found by review: each is one line on stderr naming the flag,
file or folder, exit 2, and nothing left behind."""
import os
import subprocess
import sys

import pytest
import torch

from sequencer.cli import main
from sequencer.errors import UserError

from imagedata import make_image_folder

TINY_KW = ['layers=(1,1,1,1)', 'patch_sizes=(4,2,1,1)', 'embed_dims=(16,32,32,32)', 'hidden_sizes=(4,8,8,8)']
TINY = ['--model', 'sequencer2d_s', '--model-kwargs', *TINY_KW, '--img-size', '32']


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:   # argparse's own checks
        return e.code


def _one_line(capsys, *parts):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith('note: ')]   # (predict's note on weights)
    assert 'Traceback' not in err and len(lines) == 1 and ': error: ' in lines[0], err
    for part in parts:
        assert part in lines[0], (part, err)
    return lines[0]


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1, size=(36, 36))


def _train(data, tmp_path, *extra, name='run'):
    return ['train', data, *TINY, '-b', '2', '-j', '0', '--epochs', '1', '--warmup-epochs', '0',
            '--output', str(tmp_path / 'runs'), '--experiment', name, *extra]


def _images(tmp_path):
    from PIL import Image
    (tmp_path / 'images').mkdir(exist_ok=True)
    Image.new('RGB', (40, 40), (90, 30, 20)).save(tmp_path / 'images' / 'a.jpg')
    return str(tmp_path / 'images')


# V1
def test_an_unknown_global_pool_type_is_one_line(tmp_path, data, capsys):
    assert _exit_code(_train(data, tmp_path, '--gp', 'foo')) == 2
    _one_line(capsys, '--gp', "invalid choice: 'foo'")
    assert _exit_code(['validate', data, *TINY, '--gp', 'foo', '-j', '0']) == 2
    _one_line(capsys, '--gp')
    from sequencer.engine.loading import create_model_checked  # timm's assert, from another path than --gp
    with pytest.raises(UserError, match='bad model arguments .*Invalid pool type: foo'):
        create_model_checked('sequencer2d_s', {'global_pool': 'foo', 'layers': (1, 1, 1, 1)})
    assert not (tmp_path / 'runs').exists()


# V2
def test_a_class_map_that_is_not_text_names_the_file(tmp_path, data, capsys):
    binary = tmp_path / 'cmbin.txt'
    binary.write_bytes(b'\xff\xfe\xfa\x00\x81')
    assert _exit_code(_train(data, tmp_path, '--class-map', str(binary))) == 2
    _one_line(capsys, f'{binary}: not a UTF-8 text file')
    assert _exit_code(['validate', data, *TINY, '-j', '0', '--class-map', str(binary)]) == 2
    _one_line(capsys, f'{binary}: not a UTF-8 text file')
    assert _exit_code(['predict', '--model', 'sequencer2d_s', '--model-kwargs', *TINY_KW, '--num-classes', '2',
                       '--img-size', '32', '--class-map', str(binary), '--', _images(tmp_path)]) == 2
    _one_line(capsys, f'{binary}: not a UTF-8 text file')
    assert not (tmp_path / 'runs').exists()


# V5
@pytest.mark.parametrize('device', ['gpu', 'foo', 'mps'])
def test_train_and_validate_refuse_an_unknown_device(tmp_path, data, capsys, device):
    assert _exit_code(_train(data, tmp_path, '--device', device)) == 2
    _one_line(capsys, f'--device {device}: ')
    assert _exit_code(['validate', data, *TINY, '-j', '0', '--device', device]) == 2
    _one_line(capsys, f'--device {device}: ')
    assert not (tmp_path / 'runs').exists()


# V6
def test_images_directly_in_a_split_folder_or_a_single_class_are_refused(tmp_path, data, capsys):
    flat = tmp_path / 'flat'
    for split in ('train', 'val'):
        (flat / split).mkdir(parents=True)
        for name in os.listdir(os.path.join(data, split, 'n00000000')):
            os.link(os.path.join(data, split, 'n00000000', name), flat / split / name)
    assert _exit_code(_train(str(flat), tmp_path)) == 2
    _one_line(capsys, f'{flat / "train"}: images directly in the split folder; put them in one folder per class')
    assert _exit_code(['validate', str(flat), *TINY, '-j', '0']) == 2
    _one_line(capsys, f'{flat / "val"}: images directly in the split folder')
    one = make_image_folder(tmp_path / 'one', classes=1, train_per_class=2, val_per_class=1, size=(36, 36))
    assert _exit_code(_train(one, tmp_path)) == 2
    _one_line(capsys, f'{one}: the training split holds 1 class', 'at least 2')
    assert not (tmp_path / 'runs').exists()


# V7, V8
@pytest.mark.parametrize('flags,message', [
    (['--reprob', '0.5', '--remode', 'foo'], "argument --remode: invalid choice: 'foo'"),
    (['--mixup', '0.2', '--mixup-mode', 'foo'], "argument --mixup-mode: invalid choice: 'foo'"),
    (['--mean', 'nan'], "argument --mean: must be a number, got 'nan'"),
    (['--opt', 'adamw', '--opt-betas', '0.9', 'nan'], "argument --opt-betas: must be a number"),
    (['--lr-noise', 'nan'], "argument --lr-noise: must be a number"),
    (['--lr-noise-std', 'inf'], "argument --lr-noise-std: must be a number"),
    (['--lr-cycle-mul', 'nan'], "argument --lr-cycle-mul: must be a number"),
    (['--lr-cycle-decay', 'inf'], "argument --lr-cycle-decay: must be a number"),
    (['--lr-k-decay', 'nan'], "argument --lr-k-decay: must be a number"),
])
def test_augmentation_modes_and_float_flags_are_checked_by_name(tmp_path, data, capsys, flags, message):
    assert _exit_code(_train(data, tmp_path, *flags)) == 2
    _one_line(capsys, message)
    assert not (tmp_path / 'runs').exists()


def test_a_recipe_with_an_unknown_erasing_mode_is_one_line(tmp_path, data, capsys):
    (tmp_path / 'r.yaml').write_text('remode: foo\nmean: .nan\n')
    assert _exit_code(_train(data, tmp_path, '-c', str(tmp_path / 'r.yaml'))) == 2
    _one_line(capsys, 'r.yaml: --remode must be one of')


# V9
def test_a_start_epoch_beyond_the_epochs_is_refused_and_a_finished_run_says_so(tmp_path, data, capsys):
    assert _exit_code(_train(data, tmp_path, '--start-epoch', '1', name='v9')) == 2
    _one_line(capsys, '--start-epoch 1: nothing to train', '--epochs 1')
    assert not (tmp_path / 'runs').exists()
    assert _exit_code([*_train(data, tmp_path, name='v9'), '--check-args', '--start-epoch', '5']) == 2
    _one_line(capsys, '--start-epoch 5: nothing to train')
    # a finished run, resumed: nothing to train, said in a line, exit 0
    assert main(_train(data, tmp_path, name='done')) == 0
    last = tmp_path / 'runs' / 'done' / 'last.pth.tar'
    capsys.readouterr()
    assert main(_train(data, tmp_path, '--resume', str(last), name='again')) == 0
    assert 'nothing to train: the run is at epoch 1 of 1' in capsys.readouterr().out


# V11
def test_a_failed_resume_leaves_no_run_folder(tmp_path, data, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a resume file that does not exist: its folder (the run folder by default) is not created
    assert _exit_code(['train', data, *TINY, '-b', '2', '-j', '0', '--epochs', '1', '--resume',
                       'typo_dir/sub/last.pth.tar']) == 2
    _one_line(capsys, 'typo_dir/sub/last.pth.tar: not a complete training checkpoint')
    assert not (tmp_path / 'typo_dir').exists()
    assert main(_train(data, tmp_path, name='done')) == 0
    last = tmp_path / 'runs' / 'done' / 'last.pth.tar'
    capsys.readouterr()
    # a resume whose weights do not fit the model: no run folder left behind
    other = ['train', data, '--model', 'sequencer2d_s', '--model-kwargs', 'layers=(1,1,1,1)', 'patch_sizes=(4,2,1,1)',
             'embed_dims=(8,8,8,8)', 'hidden_sizes=(4,4,4,4)', '--img-size', '32', '-b', '2', '-j', '0', '--epochs',
             '2', '--output', str(tmp_path / 'runs'), '--experiment', 'wrong', '--resume', str(last)]
    assert _exit_code(other) == 2
    _one_line(capsys, str(last))
    assert not (tmp_path / 'runs' / 'wrong').exists()


def test_tensorboard_missing_is_refused_before_the_run_folder(tmp_path, data, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'tensorboard' else real(name, *a))
    assert _exit_code(_train(data, tmp_path, '--log-tensorboard')) == 2
    _one_line(capsys, '--log-tensorboard needs the tensorboard package')
    assert not (tmp_path / 'runs').exists()


# V12
def test_predict_without_model_or_checkpoint_says_to_give_one(tmp_path, capsys):
    assert _exit_code(['predict', _images(tmp_path)]) == 2
    assert _one_line(capsys).endswith('error: give --model NAME or --checkpoint FILE')


# V10
_SIGTERM_IN_A_WRITE = '''
import os, signal, sys
from sequencer.cli import _run
from sequencer.engine.io import atomic_open
before = signal.getsignal(signal.SIGTERM)

def work():
    with atomic_open(os.path.join(sys.argv[1], 'e.onnx'), 'w') as f:
        f.write('partial')
        os.kill(os.getpid(), signal.SIGTERM)
        f.write('never')   # (the handler raises before this)

status = _run('export', work)
assert signal.getsignal(signal.SIGTERM) is before   # restored
sys.exit(status)
'''


def test_sigterm_during_a_write_removes_the_temporary_file(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    proc = subprocess.run([sys.executable, '-c', _SIGTERM_IN_A_WRITE, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip() == 'sequencer export: terminated', proc.stderr
    assert os.listdir(out) == []   # the temporary file removed, nothing written


# V4
def test_validate_honours_in_chans_and_gp_or_refuses_them(tmp_path, data, capsys):
    from sequencer.factory import create_model
    model = create_model('sequencer2d_s', layers=(1, 1, 1, 1), patch_sizes=(4, 2, 1, 1), embed_dims=(16, 32, 32, 32),
                         hidden_sizes=(4, 8, 8, 8), num_classes=2, in_chans=1, img_size=32)
    torch.save(model.state_dict(), tmp_path / 'gray.pth')
    validate = ['validate', data, *TINY, '-b', '2', '-j', '0', '--checkpoint', str(tmp_path / 'gray.pth')]
    assert _exit_code([*validate, '--in-chans', '5']) == 2
    _one_line(capsys, '--in-chans 5: images are read as RGB (3 channels) or grayscale (1)')
    assert _exit_code([*validate, '--input-size', '5', '32', '32']) == 2
    _one_line(capsys, '--input-size 5 32 32: images are read as RGB')
    assert main([*validate, '--in-chans', '1', '--gp', 'max']) == 0
    assert 'input (1, 32, 32)' in capsys.readouterr().out
    from sequencer.engine import validate as validate_mod
    built = []
    real = validate_mod.create_model_checked

    def spy(name, kwargs, *args, **options):
        built.append(dict(kwargs))
        return real(name, kwargs, *args, **options)

    validate_mod.create_model_checked = spy
    try:
        assert main([*validate, '--input-size', '1', '32', '32', '--gp', 'avgmax']) == 0
    finally:
        validate_mod.create_model_checked = real
    assert built[-1]['in_chans'] == 1 and built[-1]['global_pool'] == 'avgmax'


# V3
def test_a_grayscale_run_is_predicted_and_exported_from_its_checkpoint(tmp_path, data, capsys):
    """A run trained with --in-chans 1: predict and export build a one-channel model from the checkpoint alone
    (they built an RGB one and refused the weights), and predict reads the images as grayscale."""
    assert main(_train(data, tmp_path, '--in-chans', '1', name='gray')) == 0
    ckpt = str(tmp_path / 'runs' / 'gray' / 'last.pth.tar')
    capsys.readouterr()
    assert main(['predict', _images(tmp_path), '--checkpoint', ckpt, '--json', '-k', '1']) == 0
    assert '"topk"' in capsys.readouterr().out
    script = tmp_path / 'gray.pt'
    assert main(['export', '--checkpoint', ckpt, '--format', 'torchscript', '--output', str(script)]) == 0
    out = capsys.readouterr().out
    assert 'input N x 1 x 32 x 32' in out and 'grayscale' in out, out


def test_the_dataset_given_twice_or_a_recipe_naming_a_recipe_is_one_line(tmp_path, data, capsys):
    """A positional DIR and a different --data-dir (--data-dir silently won); a recipe's data_dir gives way to
    the command line's DIR; a recipe's own config: key (silently not read)."""
    other = str(tmp_path / 'elsewhere')
    assert _exit_code([*_train(data, tmp_path), '--data-dir', other]) == 2
    _one_line(capsys, 'the dataset given twice', other)
    from sequencer.engine.args import build_train_parser, parse
    (tmp_path / 'd.yaml').write_text(f'data_dir: {other}\n')
    args, _ = parse(build_train_parser(), [data, '-c', str(tmp_path / 'd.yaml')])
    assert args.data_dir == data
    (tmp_path / 'n.yaml').write_text('config: other.yaml\n')
    assert _exit_code(_train(data, tmp_path, '-c', str(tmp_path / 'n.yaml'))) == 2
    _one_line(capsys, 'n.yaml: config: a recipe cannot name another recipe')


def test_check_args_refuses_pretrained_for_a_model_without_published_weights(tmp_path, data, capsys):
    """--check-args (distributed_train.sh's pre-launch check) catches --pretrained on a model without published
    weights, which the launched processes each failed on."""
    argv = ['train', data, '--model', 'gru_sequencer2d_s', '--pretrained', '--check-args']
    assert _exit_code(argv) == 2
    _one_line(capsys, '--pretrained: gru_sequencer2d_s has no published weights')
