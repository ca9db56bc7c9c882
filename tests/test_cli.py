"""The `sequencer` command: the model table, and one-line errors with exit code 2."""
import os
import subprocess
import sys

import pytest
from imagedata import make_image_folder

from sequencer.cli import main
from sequencer.models.table import markdown, rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_models_lists_every_model(capsys):
    assert main(['models', 'sequencer2d_[sml]']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ['model', 'params', '(M)']
    names = [line.split()[0] for line in out[1:]]
    assert names == ['sequencer2d_s', 'sequencer2d_m', 'sequencer2d_l']
    assert out[1].split()[1:4] == ['27.65', '8.33', '224']


def test_readme_model_table_is_generated_from_the_table():
    with open(os.path.join(ROOT, 'README.md')) as f:
        readme = f.read()
    assert markdown(rows()) in readme


def test_user_errors_are_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, '-m', 'sequencer.cli', 'models', 'resnet*'], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sequencer models: error: no model matches 'resnet*'; see `sequencer models`"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert 'models' in capsys.readouterr().out


def test_unwritable_outputs_fail_before_the_work_with_one_line(tmp_path, capsys):
    """Every command that writes files checks its output location first: a path it cannot write (here below a
    regular file, which no user can write into) ends the command with one line naming the option and the path,
    and exit 2, before any model is built or any image read. The atomic writer itself names the file too."""
    from sequencer.engine.io import atomic_open
    from sequencer.errors import UserError
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    bad = blocker / 'sub'
    tiny = ['--model', 'sequencer2d_s', '--model-kwargs', 'layers=(1,1,1,1)', 'embed_dims=(8,8,8,8)',
            'hidden_sizes=(4,4,4,4)', '--img-size', '32']
    bench = ['--model', 'sequencer2d_s', '--layers', '1,1,1,1', '--img-size', '32', '--iters', '1', '--warmup', '0']
    cases = [
        (['benchmark', *bench, '--results-file', f'{bad}/r.json'], '--results-file', f'{bad}/r.json'),
        (['validate', str(tmp_path), '--model', 'sequencer2d_s', '--results-file', f'{bad}/v.csv'],
         '--results-file', f'{bad}/v.csv'),
        (['erf', str(tmp_path / 'no_images'), '--model', 'sequencer2d_s', '--output', str(bad)], '--output', str(bad)),
        (['resolution', str(tmp_path), '--model', 'sequencer2d_s', '--sizes', '32', '--output', str(bad)], '--output', str(bad)),
        (['robustness', '--model', 'sequencer2d_s', '--imagenet-a', str(tmp_path), '--output', str(bad)],
         '--output', str(bad)),
        (['export', *tiny, '--format', 'onnx', '--output', f'{bad}/m.onnx'], '--output', f'{bad}/m.onnx'),
        (['avg-checkpoints', str(tmp_path), '--last', '1', '--output', f'{bad}/a.safetensors'],
         '--output', f'{bad}/a.safetensors'),
        (['benchmark', *bench, '--results-file', str(tmp_path / 'x.json')], '--results-file', None),
        (['train', str(tmp_path / 'data'), *tiny, '-b', '2', '-j', '0', '--epochs', '1', '--output', str(bad)],
         '--output', f'{bad}/'),
    ]
    make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1)
    (tmp_path / 'x.json').mkdir()
    for argv, option, path in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f'sequencer {argv[0]}: error: {option} '), (argv, err)
        assert ('cannot write there' in err and path in err) if path else 'is a folder' in err, err
    with pytest.raises(UserError, match=f'cannot write {bad}/f.txt: Not a directory'):
        with atomic_open(f'{bad}/f.txt') as f:
            f.write('never written')
    target = tmp_path / 'folder_in_the_way'
    (target / 'inner').mkdir(parents=True)
    with pytest.raises(UserError, match=f'cannot write {target}: '):
        with atomic_open(str(target)) as f:
            f.write('x')
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'data', 'folder_in_the_way', 'x.json']   # no temporary file left


def test_out_of_range_options_and_model_arguments_are_one_line(tmp_path, capsys):
    """Option values and --model-kwargs the models reject end with one line and exit 2 before any work."""
    make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1)
    data = str(tmp_path / 'data')
    tiny = ['--model', 'sequencer2d_s', '--model-kwargs', 'layers=(1,1,1,1)', 'embed_dims=(8,8,8,8)',
            'hidden_sizes=(4,4,4,4)', '--img-size', '32']
    out = ['--output', str(tmp_path / 'runs')]
    cases = [
        (['train', data, *tiny, '-b', '2', '-j', '0', '--epochs', '0', *out], '--epochs must be at least 1, got 0'),
        (['train', data, *tiny, '-b', '2', '-j', '0', '--log-interval', '0', *out], '--log-interval must be at least 1'),
        (['train', data, *tiny[:6], 'mlp_ratios=(1,1)', *tiny[6:], '-b', '2', '-j', '0', *out],
         'per-stage settings must have one entry per stage'),
        (['validate', data, '--model', 'sequencer2d_s', '-b', '0'], '--batch-size must be at least 1'),
        (['predict', '--model', 'sequencer2d_s', '--num-classes', '2', '--model-kwargs', 'patch_sizes=(0,2,1,1)', '--',
          data], 'bad model arguments'),
        (['benchmark', '--model', 'sequencer2d_s', '--layers', '1,1,1,1', '--compile-mode', 'bogus'],
         '--compile-mode bogus: '),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()   # (torch may warn about the zero-size layer first)
        assert 'Traceback' not in err and message in err.splitlines()[-1], (argv, err)
    assert not os.path.exists(tmp_path / 'runs')
