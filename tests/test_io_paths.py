"""Output paths below a regular file: the one-line error names that file as the reason (makedirs alone says
'File exists', which reads as if the output itself were in the way)."""
import os

import pytest

from sequencer.cli import main
from sequencer.engine.io import atomic_open, check_output
from sequencer.errors import UserError

REASON = 'Not a directory: afile is a file, not a folder'


@pytest.fixture
def afile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'afile').write_text('keep me')
    return tmp_path


@pytest.mark.parametrize('path', ['afile/m.pt', 'afile/sub/m.pt'])
def test_a_file_where_a_parent_folder_should_be_is_named(afile, path):
    with pytest.raises(UserError, match=f'^--output {path}: cannot write there \\({REASON}\\)$'):
        check_output(path, '--output')
    with pytest.raises(UserError, match=f'^--output {os.path.dirname(path)}/out: cannot write there \\({REASON}\\)$'):
        check_output(os.path.dirname(path) + '/out', '--output', folder=True)
    with pytest.raises(UserError, match=f'^cannot write {path}: {REASON}$'):
        with atomic_open(path) as f:
            f.write('never written')
    assert sorted(os.listdir(afile)) == ['afile'] and (afile / 'afile').read_text() == 'keep me'


def test_absolute_paths_name_the_file_in_full(afile):
    with pytest.raises(UserError, match=f"Not a directory: {afile / 'afile'} is a file, not a folder"):
        check_output(str(afile / 'afile' / 'm.pt'), '--output')


def test_commands_name_the_file_in_the_way(afile, capsys):
    tiny = ['--model', 'sequencer2d_s', '--model-kwargs', 'layers=(1,1,1,1)', 'embed_dims=(8,8,8,8)',
            'hidden_sizes=(4,4,4,4)', '--img-size', '32']
    bench = ['--model', 'sequencer2d_s', '--layers', '1,1,1,1', '--img-size', '32', '--iters', '1', '--warmup', '0']
    for argv, option in ((['export', *tiny, '--format', 'torchscript', '--output', 'afile/m.pt'],
                          '--output afile/m.pt'),
                         (['benchmark', *bench, '--results-file', 'afile/x.csv'], '--results-file afile/x.csv')):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f'sequencer {argv[0]}: error: {option}: cannot write there ({REASON})\n', err
