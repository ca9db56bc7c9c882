"""Training and validation: the reference README's command lines, DDP, exact resume, outputs."""
import argparse
import csv
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from test_weights import to_reference_layout

from sequencer import create_model
from sequencer.models.weights import read_file

from imagedata import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--model', 'sequencer2d_s', '--model-kwargs', 'layers=(1,1,1,1)', 'patch_sizes=(4,2,1,1)',
        'embed_dims=(16,32,32,32)', 'hidden_sizes=(4,8,8,8)', '--img-size', '32']


def run(cmd, cwd, timeout=600, check=True):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def publish(name, layers):
    """Serve `--pretrained` for `name` from the torch hub cache, in the reference repo's layout."""
    model = create_model(name)
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(folder, exist_ok=True)
    torch.save(to_reference_layout(model.state_dict(), layers=layers), os.path.join(folder, f'{name}.pth'))
    return model


def the_run(cwd):
    runs = os.listdir(os.path.join(cwd, 'output', 'train'))
    assert len(runs) == 1
    return os.path.join(cwd, 'output', 'train', runs[0])


def summary(folder):
    with open(os.path.join(folder, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def weights(path):
    return read_file(path)['state_dict']


@pytest.mark.parametrize('flags, message', [
    (['/no/such/folder', '--model', 'sequencer2d_s'], '/no/such/folder: data directory does not exist'),
    (['.', '--model', 'sequencer2d_s', '--mixup', '0.8', '-b', '3'], '--mixup / --cutmix need an even --batch-size'),
    (['.', '--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
    (['.', '--model', 'sequencer2d_x'], "unknown model 'sequencer2d_x'"),
])
def test_distributed_launch_refuses_bad_flags_once_before_starting(tmp_path, flags, message):
    """A mistake in the flags of ./distributed_train.sh: one line and exit status 2, checked in one process
    before torchrun starts any (not one error per process followed by torchrun's traceback)."""
    proc = run([os.path.join(ROOT, 'distributed_train.sh'), '2', *flags], cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert 'torch.distributed' not in proc.stderr and os.listdir(tmp_path) == []


def test_check_args_builds_and_writes_nothing(tmp_path):
    make_image_folder(tmp_path / 'data', classes=2, train_per_class=1, val_per_class=1)
    proc = run([sys.executable, os.path.join(ROOT, 'train.py'), str(tmp_path / 'data'), *TINY, '--check-args'],
               cwd=tmp_path, timeout=120)
    assert proc.stdout == '' and sorted(os.listdir(tmp_path)) == ['data']
    # the check alone (abbreviated as argparse allows): torchrun starts no process
    proc = run([os.path.join(ROOT, 'distributed_train.sh'), '2', str(tmp_path / 'data'), *TINY, '--check-a'],
               cwd=tmp_path, timeout=120)
    assert proc.stdout == proc.stderr == '' and sorted(os.listdir(tmp_path)) == ['data']
    proc = run([os.path.join(ROOT, 'distributed_train.sh'), '2', '--hel'], cwd=tmp_path, timeout=120)
    assert proc.stdout.count('usage: sequencer train') == 1 and proc.stderr == ''   # help shown once


def test_seed_command_1_from_scratch_ddp(tmp_path):
    data = make_image_folder(tmp_path / 'imagenet', classes=3, train_per_class=2, val_per_class=1)
    run([os.path.join(ROOT, 'distributed_train.sh'), '2', data, '--model', 'sequencer2d_s', '-b', '2', '-j', '0',
         '--opt', 'adamw', '--epochs', '1', '--sched', 'cosine', '--native-amp', '--img-size', '224', '--drop-path',
         '0.1', '--lr', '2e-3', '--weight-decay', '0.05', '--remode', 'pixel', '--reprob', '0.25', '--aa',
         'rand-m9-mstd0.5-inc1', '--smoothing', '0.1', '--mixup', '0.8', '--cutmix', '1.0', '--warmup-lr', '1e-6',
         '--warmup-epochs', '20'], cwd=tmp_path)
    folder = the_run(tmp_path)
    for name in ('args.yaml', 'summary.csv', 'log.txt', 'train_curve.png', 'last.pth.tar', 'model_best.pth.tar',
                 'checkpoint-0.pth.tar'):
        assert os.path.isfile(os.path.join(folder, name)), name
    rows = summary(folder)
    assert [r['epoch'] for r in rows] == ['0']
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
    assert float(rows[0]['lr']) == pytest.approx(1e-6)  # the lr used in epoch 0: the warm-up start
    log = open(os.path.join(folder, 'log.txt')).read()
    assert 'global batch 4' in log and '2 process(es)' in log
    assert 'CPU GEMMs: mkl (measuring off)' in log   # what the fast engine chose, after the first epoch
    ckpt = read_file(os.path.join(folder, 'last.pth.tar'))
    assert ckpt['num_classes'] == 3 and ckpt['args']['mixup'] == 0.8 and ckpt['args']['aa'] == 'rand-m9-mstd0.5-inc1'
    # command 4 on the checkpoint just written
    proc = run([sys.executable, os.path.join(ROOT, 'validate.py'), data, '--model', 'sequencer2d_s', '-b', '16',
                '--input-size', '3', '224', '224', '--amp', '--checkpoint', os.path.join(folder, 'last.pth.tar'),
                '--results-file', str(tmp_path / 'val.json')], cwd=tmp_path)
    import json
    res = json.load(open(tmp_path / 'val.json'))
    assert res['images'] == 3 and 0 <= res['top1'] <= 100 and res['img_size'] == 224
    assert 'top-1' in proc.stdout


def test_seed_command_2_finetune_392(tmp_path):
    publish('sequencer2d_l', layers=(8, 8, 16, 4))
    data = make_image_folder(tmp_path / 'imagenet', classes=2, train_per_class=2, val_per_class=1)
    run([os.path.join(ROOT, 'distributed_train.sh'), '2', data, '--model', 'sequencer2d_l', '--pretrained', '-b',
         '2', '-j', '0', '--opt', 'adamw', '--epochs', '1', '--sched', 'cosine', '--native-amp', '--input-size', '3',
         '392', '392', '--img-size', '392', '--crop-pct', '1.0', '--drop-path', '0.4', '--lr', '5e-5',
         '--weight-decay', '1e-8', '--remode', 'pixel', '--reprob', '0.25', '--aa', 'rand-m9-mstd0.5-inc1',
         '--smoothing', '0.1', '--mixup', '0.8', '--cutmix', '1.0', '--warmup-epochs', '0', '--cooldown-epochs',
         '0'], cwd=tmp_path)
    folder = the_run(tmp_path)
    assert 'input (3, 392, 392)' in open(os.path.join(folder, 'log.txt')).read()
    ckpt = read_file(os.path.join(folder, 'last.pth.tar'))
    assert ckpt['num_classes'] == 2 and ckpt['state_dict']['head.fc.weight'].shape == (2, 384)
    assert float(summary(folder)[0]['lr']) == pytest.approx(5e-5, rel=1e-3)


def test_seed_command_3_transfer_10_classes(tmp_path):
    published = publish('sequencer2d_s', layers=(4, 3, 8, 3))
    data = make_image_folder(tmp_path / 'cifar10', classes=10, train_per_class=1, val_per_class=1, size=(32, 32))
    run([os.path.join(ROOT, 'distributed_train.sh'), '2', data, '--model', 'sequencer2d_s', '-b', '2', '-j', '0',
         '--num-classes', '10', '--pretrained', '--opt', 'adamw', '--epochs', '1', '--sched', 'cosine',
         '--native-amp', '--img-size', '224', '--clip-grad', '1', '--drop-path', '0.1', '--lr', '0.0001',
         '--weight-decay', '1e-4', '--remode', 'pixel', '--aa', 'rand-m9-mstd0.5-inc1', '--smoothing', '0.1',
         '--mixup', '0.8', '--cutmix', '1.0', '--warmup-lr', '1e-6', '--warmup-epochs', '5'], cwd=tmp_path)
    folder = the_run(tmp_path)
    sd = read_file(os.path.join(folder, 'last.pth.tar'))['state_dict']
    assert sd['head.fc.weight'].shape == (10, 384)
    # started from the published weights: after two small steps the stem is still close to them
    assert torch.allclose(sd['stem.proj.weight'], published.stem.proj.weight, atol=1e-2)
    assert not torch.equal(sd['stem.proj.weight'], published.stem.proj.weight)


def test_seed_command_4_validate_published_weights(tmp_path):
    publish('sequencer2d_s', layers=(4, 3, 8, 3))
    data = make_image_folder(tmp_path / 'imagenet', classes=2, train_per_class=1, val_per_class=2)
    proc = run([sys.executable, os.path.join(ROOT, 'validate.py'), data, '--model', 'sequencer2d_s', '-b', '16',
                '--input-size', '3', '224', '224', '--amp'], cwd=tmp_path)
    assert 'published weights' in proc.stdout and '4 images' in proc.stdout
    assert re.search(r'top-1 \d+\.\d+', proc.stdout)


def _train_tiny(tmp_path, data, experiment, *extra, nproc=1, batch=4, epochs=2):
    cmd = ([os.path.join(ROOT, 'distributed_train.sh'), str(nproc)] if nproc > 1 else
           [sys.executable, os.path.join(ROOT, 'train.py')])
    return run(cmd + [data, *TINY, '-b', str(batch), '--epochs', str(epochs), '--opt', 'adamw', '--lr', '1e-2',
                      '--warmup-epochs', '1', '--seed', '7', '--output', str(tmp_path / 'runs'),
                      '--experiment', experiment, *extra], cwd=tmp_path)


def test_ddp_matches_single_process_with_the_same_global_batch(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=4, train_per_class=4, val_per_class=2, size=(36, 36))
    _train_tiny(tmp_path, data, 'one', '-j', '0', nproc=1, batch=4)
    _train_tiny(tmp_path, data, 'two', '-j', '0', nproc=2, batch=2)
    a = weights(tmp_path / 'runs' / 'one' / 'last.pth.tar')
    b = weights(tmp_path / 'runs' / 'two' / 'last.pth.tar')
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k
    ra, rb = summary(tmp_path / 'runs' / 'one'), summary(tmp_path / 'runs' / 'two')
    for x, y in zip(ra, rb):
        assert float(x['train_loss']) == pytest.approx(float(y['train_loss']), abs=1e-4)
        assert float(x['eval_loss']) == pytest.approx(float(y['eval_loss']), abs=1e-4)


@pytest.mark.parametrize('workers', ['0', '2'])
def test_resume_from_an_epoch_checkpoint_is_exact(tmp_path, workers):
    data = make_image_folder(tmp_path / 'data', classes=3, train_per_class=4, val_per_class=2, size=(36, 36))
    _train_tiny(tmp_path, data, 'full', '-j', workers, '--mixup', '0.5', '--drop-path', '0.1', '--model-ema',
                '--model-ema-decay', '0.9', epochs=3)
    full = tmp_path / 'runs' / 'full'
    assert sorted(n for n in os.listdir(full) if n.startswith('checkpoint-')) == [
        'checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'checkpoint-2.pth.tar']
    _train_tiny(tmp_path, data, 'resumed', '-j', workers, '--mixup', '0.5', '--drop-path', '0.1', '--model-ema',
                '--model-ema-decay', '0.9', epochs=3, *['--resume', str(full / 'checkpoint-0.pth.tar')])
    resumed = tmp_path / 'runs' / 'resumed'
    a, b = read_file(full / 'last.pth.tar'), read_file(resumed / 'last.pth.tar')
    for key in ('state_dict', 'state_dict_ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert open(full / 'summary.csv').read() == open(resumed / 'summary.csv').read()
    assert 'eval_ema_top1' in open(full / 'summary.csv').readline()
    if workers == '0':  # validate the EMA weights of the run, CSV results
        run([sys.executable, os.path.join(ROOT, 'validate.py'), data, *TINY, '--checkpoint',
             str(full / 'last.pth.tar'), '--use-ema', '-j', '0', '--results-file', str(tmp_path / 'r.csv')],
            cwd=tmp_path)
        rows = list(csv.DictReader(open(tmp_path / 'r.csv')))
        assert len(rows) == 1 and int(rows[0]['images']) == 6
        assert float(rows[0]['top1']) == pytest.approx(float(summary(full)[-1]['eval_ema_top1']), abs=1e-3)


def test_sigterm_saves_and_resume_auto_continues_exactly(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=3, train_per_class=8, val_per_class=2, size=(36, 36))
    common = [data, *TINY, '-b', '2', '--epochs', '2', '--opt', 'adamw', '--lr', '1e-2', '--seed', '3', '-j', '0',
              '--output', str(tmp_path / 'runs'), '--log-interval', '1']
    run([sys.executable, os.path.join(ROOT, 'train.py'), *common, '--experiment', 'ref'], cwd=tmp_path)
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *common, '--experiment', 'cut'],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = ''
    for line in proc.stdout:  # interrupt once training is under way in epoch 0
        out += line
        if line.startswith('epoch 0 [2/'):
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode == 143, out   # 128 + SIGTERM: a stopped run is not reported as finished
    assert 'SIGTERM: saved' in out and '--resume auto' in out
    cut = tmp_path / 'runs' / 'cut'
    assert os.path.isfile(cut / 'recovery.pth.tar')
    proc = run([sys.executable, os.path.join(ROOT, 'train.py'), *common, '--experiment', 'cut', '--resume', 'auto'],
               cwd=tmp_path)
    assert 'resumed from' in proc.stdout
    a, b = weights(tmp_path / 'runs' / 'ref' / 'last.pth.tar'), weights(cut / 'last.pth.tar')
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert open(tmp_path / 'runs' / 'ref' / 'summary.csv').read() == open(cut / 'summary.csv').read()


def test_recipe_file_and_demo_dataset(tmp_path):
    from sequencer.data.demo import write_digits
    root = write_digits(str(tmp_path / 'digits'))
    assert len(os.listdir(os.path.join(root, 'train'))) == 10
    n_train = sum(len(files) for _, _, files in os.walk(os.path.join(root, 'train')))
    n_val = sum(len(files) for _, _, files in os.walk(os.path.join(root, 'val')))
    assert n_train + n_val == 1797 and n_val == pytest.approx(359, abs=5)
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('opt: adamw\nlr: 0.003\nepochs: 1\nsmoothing: 0.0\nbatch_size: 64\nworkers: 0\n')
    from sequencer.engine.args import build_train_parser, parse
    args, _ = parse(build_train_parser(), ['-c', str(recipe), root, '--lr', '0.01'])
    assert (args.opt, args.lr, args.epochs, args.batch_size, args.data_dir) == ('adamw', 0.01, 1, 64, root)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    from sequencer.cli import main
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=1, val_per_class=1, size=(36, 36))
    cases = [
        (['train', str(tmp_path / 'missing'), *TINY], 'data directory does not exist'),
        (['train', data, '--model', 'sequencer2d_x'], "unknown model 'sequencer2d_x'; did you mean"),
        (['train', data, *TINY, '-b', '64'], 'larger than the 2 training images'),
        (['train', data, *TINY, '-b', '2', '--opt', 'nosuchopt'], '--opt nosuchopt'),
        (['validate', data, *TINY, '--checkpoint', str(tmp_path / 'none.pth')], 'no such checkpoint file'),
        (['train', data, *TINY[:-1], '4', '-b', '2'], 'smaller than the model\'s total patch size'),
        (['train', data, *TINY, '-b', '2', '--torchcompile-mode', 'fastest'],
         '--torchcompile-mode fastest: Unrecognized mode'),
        (['train', data, *TINY, '-b', '2', '--torchcompile', 'aot_eager', '--torchcompile-mode', 'max-autotune'],
         '--torchcompile-mode max-autotune: only the inductor backend takes a mode, not --torchcompile aot_eager'),
        (['train', data, *TINY, '-b', '2', '--torchcompile', 'nosuchbackend'],
         "--torchcompile nosuchbackend: Invalid backend"),
    ]
    for argv, message in cases:
        out = ['--output', str(tmp_path / 'out')] if argv[0] == 'train' else []
        assert main([*argv, '-j', '0', *out]) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (argv, err)
    # argparse's own errors (unknown flags or choices) also exit 2
    proc = run([sys.executable, '-m', 'sequencer.cli', 'train', data, '--sched-on-updatez'], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and 'unrecognized arguments' in proc.stderr


def test_torchcompile_mode_compiles_with_that_mode(tmp_path, monkeypatch):
    """--torchcompile-mode alone compiles with inductor in that mode (as timm's flag of that name, which needs
    --torchcompile besides); --torchcompile BACKEND picks the backend. (torch.compile is replaced by a recorder:
    inductor's C++ build takes minutes on two cores.)"""
    from sequencer.cli import main
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1, size=(36, 36))
    seen = []

    def fake_compile(model, backend=None, mode=None, **kw):
        if not isinstance(model, torch.nn.Identity):   # (the flags' early check wraps an Identity)
            seen.append((backend, mode))
        return real_compile(model, backend=backend, mode=mode) if isinstance(model, torch.nn.Identity) else model

    real_compile = torch.compile

    monkeypatch.setattr(torch, 'compile', fake_compile)
    assert main(['train', data, *TINY, '-j', '0', '-b', '2', '--epochs', '1', '--torchcompile', 'aot_eager',
                 '--output', str(tmp_path / 'out'), '--experiment', 'run']) == 0
    assert main(['validate', data, *TINY, '-j', '0', '--checkpoint', str(tmp_path / 'out' / 'run' / 'last.pth.tar'),
                 '--torchcompile-mode', 'reduce-overhead']) == 0
    assert seen == [('aot_eager', None), ('inductor', 'reduce-overhead')]
    # a bad mode stops the run before anything is written
    assert main(['train', data, *TINY, '-j', '0', '-b', '2', '--torchcompile-mode', 'fastest',
                 '--output', str(tmp_path / 'bad')]) == 2
    assert not (tmp_path / 'bad').exists()


SEED_1 = ('-b 256 -j 8 --opt adamw --epochs 300 --sched cosine --native-amp --img-size 224 --drop-path 0.1 --lr 2e-3 '
          '--weight-decay 0.05 --remode pixel --reprob 0.25 --aa rand-m9-mstd0.5-inc1 --smoothing 0.1 --mixup 0.8 '
          '--cutmix 1.0 --warmup-lr 1e-6 --warmup-epochs 20')
SEED_2 = ('--pretrained -b 64 -j 8 --opt adamw --epochs 30 --sched cosine --native-amp --input-size 3 392 392 '
          '--img-size 392 --crop-pct 1.0 --drop-path 0.4 --lr 5e-5 --weight-decay 1e-8 --remode pixel --reprob 0.25 '
          '--aa rand-m9-mstd0.5-inc1 --smoothing 0.1 --mixup 0.8 --cutmix 1.0 --warmup-epochs 0 --cooldown-epochs 0')
SEED_3 = ('-b 128 -j 4 --num-classes 10 --dataset torch/cifar10 --pretrained --opt adamw --epochs 200 --sched cosine '
          '--native-amp --img-size 224 --clip-grad 1 --drop-path 0.1 --lr 0.0001 --weight-decay 1e-4 --remode pixel '
          '--aa rand-m9-mstd0.5-inc1 --smoothing 0.1 --mixup 0.8 --cutmix 1.0 --warmup-lr 1e-6 --warmup-epochs 5')
RECIPES = {
    'sequencer2d_s_in1k': '--model sequencer2d_s ' + SEED_1,
    'sequencer2d_m_in1k': '--model sequencer2d_m ' + SEED_1.replace('--drop-path 0.1', '--drop-path 0.2'),
    'sequencer2d_l_in1k': '--model sequencer2d_l ' + SEED_1.replace('--drop-path 0.1', '--drop-path 0.4'),
    'sequencer2d_l_392_ft': '--model sequencer2d_l ' + SEED_2,
    'sequencer2d_s_cifar10': '--model sequencer2d_s ' + SEED_3,
    'sequencer2d_s_cifar100': '--model sequencer2d_s ' + SEED_3.replace('--num-classes 10 --dataset torch/cifar10',
                                                                       '--num-classes 100 --dataset torch/cifar100'),
    'sequencer2d_s_flowers102': '--model sequencer2d_s ' + SEED_3.replace('--num-classes 10 --dataset torch/cifar10',
                                                                         '--num-classes 102 --dataset flowers102'),
    'sequencer2d_s_cars': '--model sequencer2d_s ' + SEED_3.replace('--num-classes 10 --dataset torch/cifar10',
                                                                   '--num-classes 196 --dataset stanford_cars'),
}


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_recipes_equal_the_command_lines(name):
    from sequencer.engine.args import build_train_parser, parse
    path = os.path.join(ROOT, 'configs', f'{name}.yaml')
    from_recipe, _ = parse(build_train_parser(), ['-c', path, '/data'])
    from_flags, _ = parse(build_train_parser(), ['/data', *RECIPES[name].split()])
    a, b = vars(from_recipe), vars(from_flags)
    a.pop('config'), b.pop('config')
    assert a == b
    readme = open(os.path.join(ROOT, 'README.md')).read()
    assert f'configs/{name}.yaml' in readme


_FAULTS = """
import resource, sys, torch
from sequencer.engine import malloc
if sys.argv[1] == 'tuned':
    assert malloc.keep_freed_memory() is True
faults = []
for size_mb in (8, 64) * 6:   # a small and a large block (above glibc's 32 MiB mmap ceiling), as in training steps
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(size_mb << 18).fill_(1.0)   # size_mb MiB of float32, every page touched
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(' '.join(map(str, faults[1::2])))   # the 64 MiB rounds
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc')
def test_tuned_allocator_reuses_freed_blocks_without_page_faults():
    """With keep_freed_memory, a 64 MiB tensor allocated again after being freed takes its pages from the heap:
    no new page faults once the heap has grown (the first round or two may still extend it, depending on where
    small blocks landed); with glibc's defaults it is mapped again every round, 16,384 fresh 4 KiB pages."""
    from sequencer.engine import malloc
    if malloc._glibc() is None:
        pytest.skip('not glibc')
    counts = {}
    for mode in ('default', 'tuned'):
        out = subprocess.run([sys.executable, '-c', _FAULTS, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, 'PYTHONPATH': ROOT})
        counts[mode] = [int(n) for n in out.stdout.strip().splitlines()[-1].split()]
    assert all(n > 8000 for n in counts['default']), counts
    assert sum(counts['tuned'][-3:]) < 1000, counts   # the steady state: freed blocks reused


def test_cpu_training_keeps_freed_heap_memory_unless_told_not_to(tmp_path, monkeypatch):
    """`sequencer train` on CPU sets glibc's allocator to keep freed blocks mapped (sequencer.engine.malloc);
    --no-malloc-tuning leaves it alone."""
    import sequencer.engine.train as train_mod
    from sequencer.cli import main
    calls = []
    monkeypatch.setattr(train_mod, 'keep_freed_memory', lambda: calls.append(1) or True)
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1, size=(36, 36))
    for extra, want in (([], 1), (['--no-malloc-tuning'], 1)):
        assert main(['train', data, *TINY, '-b', '2', '--epochs', '1', '-j', '0', '--device', 'cpu',
                     '--output', str(tmp_path / 'out'), '--experiment', f'run{len(extra)}', *extra]) == 0
        assert len(calls) == want


def test_interrupted_demo_resumes_from_its_recovery_checkpoint(tmp_path, monkeypatch, capsys):
    """An interrupted demo exits 128 + signal without validating, with a hint that is its own command; the next
    demo resumes from recovery.pth.tar (the only checkpoint of a first epoch cut short)."""
    from sequencer.engine import demo
    seen = []

    def fake_train(args):
        seen.append((args.resume, args.resume_hint))
        return {'interrupted': 'SIGINT', 'folder': str(tmp_path / 'digits-run')}

    monkeypatch.setattr(demo.train_mod, 'train', fake_train)
    monkeypatch.setattr(demo.validate_mod, 'validate', lambda args: pytest.fail('validated an interrupted run'))
    assert demo.main(['--output', str(tmp_path), '--epochs', '1']) == 130
    (tmp_path / 'digits-run').mkdir(exist_ok=True)
    (tmp_path / 'digits-run' / 'recovery.pth.tar').write_bytes(b'')
    assert demo.main(['--output', str(tmp_path), '--epochs', '1']) == 130
    assert [r for r, _ in seen] == ['', 'auto']
    assert seen[0][1] == f"run `sequencer demo --output {tmp_path}` again to continue"


# ---- the loop: DDP accumulation, host reads, the order of files ------------------------------------------------
_RECORD_SYNC = '''
import sys
from sequencer.cli import main
from sequencer.engine import train

class RecordingDDP(train.DDP):
    def forward(self, *args, **kwargs):
        print(f"sync {int(self.require_backward_grad_sync)}", flush=True)
        return super().forward(*args, **kwargs)

train.DDP = RecordingDDP
sys.exit(main(sys.argv[1:]))
'''


def test_ddp_gradient_accumulation_syncs_only_on_the_last_micro_step(tmp_path):
    """Two ranks with --grad-accum-steps 2: the gradients are all-reduced in the second micro-step of each update
    only (DDP's no_sync in the first), and the weights equal one process's with the same batches."""
    import socket
    data = make_image_folder(tmp_path / 'data', classes=4, train_per_class=4, val_per_class=1, size=(36, 36))
    common = [data, *TINY, '--epochs', '1', '--opt', 'sgd', '--lr', '0.5', '--warmup-epochs', '0', '--seed', '7',
              '-j', '0', '--grad-accum-steps', '2', '--output', str(tmp_path / 'runs')]
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2',
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), OMP_NUM_THREADS='1')
        procs.append(subprocess.Popen([sys.executable, '-c', _RECORD_SYNC, 'train', *common, '-b', '2',
                                       '--experiment', 'ddp'], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out in outs:   # 16 images, 2 per rank and step: 4 micro-steps, 2 updates
        assert re.findall(r'^sync (\d)$', out, re.M) == ['0', '1', '0', '1'], out
    run([sys.executable, os.path.join(ROOT, 'train.py'), *common, '-b', '4', '--experiment', 'one'], cwd=tmp_path)
    a, b = weights(tmp_path / 'runs' / 'ddp' / 'last.pth.tar'), weights(tmp_path / 'runs' / 'one' / 'last.pth.tar')
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert float(summary(tmp_path / 'runs' / 'ddp')[0]['train_loss']) == pytest.approx(
        float(summary(tmp_path / 'runs' / 'one')[0]['train_loss']), abs=1e-5)


def test_the_loss_is_read_on_the_host_only_when_it_is_logged(tmp_path, monkeypatch):
    """The training loop reads tensors on the host (item, tolist, bool, float) where a line is logged, a checkpoint
    saved or an epoch ends, not at every step: as many reads for an epoch of 12 steps as for one of 6."""
    from sequencer.cli import main
    from sequencer.engine import train as train_mod
    data = make_image_folder(tmp_path / 'data', classes=3, train_per_class=4, val_per_class=1, size=(36, 36))
    reads = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == train_mod.__file__:
                reads.append(sys._getframe(1).f_code.co_name)
            return real(self, *args, **kwargs)
        return read

    for name in ('item', 'tolist', '__bool__', '__float__', '__int__'):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    counts = []
    for batch in ('2', '1'):   # 12 images: 6, then 12 steps an epoch
        reads.clear()
        assert main(['train', data, *TINY, '-b', batch, '-j', '0', '--epochs', '2', '--log-interval', '100',
                     '--output', str(tmp_path / 'runs'), '--experiment', f'b{batch}']) == 0
        counts.append(len(reads))
    assert counts[0] == counts[1] and counts[0] <= 8, (counts, reads)


def test_an_epochs_checkpoint_is_on_disk_before_its_summary_row(tmp_path, monkeypatch):
    """summary.csv is written after the epoch's checkpoint: a kill between the two leaves a checkpoint the summary
    does not name yet (resuming rewrites summary.csv from it), never a summary naming a missing checkpoint."""
    from sequencer.cli import main
    from sequencer.engine import train as train_mod
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1, size=(36, 36))
    folder = tmp_path / 'runs' / 'run'
    real = train_mod.write_summary
    written = []

    def write_summary(where, rows):
        ckpt = read_file(os.path.join(where, 'last.pth.tar'))   # fails where the checkpoint is not there yet
        assert ckpt['next_epoch'] == int(rows[-1]['epoch']) + 1 and ckpt['summary'] == rows
        written.append(len(rows))
        real(where, rows)

    monkeypatch.setattr(train_mod, 'write_summary', write_summary)
    argv = ['train', data, *TINY, '-b', '2', '-j', '0', '--epochs', '2', '--output', str(folder.parent),
            '--experiment', folder.name]
    assert main(argv) == 0 and written == [1, 2]
    ckpt = read_file(folder / 'last.pth.tar')   # the model as asked for: the name and the kwargs that shrink it
    assert ckpt['model_name'] == 'sequencer2d_s' and ckpt['model_label'].startswith('sequencer2d_s with layers=(1, 1,')
    # a kill after the last checkpoint and before its row: resuming restores the row
    full = (folder / 'summary.csv').read_text()
    (folder / 'summary.csv').write_text(''.join(full.splitlines(keepends=True)[:-1]))
    assert main([*argv, '--resume', 'auto']) == 0
    assert (folder / 'summary.csv').read_text() == full


# ---- flags that are refused or work ----------------------------------------------------------------------------
def test_a_data_folder_without_split_folders_is_refused_by_name(tmp_path, capsys):
    """A folder of class folders with neither train/ nor val/: training would evaluate on its own images. Refused in
    one line naming the missing folder, unless the splits are named explicitly ('.' for the folder itself)."""
    from sequencer.cli import main
    root = tmp_path / 'plain'
    make_image_folder(tmp_path / 'tmp', classes=2, train_per_class=2, val_per_class=1, size=(36, 36))
    os.rename(tmp_path / 'tmp' / 'train', root)
    out = ['--output', str(tmp_path / 'runs'), '--experiment', 'run']
    assert main(['train', str(root), *TINY, '-b', '2', '-j', '0', *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{root}: no 'train' split folder found (expected {root / 'train'}/" in err
    assert not (tmp_path / 'runs').exists()
    assert main(['train', str(root), *TINY, '-b', '2', '-j', '0', '--epochs', '1', '--train-split', '.',
                 '--val-split', '.', *out]) == 0
    assert '4 train / 4 eval images' in capsys.readouterr().out


def test_flags_timm_users_pass_work_or_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    from sequencer.cli import main
    from sequencer.engine import train as train_mod
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=4, val_per_class=1, size=(36, 36))

    def train(*extra, name='run'):
        return main(['train', data, *TINY, '-b', '2', '-j', '0', '--epochs', '1', '--log-interval', '1',
                     '--output', str(tmp_path / 'runs'), '--experiment', name, *extra])

    for extra, message in (
            (['--pin-mem'], '--pin-mem: pinned memory speeds up copies to a GPU; this run is on the CPU'),
            (['--resplit'], '--resplit splits random erasing, which is off: give --reprob too'),
            (['--aug-repeats', '0.5'], '--aug-repeats 0.5: give 0 (off) or a number of copies of at least 1'),
            (['--aug-repeats', '2', '--epoch-repeats', '2'], '--aug-repeats and --epoch-repeats: give one'),
            (['--in-chans', '2'], '--in-chans 2: images are read as RGB (3 channels) or grayscale (1)')):
        assert train(*extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (extra, err)
    # --epoch-repeats: two passes an epoch (8 steps of 2); --aug-repeats: timm's sampler, one pass of copies
    assert train('--epoch-repeats', '2', name='epoch_repeats') == 0
    assert 'epoch 0 [8/8]' in capsys.readouterr().out
    assert train('--aug-repeats', '2', name='aug_repeats') == 0
    assert 'epoch 0 [4/4]' in capsys.readouterr().out
    assert train('--reprob', '0.5', '--resplit', name='resplit') == 0
    # the prefetcher, as on CUDA (here on the CPU): --no-prefetcher turns it off
    assert train_mod.uses_prefetcher(argparse.Namespace(no_prefetcher=False), torch.device('cuda'))
    assert not train_mod.uses_prefetcher(argparse.Namespace(no_prefetcher=True), torch.device('cuda'))
    assert not train_mod.uses_prefetcher(argparse.Namespace(no_prefetcher=False), torch.device('cpu'))
    built = []
    real = train_mod.Prefetched

    def prefetched(*args, **kwargs):
        built.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, 'Prefetched', prefetched)
    monkeypatch.setattr(train_mod, 'uses_prefetcher', lambda args, device: not args.no_prefetcher)
    assert train('--reprob', '0.25', '--resplit', name='prefetched') == 0
    assert built and built[0]['re_prob'] == 0.25 and built[0]['re_num_splits'] == 2   # as timm's create_loader
    built.clear()
    assert train('--no-prefetcher', '--in-chans', '1', name='gray') == 0 and built == []
    assert read_file(tmp_path / 'runs' / 'gray' / 'last.pth.tar')['state_dict']['stem.proj.weight'].shape[1] == 1
    rows = summary(tmp_path / 'runs' / 'prefetched')
    assert len(rows) == 1 and 0 <= float(rows[0]['eval_top1']) <= 100


def test_a_cpu_batch_that_does_not_fit_in_memory_is_refused_with_one_that_does(tmp_path, capsys, monkeypatch):
    """On the CPU, a training step's peak memory is estimated before anything large is allocated; a batch that
    would not fit is refused in one line naming a batch size that does."""
    from sequencer.cli import main
    from sequencer.engine import train as train_mod
    from sequencer.errors import UserError
    with pytest.raises(UserError, match=r'^-b 128: a training step of m at 224x224 px on the CPU needs about 18\.3 GB '
                                        r'of memory, 9\.5 GB are available; -b 65 fits \(--grad-accum-steps 2 then '
                                        r'updates with 130 images at a time\)$'):
        train_mod.check_cpu_memory(128, 0.38e9, 0.14e9, 9.5e9, 'm at 224x224 px')
    train_mod.check_cpu_memory(65, 0.38e9, 0.14e9, 9.5e9, 'm')
    with pytest.raises(UserError, match='not even one image fits'):
        train_mod.check_cpu_memory(1, 0.38e9, 0.14e9, 0.4e9, 'm')
    train_mod.check_cpu_memory(10 ** 6, 1e9, 1e9, None, 'm')   # nothing known: no refusal
    # the estimate, extrapolated from two small inputs, against what autograd keeps in one pass at the real size
    model = create_model('sequencer2d_s', layers=(1, 1, 1, 1), patch_sizes=(4, 2, 1, 1), embed_dims=(16, 32, 32, 32),
                         hidden_sizes=(4, 8, 8, 8))
    per_step, per_image = train_mod.activation_bytes(model, (3, 96, 96))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(1, 3, 96, 96))
    assert per_image > 0 and 1.0 <= (per_step + per_image) / sum(kept.values()) <= 1.25
    # through the command: with 6 MB available, -b 64 at 96 px is refused, naming a batch that fits
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1, size=(36, 36))
    monkeypatch.setattr(train_mod, 'available_memory', lambda: 6e6)
    checked = []
    real = train_mod.check_cpu_memory
    monkeypatch.setattr(train_mod, 'check_cpu_memory', lambda *a: checked.append(a) or real(*a))
    argv = ['train', data, *TINY[:-1], '96', '-j', '0', '--output', str(tmp_path / 'runs')]
    assert main([*argv, '-b', '64']) == 2
    err = capsys.readouterr().err.strip()
    fits = re.search(r'-b (\d+) fits', err)
    assert len(err.splitlines()) == 1 and err.startswith('sequencer train: error: -b 64: a training step of '
                                                          'sequencer2d_s with layers=') and fits, err
    assert 'MB are available' in err and not (tmp_path / 'runs').exists()
    _, fixed, per, available, what = checked[0]
    assert available == 6e6 and what.endswith(' at 96x96 px')
    real(int(fits.group(1)), fixed, per, available, what)   # the batch named fits
    with pytest.raises(UserError):
        real(int(fits.group(1)) + 1, fixed, per, available, what)


def test_the_demo_names_its_model_honestly_and_keeps_one_best_checkpoint(tmp_path, monkeypatch, capsys):
    from sequencer.engine import demo
    from sequencer.engine.train import model_label
    seen = []

    def fake_train(args):
        seen.append(args)
        return {'interrupted': 'SIGINT', 'folder': str(tmp_path / 'digits-run')}

    monkeypatch.setattr(demo.train_mod, 'train', fake_train)
    assert demo.main(['--output', str(tmp_path), '--epochs', '1']) == 130
    (args,) = seen
    assert args.checkpoint_hist == 1
    assert model_label(args) == ('sequencer2d_demo (sequencer2d_s with layers=(1, 1, 1, 1), patch_sizes=(4, 2, 1, 1), '
                                 'embed_dims=(64, 128, 128, 128), hidden_sizes=(16, 32, 32, 32))')
