"""The `sequencer` command: the model table, and one-line errors with exit code 2."""
import os
import subprocess
import sys

import pytest
from imagedata import make_image_folder

from sequencer.analysis.model_table import markdown, rows
from sequencer.cli import main

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


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own checks
        return e.code


def test_out_of_range_options_and_model_arguments_are_one_line(tmp_path, capsys):
    """Option values outside their range (on the command line or in a -c recipe), input sizes the model cannot
    take and --model-kwargs the models reject end with one line and exit 2 before any work."""
    make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1)
    data = str(tmp_path / 'data')
    (tmp_path / 'images').mkdir()
    from PIL import Image
    Image.new('RGB', (40, 40), (90, 30, 20)).save(tmp_path / 'images' / 'a.jpg')
    images = str(tmp_path / 'images')
    kw = ['--model-kwargs', 'layers=(1,1,1,1)', 'embed_dims=(8,8,8,8)', 'hidden_sizes=(4,4,4,4)']
    tiny = ['--model', 'sequencer2d_s', *kw, '--img-size', '32']
    out = ['--output', str(tmp_path / 'runs')]
    train = ['train', data, *tiny, '-b', '2', '-j', '0', *out]
    recipes = {'zero_epochs.yaml': 'epochs: 0\n', 'one_scale.yaml': 'scale: [0.5]\n',
               'engine.yaml': 'rnn_engine: bogus\n', 'channels.yaml': 'mean: [0.5, 0.5]\n'}
    for name, text in recipes.items():
        (tmp_path / name).write_text(text)
    (tmp_path / 'binary.yaml').write_bytes(bytes(range(128, 256)))
    recipe = lambda name: ['-c', str(tmp_path / name)]  # noqa: E731
    cases = [
        ([*train, '--epochs', '0'], 'argument --epochs: must be an integer at least 1, got 0'),
        ([*train, '--log-interval', '0'], 'argument --log-interval: must be an integer at least 1, got 0'),
        ([*train, '--smoothing', '1'], 'argument --smoothing: must be a number at least 0 and below 1, got 1'),
        ([*train, '--reprob', '2'], 'argument --reprob: must be a number at least 0 and at most 1, got 2'),
        ([*train, '--drop-path', '2'], 'argument --drop-path: must be a number at least 0 and below 1'),
        ([*train, '--model-ema-decay', '1.5'], 'argument --model-ema-decay: must be a number at least 0'),
        ([*train, '--warmup-epochs', '-1'], 'argument --warmup-epochs: must be an integer at least 0, got -1'),
        ([*train, '--checkpoint-hist', '0'], 'argument --checkpoint-hist: must be an integer at least 1'),
        ([*train, '--lr', 'nan'], "argument --lr: must be a number at least 0, got 'nan'"),
        ([*train, '--scale', '0.5'], 'argument --scale: expected 2 arguments'),
        ([*train, '--scale', '1', '0.5'], '--scale 1.0 0.5: give the smaller value first'),
        ([*train, '--ratio', '0', '1'], 'argument --ratio: must be a number above 0, got 0'),
        ([*train, '--interpolation', 'bogus'], "argument --interpolation: invalid choice: 'bogus'"),
        ([*train, '--mean', '1', '2'], '--mean 1.0 2.0: give one value or one per channel (3)'),
        ([*train, '--img-size', '8'], "--img-size 8x8: smaller than the model's total patch size 14"),
        ([*train, *recipe('zero_epochs.yaml')], 'zero_epochs.yaml: --epochs must be an integer at least 1, got 0'),
        ([*train, *recipe('one_scale.yaml')], 'one_scale.yaml: --scale takes 2 values, got 1'),
        ([*train, *recipe('engine.yaml')], "engine.yaml: --rnn-engine must be one of 'auto', 'native', 'fused'"),
        ([*train, *recipe('channels.yaml')], '--mean 0.5 0.5: give one value or one per channel (3)'),
        ([*train, *recipe('binary.yaml')], 'binary.yaml: not a text file'),
        ([*train[:6], 'mlp_ratios=(1,1)', *train[6:]], 'per-stage settings must have one entry per stage'),
        (['validate', data, '--model', 'sequencer2d_s', '-b', '0'], 'argument -b/--batch-size: must be an integer'),
        (['validate', data, '--model', 'sequencer2d_s', '--crop-pct', '0'], 'argument --crop-pct: must be a number '
                                                                             'above 0'),
        (['predict', '--model', 'sequencer2d_s', '--num-classes', '2', '--model-kwargs', 'patch_sizes=(0,2,1,1)', '--',
          data], 'bad model arguments'),
        (['predict', '--model', 'sequencer2d_s', *kw, '-b', '0', '--', images], 'argument -b/--batch-size: must be'),
        (['predict', '--model', 'sequencer2d_s', *kw, '--img-size', '13', '--', images],
         "--img-size 13x13: smaller than the model's total patch size 14"),
        (['erf', images, '--model', 'sequencer2d_s', *kw, '--img-size', '-3', '-o', str(tmp_path / 'erf')],
         'argument --img-size: must be an integer at least 1, got -3'),
        (['robustness', '--model', 'sequencer2d_s', '--imagenet-a', images, '-j', '-1', '-o', str(tmp_path / 'r')],
         'argument -j/--workers: must be an integer at least 0, got -1'),
        (['export', '--model', 'sequencer2d_s', *kw, '--tolerance', '-1', '--format', 'onnx', '-o',
          str(tmp_path / 'x.onnx')], 'argument --tolerance: must be a number at least 0, got -1'),
        (['demo', '--epochs', '0', '--output', str(tmp_path / 'demo')], 'argument --epochs: must be an integer'),
        (['demo', '--output', str(tmp_path / 'images' / 'a.jpg')], 'a.jpg: is a file, not a folder'),
        (['benchmark', '--model', 'sequencer2d_s', '--layers', '1,1,1,1', '--compile-mode', 'bogus'],
         '--compile-mode bogus: '),
    ]
    for argv, message in cases:
        assert _exit_code(argv) == 2, argv
        err = capsys.readouterr().err.strip()   # (torch may warn about the zero-size layer first)
        assert 'Traceback' not in err and 'usage:' not in err and message in err.splitlines()[-1], (argv, err)
    assert not os.path.exists(tmp_path / 'runs')


