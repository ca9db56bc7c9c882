"""`-c recipe.yaml`: each value is checked against the kind of its option (flag, KEY=VALUE pairs, string, number,
several values) and reaches the args as the command line would give it; anything else is one line naming the
recipe and the option, exit 2."""
import pytest
import yaml

from sequencer.cli import main
from sequencer.engine.args import build_train_parser, build_validate_parser, parse
from sequencer.errors import UserError

PARSERS = {'train': build_train_parser, 'validate': build_validate_parser}

REFUSED = [  # recipe, the message after "FILE: "
    ('model_kwargs: [1, 2]', '--model-kwargs must be KEY=VALUE text, a list of it or a mapping, got [1, 2]'),
    ('model_kwargs: {1: 2}', '--model-kwargs must be KEY=VALUE text, a list of it or a mapping, got {1: 2}'),
    ('model_kwargs: layers', "--model-kwargs expected key=value, got 'layers'"),
    ('model_kwargs: "layers=\'(1,1"', "--model-kwargs no closing quotation in \"layers='(1,1\""),
    ('class_map: [a.txt]', "--class-map must be a string, got ['a.txt']"),
    ('data_dir: [a]', "--data-dir must be a string, got ['a']"),
    ('model: {name: x}', "--model must be a string, got {'name': 'x'}"),
    ('pretrained: "no"', "--pretrained must be true or false, got 'no'"),
    ('amp: 3', '--amp must be true or false, got 3'),
    ('pretrained: null', '--pretrained must be true or false, got None'),
    ('batch_size: null', '--batch-size must be an integer at least 1, got None'),
    ('batch_size: abc', "--batch-size must be an integer at least 1, got 'abc'"),
    ('seed: 1.5', '--seed must be an integer, got 1.5'),
    ('mean: [0.5, x, 0.5]', "--mean must be a number, got 'x'"),
    ('mean: []', '--mean takes at least 1 value, got none'),
    ('input_size: [3, 32]', '--input-size takes 3 values, got 2'),
    ('rnn_engine: 3', "--rnn-engine must be one of 'auto', 'native', 'fused', got '3'"),
    ('batch-size: 8', 'unknown option(s) batch-size (did you mean batch_size?)'),
    ('1: 2', 'unknown option(s) 1'),
]


@pytest.mark.parametrize('command', sorted(PARSERS))
@pytest.mark.parametrize('text, message', REFUSED)
def test_wrong_kinds_of_values_are_one_line(tmp_path, capsys, command, text, message):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(text + '\n')
    try:
        code = main([command, '-c', str(recipe), str(tmp_path)])
    except SystemExit as e:   # argparse's own message (which does not name the recipe)
        code = e.code
    assert (code, capsys.readouterr().err) == (2, f"sequencer {command}: error: {recipe}: {message}\n")


@pytest.mark.parametrize('command', sorted(PARSERS))
def test_every_option_refuses_a_value_of_no_kind(tmp_path, command):
    """Table-driven from the parser: no option takes a list of lists; each says so, naming itself."""
    for action in PARSERS[command]()._actions:
        if action.option_strings == ['-h', '--help'] or action.dest == 'config':   # (no recipe names a recipe)
            continue
        recipe = tmp_path / f'{action.dest}.yaml'
        recipe.write_text(yaml.safe_dump({action.dest: [[1]]}))
        with pytest.raises(UserError) as err:
            parse(PARSERS[command](), ['-c', str(recipe), str(tmp_path)])
        source, flag, rest = str(err.value).split(' ', 2)
        assert source == f'{recipe}:' and flag in (*action.option_strings, action.dest), str(err.value)
        assert rest.startswith('must be ') and rest.endswith((' got [[1]]', ' got [1]')), str(err.value)


SAME = [  # recipe, the command line giving the same args
    ('mean: 0.5', ['--mean', '0.5']),
    ('mean: [0.5, 0.4, 0.3]', ['--mean', '0.5', '0.4', '0.3']),
    ('model_kwargs: "layers=(1,1,1,1)"', ['--model-kwargs', 'layers=(1,1,1,1)']),
    ("model_kwargs: layers='(1, 1, 2, 1)' union=add", ['--model-kwargs', 'layers=(1, 1, 2, 1)', 'union=add']),
    ('model_kwargs: ["layers=(1,1,1,1)", union=add]', ['--model-kwargs', 'layers=(1,1,1,1)', 'union=add']),
    ('model_kwargs: {union: add, drop_rate: 0.5}', ['--model-kwargs', 'union=add', 'drop_rate=0.5']),
    ('class_map: 5', ['--class-map', '5']),
    ('pretrained: true\namp: true', ['--pretrained', '--amp']),
    ('pretrained: false\namp: false', []),
    ('torchcompile: true', ['--torchcompile']),
    ('torchcompile: false', []),
    ('batch_size: "8"\ncrop_pct: 1', ['-b', '8', '--crop-pct', '1']),
    ('input_size: [3, 32, 32]\ngp: null', ['--input-size', '3', '32', '32']),
]


@pytest.mark.parametrize('command', sorted(PARSERS))
@pytest.mark.parametrize('text, argv', SAME)
def test_recipe_values_equal_the_command_line(tmp_path, command, text, argv):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(text + '\n')
    from_recipe = vars(parse(PARSERS[command](), ['-c', str(recipe), 'DIR'])[0])
    from_flags = vars(parse(PARSERS[command](), ['DIR', *argv])[0])
    assert from_recipe.pop('config') == str(recipe) and from_flags.pop('config') == ''
    assert from_recipe == from_flags


def test_scalar_mean_and_model_kwargs_text_reach_the_args(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('mean: 0.5\nmodel_kwargs: "layers=(1,1,1,1) union=add"\n')
    args, _ = parse(build_train_parser(), ['-c', str(recipe), 'DIR'])
    assert args.mean == [0.5] and args.model_kwargs == {'layers': (1, 1, 1, 1), 'union': 'add'}
    args, _ = parse(build_validate_parser(), ['-c', str(recipe), 'DIR', '--model-kwargs', 'union=cat'])
    assert args.model_kwargs == {'layers': (1, 1, 1, 1), 'union': 'cat'}   # the command line wins, key by key
