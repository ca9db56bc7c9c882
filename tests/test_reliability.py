"""Reliability: a crash loses nothing, bad data and bad arguments get one clear line, loaded files execute nothing.

Training runs use the tiny configuration of test_train.py on tiny image folders: one uninterrupted run is the
reference that killed and resumed runs must reproduce bit for bit.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import ROOT, TINY, summary, weights

from sequencer.cli import COMMANDS, main
from sequencer.data.datasets import BadSampleError, Samples, build_dataset
from sequencer.data.images import open_image
from sequencer.engine.train import find_resume
from sequencer.errors import UserError
from sequencer.models import create_model

from imagedata import make_image_folder

TINY_KWARGS = dict(layers=(1, 1, 1, 1), patch_sizes=(4, 2, 1, 1), embed_dims=(16, 32, 32, 32),
                   hidden_sizes=(4, 8, 8, 8))
# 24 training images in batches of 4: 6 steps an epoch
COMMON = [*TINY, '-b', '4', '--opt', 'adamw', '--lr', '1e-2', '--warmup-epochs', '1', '--seed', '7',
          '--log-interval', '1']


def train(data, folder, *extra, workers='0'):
    """``sequencer train`` in this process; the exit code."""
    return main(['train', str(data), *COMMON, '-j', workers, '--output', str(folder.parent),
                 '--experiment', folder.name, *extra])


def one_error(capsys, command='train'):
    """The single stderr line of a failed command (no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith(f'sequencer {command}: error: '), err
    return lines[0]


def temporary_files(folder):
    return [n for n in os.listdir(folder) if (n.startswith('.') and n.endswith('.tmp')) or n.endswith('.tmp-link')]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return make_image_folder(root / 'images', classes=3, train_per_class=8, val_per_class=2, size=(36, 36))


@pytest.fixture(scope='module')
def finished(data, tmp_path_factory):
    """A finished 2-epoch run with recovery checkpoints: checkpoint-0/1, last, model_best, recovery."""
    folder = tmp_path_factory.mktemp('finished') / 'runs' / 'exp'
    assert train(data, folder, '--epochs', '2', '--recovery-interval', '4') == 0
    return folder


def copy_run(finished, tmp_path):
    folder = tmp_path / 'runs' / finished.name
    shutil.copytree(finished, folder)
    return folder


# ---- crashes lose nothing ----------------------------------------------------------------------------------
CRASH_ARGS = ['--epochs', '3', '--recovery-interval', '1', '--resume', 'auto']

# `python train.py ARGS` that imports torch and timm first and waits for its arguments on stdin: several
# are started at once, so that the imports overlap and a kill's delay is measured from training itself.
PRELOAD = ("import json, runpy, sys\n"
           "import sequencer.engine.train\n"
           "argv = json.loads(sys.stdin.readline())\n"
           "sys.argv = [sys.argv[1], *argv]\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")


class Trainer:
    """A train.py process in a process group of its own (its loader workers included)."""

    def __init__(self, cwd, name):
        self.out = cwd / f'{name}.out'
        with open(self.out, 'w') as f:
            self.proc = subprocess.Popen([sys.executable, '-c', PRELOAD, os.path.join(ROOT, 'train.py')], cwd=cwd,
                                         env=dict(os.environ, OMP_NUM_THREADS='1'), stdin=subprocess.PIPE,
                                         stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def go(self, argv):
        self.proc.stdin.write(json.dumps([str(a) for a in argv]) + '\n')
        self.proc.stdin.close()

    def output(self):
        return self.out.read_text()

    def wait_for(self, reached, timeout=180):
        """True once ``reached(output)``, False if the process ended before."""
        end = time.time() + timeout
        while time.time() < end:
            if reached(self.output()):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        raise AssertionError(f"not reached after {timeout}s:\n{self.output()[-3000:]}")

    def signal(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:  # already gone
            pass

    def kill(self):
        """SIGKILL the whole group if still running; True if the kill is what ended it."""
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        return self.proc.returncode == -signal.SIGKILL

    def close(self):
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=60)


@pytest.fixture
def trainers(tmp_path):
    started = []

    def start(n):
        started.extend(Trainer(tmp_path, f'p{len(started) + i}') for i in range(n))
        return started[-n:]
    yield start
    for t in started:
        t.close()


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
    """The uninterrupted 3-epoch run, in this process with one thread like the OMP_NUM_THREADS=1 processes
    (-j 0: the samples are seeded by (seed, epoch, index), so -j 2 must give the same run)."""
    folder = tmp_path_factory.mktemp('reference') / 'runs' / 'ref'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(data, folder, *CRASH_ARGS) == 0
    finally:
        torch.set_num_threads(threads)
    assert [r['epoch'] for r in summary(folder)] == ['0', '1', '2']
    return folder


def steps_done(output, steps=6):
    """How far a run's progress lines got, in steps from the start (6 an epoch)."""
    done = [int(e) * steps + int(s) for e, s in re.findall(r'^epoch (\d+) \[(\d+)/\d+\]', output, re.M)]
    return max(done, default=0)


@pytest.mark.parametrize('workers', ['0', '2'])
def test_sigkill_at_random_moments_then_resume_auto_is_exact(tmp_path, data, reference, trainers, workers):
    folder = tmp_path / 'runs' / 'killed'
    argv = [data, *COMMON, '-j', workers, '--output', folder.parent, '--experiment', folder.name, *CRASH_ARGS]
    procs = trainers(4)  # three to kill, one to finish; the same command line each time
    # random moments: a random step of each epoch; the kill lands 0-150 ms after that step is logged (in a
    # step, a checkpoint write, the evaluation), whatever the speed of the machine
    rng = random.Random(20220 + int(workers))
    targets = [6 * epoch + rng.randint(1, 6) for epoch in range(3)]
    killed = []
    for p, target in zip(procs[:3], targets):
        p.go(argv)
        if p.wait_for(lambda out: steps_done(out) >= target):
            time.sleep(rng.uniform(0.0, 0.15))
        if p.kill():
            lines = [line for line in p.output().splitlines() if line.startswith('epoch ')]
            killed.append(lines[-1] if lines else '(before the first step)')
    had_checkpoint = os.path.isdir(folder) and any(n.endswith('.pth.tar') for n in os.listdir(folder))
    last = procs[3]
    last.go(argv)
    assert last.proc.wait(timeout=300) == 0, last.output()[-3000:]
    # the kills hit the run (the first one always: it lands in epoch 0 or 1)
    assert killed, [p.output()[-500:] for p in procs]
    assert ('resumed from' in last.output()) == had_checkpoint, killed
    a, b = weights(reference / 'last.pth.tar'), weights(folder / 'last.pth.tar')
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, killed)
    assert (folder / 'summary.csv').read_bytes() == (reference / 'summary.csv').read_bytes(), killed
    assert temporary_files(folder) == []


def test_resume_auto_skips_corrupt_checkpoints(tmp_path, data, finished, capsys):
    folder = copy_run(finished, tmp_path)
    last, recovery = folder / 'last.pth.tar', folder / 'recovery.pth.tar'
    good = last.read_bytes()
    last.unlink()  # replaced, not truncated in place: model_best / checkpoint-1 may be links to the same file
    last.write_bytes(good[:len(good) // 2])
    recovery.unlink()
    recovery.write_bytes(b'\x00not a checkpoint' * 300)
    (folder / '.last.pth.tar.x1y2z3.tmp').write_bytes(good[:100])  # what a kill during a save leaves
    before = summary(folder)

    # --resume FILE on the truncated file: one line naming it, nothing changed
    assert train(data, folder, '--epochs', '3', '--resume', str(last)) == 2
    line = one_error(capsys)
    assert f"{last}: not a complete training checkpoint" in line and 'truncated' in line
    assert last.read_bytes() == good[:len(good) // 2]

    assert train(data, folder, '--epochs', '3', '--resume', 'auto') == 0
    out = capsys.readouterr().out
    assert f"skipping {last}: truncated or corrupt checkpoint" in out
    assert f"skipping {recovery}: truncated or corrupt checkpoint" in out
    assert f"resumed from {folder / 'checkpoint-1.pth.tar'} at epoch 2\n" in out
    rows = summary(folder)
    assert [r['epoch'] for r in rows] == ['0', '1', '2'] and rows[:2] == before
    ckpt = torch.load(last, map_location='cpu', weights_only=True)
    assert ckpt['next_epoch'] == 3 and ckpt['next_batch'] == 0
    assert temporary_files(folder) == []


def test_a_signal_during_the_last_evaluation_ends_the_run_as_finished(tmp_path, data, capsys, monkeypatch):
    """SIGTERM arriving after the last training step (here: during the last epoch's evaluation) leaves nothing to
    stop: the run ends as finished, with no advice to resume it."""
    from sequencer.engine import train as train_module
    real = train_module.evaluate
    calls = []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:                       # the second epoch's evaluation: the last one
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, 'evaluate', evaluate)
    folder = tmp_path / 'runs' / 'late'
    assert train(data, folder, '--epochs', '2') == 0
    out = capsys.readouterr().out
    assert 'stopped after epoch' not in out and '--resume auto' not in out, out
    assert [r['epoch'] for r in summary(folder)] == ['0', '1'] and 'best ' in out


def test_sigint_saves_a_recovery_checkpoint_and_says_how_to_resume(tmp_path, data, trainers):
    folder = tmp_path / 'runs' / 'cut'
    (p,) = trainers(1)
    # batches of 2: 12 steps in epoch 0, so the interruption lands mid-epoch
    p.go([data, *COMMON, '-b', '2', '--epochs', '2', '-j', '2', '--output', folder.parent,
          '--experiment', folder.name])
    assert p.wait_for(lambda out: steps_done(out, 12) >= 2), p.output()
    p.signal(signal.SIGINT)  # to the whole group, as Ctrl-C does: the loader workers get it too
    assert p.proc.wait(timeout=120) == 130, p.output()   # 128 + SIGINT: stopped, not finished
    out = p.output()
    assert 'SIGINT: saved' in out and '--resume auto' in out and 'Traceback' not in out, out
    assert f"--experiment cut --output {folder.parent}" in out
    ckpt = torch.load(folder / 'recovery.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['next_epoch'] == 0 and 2 <= ckpt['next_batch'] < 12
    assert find_resume(str(folder), print) == str(folder / 'recovery.pth.tar')
    assert not os.path.exists(folder / 'last.pth.tar')


def test_nonfinite_loss_stops_keeping_the_last_checkpoint_or_skips(tmp_path, data, finished, capsys):
    folder = copy_run(finished, tmp_path)
    last = folder / 'last.pth.tar'
    good = last.read_bytes()
    # --mean 1e38: every input overflows to -inf (--mean nan itself is refused), so the first loss is NaN
    assert train(data, folder, '--epochs', '3', '--resume', 'auto', '--mean', '1e38') == 2
    line = one_error(capsys)
    assert 'non-finite loss at epoch 2, step 0' in line
    assert f"last good checkpoint in {folder} is intact" in line and '--nonfinite skip' in line
    assert last.read_bytes() == good
    assert torch.load(last, map_location='cpu', weights_only=True)['next_epoch'] == 2

    assert train(data, folder, '--epochs', '3', '--resume', 'auto', '--mean', '1e38', '--nonfinite', 'skip') == 0
    out = capsys.readouterr().out
    assert [f"epoch 2 step {s}: non-finite loss, step skipped" in out for s in range(6)] == [True] * 6
    rows = summary(folder)
    assert rows[2]['epoch'] == '2' and rows[2]['train_loss'] == 'nan'  # no step trained: no loss to report
    old, new = weights(finished / 'last.pth.tar'), weights(last)
    assert all(torch.equal(old[k], new[k]) for k in old)  # every step skipped: the weights did not move


# ---- bad data ----------------------------------------------------------------------------------------------
def _odd_images(folder):
    """Files that must load as RGB: name -> (expected size (w, h), expected pixel (0, 0))."""
    os.makedirs(folder, exist_ok=True)

    def p(name):
        return os.path.join(folder, name)

    Image.fromarray(np.full((20, 30), 100, np.uint8)).save(p('gray.jpg'), quality=100)
    Image.new('CMYK', (30, 20), (0, 255, 255, 0)).save(p('cmyk.jpg'), quality=100)
    Image.new('RGBA', (30, 20), (10, 20, 30, 0)).save(p('rgba.png'))
    Image.new('LA', (30, 20), (77, 128)).save(p('la.png'))
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(p('white16.png'))
    Image.fromarray(np.full((20, 30), 32768, np.uint16)).save(p('mid16.png'))
    Image.fromarray(np.full((20, 30), 200, np.uint16)).save(p('dark16.png'))  # 200 / 65535: nearly black
    pal = Image.new('P', (30, 20), 1)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(p('palette.png'))
    pal.save(p('palette_transparent.png'), transparency=0)
    rot = Image.new('RGB', (40, 20), (0, 200, 0))
    for o in (6, 8):
        exif = Image.Exif()
        exif[0x0112] = o  # orientation: rotated 90 degrees, so the loaded size is swapped
        rot.save(p(f'exif{o}.jpg'), exif=exif.tobytes(), quality=100)
    return {'gray.jpg': ((30, 20), (100, 100, 100)), 'cmyk.jpg': ((30, 20), (255, 0, 0)),
            'rgba.png': ((30, 20), (10, 20, 30)), 'la.png': ((30, 20), (77, 77, 77)),
            'white16.png': ((30, 20), (255, 255, 255)), 'mid16.png': ((30, 20), (128, 128, 128)),
            'dark16.png': ((30, 20), (0, 0, 0)), 'palette.png': ((30, 20), (0, 0, 255)),
            'palette_transparent.png': ((30, 20), (0, 0, 255)),
            'exif6.jpg': ((20, 40), (0, 200, 0)), 'exif8.jpg': ((20, 40), (0, 200, 0))}


def _bad_files(folder):
    """Unreadable files with image names: name -> what PIL says."""
    os.makedirs(folder, exist_ok=True)

    def p(name):
        return os.path.join(folder, name)

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p('tmp.jpg'))
    whole = open(p('tmp.jpg'), 'rb').read()
    os.unlink(p('tmp.jpg'))
    with open(p('truncated.jpg'), 'wb') as f:
        f.write(whole[:len(whole) // 2])
    open(p('empty.jpg'), 'wb').close()
    with open(p('notes.jpg'), 'w') as f:
        f.write('not an image\n')
    return {'truncated.jpg': 'OSError', 'empty.jpg': 'UnidentifiedImageError', 'notes.jpg': 'UnidentifiedImageError'}


def test_odd_image_modes_load_as_rgb(tmp_path):
    for name, (size, pixel) in _odd_images(tmp_path).items():
        img = open_image(str(tmp_path / name))
        assert img.mode == 'RGB' and img.size == size, name
        assert tuple(np.asarray(img)[0, 0]) == pytest.approx(pixel, abs=2), name


def test_unreadable_files_name_the_file(tmp_path):
    root = tmp_path / 'ds'
    make_image_folder(root, classes=1, train_per_class=2, val_per_class=1, size=(36, 36))
    bad = _bad_files(root / 'train' / 'n00000000')
    # a real decompression bomb: 16000 x 12000 1-bit pixels (23 kB on disk), beyond 2x Image.MAX_IMAGE_PIXELS,
    # so PIL refuses it at open
    Image.new('1', (16000, 12000)).save(root / 'train' / 'n00000000' / 'bomb.png')
    bad['bomb.png'] = 'DecompressionBombError'
    (root / 'train' / 'n00000000' / 'README.txt').write_text('not a sample')
    ds = build_dataset('', str(root), 'train', True)
    paths = [p for p, _ in ds.reader.samples]
    assert len(paths) == 2 + len(bad) and not any(p.endswith('README.txt') for p in paths)
    fail, skip = Samples(ds, None), Samples(ds, None, bad_samples='skip')
    for i, path in enumerate(paths):
        name = os.path.basename(path)
        if name not in bad:
            img, target = fail[i]
            assert img.size == (36, 36) and target == 0
            continue
        with pytest.raises(BadSampleError) as e:
            fail[i]
        assert str(e.value).startswith(f"{path}: unreadable image ({bad[name]}") and '\n' not in str(e.value)
        assert skip[i] is None


def _tree(root, train, val):
    for split, classes in (('train', train), ('val', val)):
        os.makedirs(root / split, exist_ok=True)
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            Image.new('RGB', (36, 36), (50, 60, 70)).save(root / split / c / 'a.jpg')
    return root


def test_dataset_layout_errors_name_the_folder_or_class(tmp_path, capsys):
    empty = _tree(tmp_path / 'empty', ['a', 'b'], ['a', 'b'])
    for f in os.listdir(empty / 'train' / 'b'):
        os.unlink(empty / 'train' / 'b' / f)
    (empty / 'train' / 'b' / 'README.txt').write_text('no images here')
    with pytest.raises(UserError, match=f"^{empty / 'train' / 'b'}: empty class folder"):
        build_dataset('', str(empty), 'train', True)
    no_val = _tree(tmp_path / 'no_val', ['a'], [])
    shutil.rmtree(no_val / 'val')
    with pytest.raises(UserError, match=f"no 'validation' split folder found \\(expected {no_val / 'val'}/\\)"):
        build_dataset('', str(no_val), 'validation', False)
    no_train = _tree(tmp_path / 'no_train', [], ['a'])
    shutil.rmtree(no_train / 'train')
    with pytest.raises(UserError, match=f"no 'train' split folder found \\(expected {no_train / 'train'}/\\)"):
        build_dataset('', str(no_train), 'train', True)
    ok = _tree(tmp_path / 'ok', ['a', 'b'], ['a', 'b'])
    (ok / 'classes.txt').write_text('a\nb\nzebra\n')
    with pytest.raises(UserError, match="classes.txt: names class 'zebra' which has no folder"):
        build_dataset('', str(ok), 'train', True, class_map=str(ok / 'classes.txt'))
    # through the command: train and validation with different class folders
    differ = _tree(tmp_path / 'differ', ['a', 'b', 'c'], ['a', 'b', 'd'])
    assert main(['train', str(differ), *TINY, '-b', '1', '-j', '0', '--output', str(tmp_path / 'out')]) == 2
    line = one_error(capsys)
    assert "train and validation class folders differ (only in train: ['c']; only in validation: ['d'])" in line
    assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('workers', ['0', '2'])
def test_bad_samples_fail_naming_the_file_before_any_checkpoint(tmp_path, capsys, workers):
    root = tmp_path / 'ds'
    make_image_folder(root, classes=3, train_per_class=3, val_per_class=1, size=(36, 36))
    bad = _bad_files(root / 'train' / 'n00000001')  # 12 training files: 3 batches of 4, none dropped
    paths = [str(root / 'train' / 'n00000001' / n) for n in bad]
    folder = tmp_path / 'runs' / 'bad'
    assert train(root, folder, '--epochs', '2', workers=workers) == 2
    line = one_error(capsys)
    named = [p for p in paths if line.startswith(f"sequencer train: error: {p}: unreadable image (")]
    assert len(named) == 1, line
    assert not [n for n in os.listdir(folder) if n.endswith('.pth.tar')]

    assert train(root, folder, '--epochs', '1', '--bad-samples', 'skip', workers=workers) == 0
    assert 'epoch 0: skipped 3 unreadable sample(s)' in (folder / 'log.txt').read_text()
    assert [r['epoch'] for r in summary(folder)] == ['0']


def _kill_tree(pid):
    """SIGKILL pid and every process below it (found through /proc; Linux)."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_rank_whose_whole_batch_is_unreadable_skips_the_step_with_the_others(tmp_path):
    """DDP with --bad-samples skip and one image per rank and step: the step where one rank's only image is
    unreadable is skipped by every rank (no rank waits in a collective the other skipped), and the run ends."""
    root = tmp_path / 'ds'
    make_image_folder(root, classes=3, train_per_class=2, val_per_class=1, size=(36, 36))
    open(root / 'train' / 'n00000001' / 'empty.jpg', 'wb').close()   # 7 training files, one unreadable
    folder = tmp_path / 'runs' / 'ddp'
    argv = [os.path.join(ROOT, 'distributed_train.sh'), '2', str(root), *COMMON, '-b', '1', '--epochs', '1',
            '-j', '0', '--bad-samples', 'skip', '--output', str(folder.parent), '--experiment', folder.name]
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    log = tmp_path / 'launch.log'
    with open(log, 'w') as f:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)   # the launcher and the ranks it started (in sessions of their own)
            proc.wait()
            pytest.fail('the ranks hung: ' + log.read_text()[-2000:])
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert 'epoch 0: skipped 1 unreadable sample(s)' in out, out[-3000:]
    assert [r['epoch'] for r in summary(folder)] == ['0']


def test_odd_images_and_stray_files_train(tmp_path, capsys):
    root = tmp_path / 'ds'
    make_image_folder(root, classes=2, train_per_class=2, val_per_class=1, size=(36, 36))
    odd = _odd_images(root / 'train' / 'n00000000')
    (root / 'train' / 'n00000001' / 'README.txt').write_text('ignored')
    folder = tmp_path / 'runs' / 'odd'
    assert train(root, folder, '--epochs', '1', workers='2') == 0
    assert f"{4 + len(odd)} train / 2 eval images" in capsys.readouterr().out


# ---- bad arguments -----------------------------------------------------------------------------------------
def test_bad_arguments_exit_2_with_one_line(tmp_path, data, capsys):
    five = tmp_path / 'five.pth'
    torch.save({'state_dict': create_model('sequencer2d_s', num_classes=5, **TINY_KWARGS).state_dict()}, five)
    other = tmp_path / 'other.pth'
    torch.save(create_model('sequencer2d_s', num_classes=3, **dict(TINY_KWARGS, layers=(2, 1, 1, 1))).state_dict(),
               other)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(five.read_bytes()[:3000])
    out = ['-j', '0', '--output', str(tmp_path / 'out')]
    cases = [
        (['train', data, *TINY, '-b', '2', '--num-classes', '3', '--initial-checkpoint', str(five), *out],
         "the checkpoint's head has 5 classes, the model's 3"),
        (['train', data, *TINY, '-b', '2', '--initial-checkpoint', str(other), *out],
         f"{other} does not fit sequencer2d_s: unexpected: stages.0.blocks.1."),
        (['train', data, *TINY, '-b', '2', '--sched', 'nosuchsched', *out], '--sched nosuchsched'),
        (['train', data, *TINY, '-b', '2', '--aa', 'nonsense', *out],
         '--aa nonsense: not a valid augmentation policy'),
        (['train', data, *TINY, '-b', '2', '--aa', 'rand-m9-mstd', *out],
         "--aa rand-m9-mstd: not a valid augmentation policy (section 'mstd' has no value)"),
        (['train', data, *TINY, '-b', '2', '--std', '0', *out], 'argument --std: must be a number above 0, got 0'),
        (['validate', data, *TINY, '--checkpoint', five, '--num-classes', '5', '--std', '0.2', '0', '0.2', '-j', '0'],
         'argument --std: must be a number above 0, got 0'),
        (['validate', data, *TINY, '--checkpoint', truncated, '-j', '0'], f"{truncated}: not a readable checkpoint"),
        (['validate', str(tmp_path / 'nowhere'), *TINY, '-j', '0'], 'nowhere: data directory does not exist'),
        (['validate', data, '--model', 'sequencer2d_ss', '-j', '0'], "unknown model 'sequencer2d_ss'; did you mean"),
    ]
    for argv, message in cases:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own checks
            code = e.code
        assert code == 2, argv
        line = one_error(capsys, argv[0])
        assert message in line, (argv, line)
    assert not os.path.exists(tmp_path / 'out')


# ---- loaded files execute nothing --------------------------------------------------------------------------
def test_written_checkpoints_load_weights_only_and_weights_publish_as_safetensors(tmp_path, finished, capsys):
    names = sorted(n for n in os.listdir(finished) if n.endswith('.pth.tar'))
    assert names == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'last.pth.tar', 'model_best.pth.tar',
                     'recovery.pth.tar']
    for name in names:
        ckpt = torch.load(finished / name, map_location='cpu', weights_only=True)
        assert ckpt['arch'] == 'sequencer2d_s' and 'stem.proj.weight' in ckpt['state_dict'], name
    if 'clean-checkpoint' not in COMMANDS:
        return
    assert main(['clean-checkpoint', str(finished / 'last.pth.tar'), '--output', str(tmp_path / 'pub') + os.sep]) == 0
    (name,) = os.listdir(tmp_path / 'pub')
    assert name.endswith('.safetensors')
    from safetensors.torch import load_file
    published, trained = load_file(tmp_path / 'pub' / name), weights(finished / 'last.pth.tar')
    assert published.keys() == trained.keys() and all(torch.equal(published[k], trained[k]) for k in trained)


def test_resume_restores_best_checkpoint_links_a_crash_cut(tmp_path, data, finished, capsys):
    """A kill between writing last.pth.tar and linking checkpoint-<epoch> / model_best: resuming re-creates them."""
    folder = copy_run(finished, tmp_path)
    best = torch.load(folder / 'last.pth.tar', map_location='cpu', weights_only=True)['best']
    assert [e for _, e in best] and 1 in [e for _, e in best]
    os.unlink(folder / 'checkpoint-1.pth.tar')
    os.unlink(folder / 'recovery.pth.tar')
    if best[0][1] == 1:
        os.unlink(folder / 'model_best.pth.tar')
    assert train(data, folder, '--epochs', '2', '--resume', str(folder / 'last.pth.tar')) == 0
    capsys.readouterr()
    restored = torch.load(folder / 'checkpoint-1.pth.tar', map_location='cpu', weights_only=True)
    assert restored['next_epoch'] == 2
    assert os.path.isfile(folder / 'model_best.pth.tar')


_LATE_SIGNAL_RANK = textwrap.dedent('''
    import os, signal, sys
    from sequencer.cli import main
    from sequencer.engine import train
    real = train.Dist.all_max
    calls = [0]

    def all_max(self, value):
        out = real(self, value)
        if sys._getframe(1).f_code.co_name == 'agree_on_stop':
            calls[0] += 1
            if self.rank == 1 and calls[0] == 2:
                os.kill(os.getpid(), signal.SIGTERM)   # just after the ranks agreed to go on
        return out

    train.Dist.all_max = all_max
    sys.exit(main(sys.argv[1:]))
''')


def test_a_signal_after_the_ranks_agreed_stops_every_rank_at_the_same_step(tmp_path, data):
    """A signal that reaches one rank just after the ranks agreed to go on (a per-step collective) is acted
    on at the next agreement, by every rank: no rank leaves while the others wait in a collective."""
    import socket
    folder = tmp_path / 'runs' / 'ddp'
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, '-c', _LATE_SIGNAL_RANK, 'train', data, *COMMON, '-b', '2', '--epochs', '2', '-j', '0',
            '--output', str(folder.parent), '--experiment', folder.name]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2',
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), OMP_NUM_THREADS='1')
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail('the ranks hung after one of them was signalled: ' + ''.join(
            (p.communicate()[0] or '')[-1500:] for p in procs))
    assert [p.returncode for p in procs] == [143, 143], outs   # 128 + SIGTERM on every rank
    assert 'SIGTERM: saved' in outs[0], outs[0]
    ckpt = torch.load(folder / 'recovery.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['next_epoch'] == 0 and ckpt['next_batch'] == 3    # the agreement after the third step


def test_sigterm_to_a_ddp_launch_saves_on_all_ranks_and_resumes(tmp_path, data):
    """torchrun forwards SIGTERM to every rank: the ranks agree on the step, rank 0 saves, all exit."""
    folder = tmp_path / 'runs' / 'ddp'
    argv = [os.path.join(ROOT, 'distributed_train.sh'), '2', data, *COMMON, '-b', '2', '--epochs', '2', '-j', '0',
            '--output', str(folder.parent), '--experiment', folder.name]
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out = ''
    for line in proc.stdout:
        out += line
        if line.startswith('epoch 0 [2/'):
            proc.send_signal(signal.SIGTERM)  # the launcher only, as a scheduler's preemption does
            break
    out += proc.communicate(timeout=300)[0]
    assert 'SIGTERM: saved' in out, out
    ckpt = torch.load(folder / 'recovery.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['next_epoch'] == 0 and ckpt['next_batch'] >= 2
    done = subprocess.run(argv + ['--resume', 'auto'], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert 'resumed from' in done.stdout
    assert [r['epoch'] for r in summary(folder)] == ['0', '1']


def test_an_epoch_without_an_eval_figure_never_ranks_best(tmp_path):
    """NaN (no validation sample could be read) ranks below every figure, for either direction of the metric."""
    import math

    from sequencer.engine.train import Keeper
    for decreasing, figures in ((False, [math.nan, 50.0, 60.0]), (True, [math.nan, 2.0, 1.0])):
        folder = tmp_path / str(decreasing)
        folder.mkdir()
        keeper = Keeper(str(folder), 2, decreasing=decreasing)
        for epoch, m in enumerate(figures):
            keeper.save_epoch({'epoch': epoch}, epoch, m)
        assert [e for _, e in keeper.best] == [2, 1]
        assert sorted(os.listdir(folder)) == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar', 'last.pth.tar',
                                              'model_best.pth.tar']
        assert os.path.samefile(folder / 'model_best.pth.tar', folder / 'checkpoint-2.pth.tar')


def test_resume_refuses_what_the_run_did_not_train_on(tmp_path, data, finished, capsys):
    """Resuming continues the same run: other classes (folder order decides the labels), another optimizer,
    or another batch geometry in the middle of an epoch are refused in one line, before anything is trained."""
    folder = copy_run(finished, tmp_path)
    other = tmp_path / 'other'
    shutil.copytree(data, other)
    first = sorted(os.listdir(other / 'train'))[0]
    for split in ('train', 'val'):
        os.rename(other / split / first, other / split / 'zzz')
    last = str(folder / 'last.pth.tar')
    assert train(other, folder, '--epochs', '3', '--resume', last) == 2
    assert 'the run trained on other classes' in one_error(capsys)
    assert train(data, folder, '--epochs', '3', '--resume', last, '--opt', 'sgd') == 2
    assert 'the run trained with --opt adamw, not --opt sgd' in one_error(capsys)
    recovery = folder / 'recovery.pth.tar'
    assert torch.load(recovery, map_location='cpu', weights_only=True)['next_batch'] > 0
    assert train(data, folder, '--epochs', '3', '--resume', str(recovery), '-b', '2') == 2
    assert 'with --batch-size 4 on 1 process(es)' in one_error(capsys)
    for name in ('last.pth.tar', 'recovery.pth.tar', 'summary.csv'):   # nothing of the run was touched
        assert (folder / name).read_bytes() == (finished / name).read_bytes(), name