def _help_texts():
    """(command, option, rendered help) of every option of every sub-command, as its --help shows it."""
    import argparse
    from sequencer.cli import build_parser
    from sequencer.engine import demo
    from sequencer.engine.args import build_train_parser, build_validate_parser
    parsers = {'train': build_train_parser(), 'validate': build_validate_parser(), 'demo': demo.build_parser()}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers.update((name, p) for name, p in sub.choices.items() if name not in parsers)
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help is not argparse.SUPPRESS and action.option_strings:
                yield name, '/'.join(action.option_strings), formatter._expand_help(action), action


def test_help_says_each_default_once_and_never_none(capsys):
    """No option's help repeats '(default: ...)', contradicts itself ('(default: avg) (default: None)') or shows
    '(default: None)'; a default value the help states is the parser's own where the parser has one."""
    import re
    seen = 0
    for command, option, text, action in _help_texts():
        defaults = re.findall(r'\(default: ([^)]*)\)', text)
        assert len(defaults) <= 1, (command, option, text)
        assert not defaults or defaults[0] not in ('None', ''), (command, option, text)
        if defaults and action.default not in (None, '') and not isinstance(action.default, (list, tuple)) \
                and re.fullmatch(r'[-\w.]+', defaults[0]):   # a value, not words such as "the model's"
            assert defaults[0] == str(action.default), (command, option, text)
        seen += 1
    assert seen > 150
    # as printed
    from sequencer.cli import COMMANDS, OWN_PARSER
    for command in [*OWN_PARSER, *COMMANDS]:
        with pytest.raises(SystemExit):
            main([command, '--help'])
        out = capsys.readouterr().out
        assert 'usage:' in out and '(default: None)' not in out, command
        for block in re.split(r'\n  (?=-)', out):
            assert block.count('(default:') <= 1, (command, block)
