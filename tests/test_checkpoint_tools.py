"""avg-checkpoints and clean-checkpoint on a tiny run folder written the way the training loop writes it."""
import hashlib
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import sequencer
from sequencer.cli import main
from sequencer.engine.checkpoint_tools import average_state_dicts

from analysis_helpers import save_training_checkpoint, tiny_model


def _filled(model, value):
    """The model's state dict with every float tensor set to ``value`` (integer buffers kept)."""
    return {k: torch.full_like(v, value) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def run_dir(tmp_path):
    """Epochs 1..4, weights = epoch (EMA weights = 10 x epoch), metric (top-1) 5, 9, 7, 8; plus last/best."""
    model = tiny_model(num_classes=4)
    run = tmp_path / 'run'
    for epoch, metric in ((1, 5.0), (2, 9.0), (3, 7.0), (4, 8.0)):
        model.load_state_dict(_filled(model, float(epoch)))
        save_training_checkpoint(str(run / f'checkpoint-{epoch}.pth.tar'), model, epoch=epoch, metric=metric,
                                 ema=_filled(model, 10.0 * epoch))
    save_training_checkpoint(str(run / 'last.pth.tar'), model, epoch=4, metric=8.0)
    save_training_checkpoint(str(run / 'model_best.pth.tar'), model, epoch=2, metric=9.0)
    return run


def _values(path):
    sd = load_file(str(path))
    vals = {round(v.float().mean().item(), 5) for k, v in sd.items() if v.is_floating_point()}
    return sd, vals


def test_average_last_n(run_dir, tmp_path):
    out = tmp_path / 'avg.safetensors'
    assert main(['avg-checkpoints', str(run_dir), '--last', '2', '--output', str(out)]) == 0
    sd, vals = _values(out)
    assert vals == {3.5}  # mean of epochs 3 and 4
    assert 'head.fc.weight' in sd and not any(k.startswith(('optimizer', 'module.')) for k in sd)
    model = tiny_model(num_classes=4)
    sequencer.load_checkpoint(model, str(out))  # loads strictly into the architecture


def test_average_best_n_by_metric_and_ema(run_dir, tmp_path):
    out = tmp_path / 'best.safetensors'
    assert main(['avg-checkpoints', str(run_dir), '--best', '2', '--output', str(out)]) == 0
    assert _values(out)[1] == {3.0}  # epochs 2 (metric 9) and 4 (metric 8)
    assert main(['avg-checkpoints', str(run_dir), '--best', '3', '--use-ema', '--output', str(out)]) == 0
    assert _values(out)[1] == {30.0}  # EMA of epochs 2, 4, 3
    assert main(['avg-checkpoints', str(run_dir), '--best', '1', '--lower-is-better', '--output', str(out)]) == 0
    assert _values(out)[1] == {1.0}


def test_average_ranks_by_summary_csv_when_metric_missing(tmp_path):
    model = tiny_model(num_classes=4)
    run = tmp_path / 'run'
    for epoch in (1, 2, 3):
        model.load_state_dict(_filled(model, float(epoch)))
        save_training_checkpoint(str(run / f'checkpoint-{epoch}.pth.tar'), model, epoch=epoch)
    (run / 'summary.csv').write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
                                     '1,2.0,2.0,30.0,60.0,0.1\n2,1.5,1.6,20.0,50.0,0.1\n3,1.2,1.3,40.0,70.0,0.1\n')
    out = tmp_path / 'avg.pth'
    assert main(['avg-checkpoints', str(run), '--best', '2', '--output', str(out)]) == 0
    sd = torch.load(out, weights_only=True)  # a plain state dict for a .pth output
    assert {round(v.mean().item(), 5) for v in sd.values() if v.is_floating_point()} == {2.0}  # epochs 1 and 3


def test_average_state_dicts_keeps_dtypes_and_integer_buffers():
    a = {'w': torch.tensor([1.0, 2.0], dtype=torch.float16), 'n': torch.tensor(3)}
    b = {'w': torch.tensor([3.0, 6.0], dtype=torch.float16), 'n': torch.tensor(7)}
    avg = average_state_dicts([a, b])
    assert avg['w'].dtype == torch.float16 and avg['w'].tolist() == [2.0, 4.0]
    assert avg['n'].item() == 7
    with pytest.raises(sequencer.errors.UserError, match='keys differ'):
        average_state_dicts([a, {'w': a['w']}], ['a.pth', 'b.pth'])


def test_clean_checkpoint_names_file_by_sha256(run_dir, tmp_path):
    out_dir = tmp_path / 'published'
    assert main(['clean-checkpoint', str(run_dir / 'checkpoint-3.pth.tar'), '--output', str(out_dir) + os.sep]) == 0
    files = os.listdir(out_dir)
    assert len(files) == 1 and re.fullmatch(r'sequencer2d_s-[0-9a-f]{8}\.safetensors', files[0])
    path = out_dir / files[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest()[:8] == files[0][-20:-12]
    sd, vals = _values(path)
    assert vals == {3.0}
    raw = torch.load(run_dir / 'checkpoint-3.pth.tar', weights_only=True)['state_dict']
    assert set(sd) == set(raw)
    # --use-ema keeps the EMA weights; an explicit name keeps its stem
    assert main(['clean-checkpoint', str(run_dir / 'checkpoint-3.pth.tar'), '--use-ema',
                 '--output', str(tmp_path / 'pub' / 'seq-s.safetensors')]) == 0
    (ema_file,) = os.listdir(tmp_path / 'pub')
    assert ema_file.startswith('seq-s-') and _values(tmp_path / 'pub' / ema_file)[1] == {30.0}
    model = tiny_model(num_classes=4)
    sequencer.load_checkpoint(model, str(tmp_path / 'pub' / ema_file))


def test_checkpoint_tool_user_errors(run_dir, tmp_path, capsys):
    assert main(['clean-checkpoint', str(run_dir / 'last.pth.tar'), '--use-ema', '--output', str(tmp_path)]) == 2
    assert 'holds no EMA weights' in capsys.readouterr().err
    assert main(['clean-checkpoint', str(tmp_path / 'nope.pth.tar'), '--output', str(tmp_path)]) == 2
    assert 'nope.pth.tar: no such checkpoint file' in capsys.readouterr().err
    assert main(['avg-checkpoints', str(tmp_path), '--last', '2', '--output', str(tmp_path / 'x.safetensors')]) == 2
    assert 'no checkpoint-<epoch>.pth.tar files' in capsys.readouterr().err
    (tmp_path / 'bad.pth.tar').write_bytes(b'not a checkpoint')
    assert main(['avg-checkpoints', str(tmp_path / 'bad.pth.tar'), '--output', str(tmp_path / 'x.safetensors')]) == 2
    err = capsys.readouterr().err.strip()
    assert 'bad.pth.tar: not a readable checkpoint' in err and '\n' not in err


def test_average_refuses_to_overwrite_one_of_its_inputs(run_dir, capsys):
    target = run_dir / 'checkpoint-4.pth.tar'
    before = target.read_bytes()
    assert main(['avg-checkpoints', str(run_dir), '--last', '2', '--output', str(target)]) == 2
    assert 'is one of the checkpoints being averaged' in capsys.readouterr().err
    assert target.read_bytes() == before
