"""The `sequencer` command: the model table, and one-line errors with exit code 2."""
import os
import subprocess
import sys


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
