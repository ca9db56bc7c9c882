"""`sequencer benchmark --data DIR`: the training command's loader alone, the synthetic step and the two together
in one run, the verdict, one-line errors, and the GPU script's data part.

Runs a tiny model (one block per stage, 28 px inputs, batch 2) on a generated folder of 16 JPEGs; never asserts
on speed."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from sequencer.analysis import data_benchmark
from sequencer.analysis.benchmark import DATA_FIELDS
from sequencer.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--layers', '1,1,1,1', '--img-size', '28', '-b', '2', '--warmup', '1', '--iters', '2', '--num-threads', '1',
        '-q']
MEASUREMENTS = ['loader', 'synthetic', 'end_to_end']


def make_folder(root, classes=('cat', 'dog'), per_class=8, size=(64, 48)):
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(root / name)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f'{i}.jpg', quality=90)
    return root


def check_verdict(data, workers):
    rows = data['results']
    assert [r['measurement'] for r in rows] == MEASUREMENTS
    by = {r['measurement']: r for r in rows}
    for r in rows:
        assert r['img_per_s'] > 0 and r['seconds'] > 0 and r['latency_ms_mean'] > 0, r['measurement']
        assert r['img_per_s'] == pytest.approx(r['batch_size'] * r['iters'] / r['seconds'])
    loader = by['loader']
    assert loader['workers'] == workers == by['end_to_end']['workers']
    assert loader['img_per_s_per_process'] == pytest.approx(loader['img_per_s'] / max(workers, 1))
    assert by['synthetic']['latency_ms_median'] > 0 and by['synthetic']['latency_ms_p90'] > 0
    v = data['verdict']
    assert v['pace'] in ('loader', 'model')
    assert v['end_to_end_fraction'] == pytest.approx(by['end_to_end']['img_per_s'] / by['synthetic']['img_per_s'])
    assert (v['pace'] == 'loader') == (loader['img_per_s'] < by['synthetic']['img_per_s'])
    if v['pace'] == 'loader':   # processes at the measured rate each, for 90% of the synthetic step
        assert v['workers_needed_estimate'] == math.ceil(0.9 * by['synthetic']['img_per_s']
                                                         / loader['img_per_s_per_process'])
    else:
        assert v['workers_needed_estimate'] is None
    for r in rows:   # the verdict is in every row too (CSV)
        assert (r['pace'], r['end_to_end_fraction']) == (v['pace'], v['end_to_end_fraction'])
    return by


def test_training_from_a_train_folder_with_one_loader_process(tmp_path, capsys):
    data = make_folder(tmp_path / 'data' / 'train')
    out = tmp_path / 'bench.json'
    assert main(['benchmark', '--data', str(tmp_path / 'data'), *TINY, '-j', '1', '--results-file', str(out)]) == 0
    result = json.loads(out.read_text())
    assert {'torch', 'timm', 'cpu', 'date'} <= set(result['environment'])
    by = check_verdict(result, workers=1)
    for r in by.values():
        assert (r['mode'], r['model'], r['input_size'], r['batch_size']) == ('train', 'sequencer2d_s', '3x28x28', 2)
        assert (r['data'], r['images'], r['classes']) == (str(data), 16, 2)
        assert 'RandAugment rand-m9-mstd0.5-inc1' in r['transform'] and 'mixup 0.8 / cutmix 1.0' in r['transform']
    # the loader's counts in whole rounds of its processes: one process, the flags' counts
    assert (by['loader']['warmup'], by['loader']['iters']) == (1, 2)
    # where a loader process's time goes: decoding, then the recipe's transform step by step
    stages = result['loader_stages_ms_per_image']
    assert list(stages)[:4] == ['decode', 'RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment']
    assert all(v >= 0 for v in stages.values()) and stages['decode'] > 0
    printed = capsys.readouterr().out
    assert "a loader process's time per image (this process, first images): decode " in printed
    assert f"data: {data}, 16 images, 2 classes; 1 loader process" in printed
    for line in ('loader ', 'synthetic ', 'end to end ', 'pace: ', 'end to end: '):
        assert line in printed, line
    assert not [p for p in os.listdir(tmp_path) if p not in ('data', 'bench.json')]   # no temporary file left


def test_device_augment_times_the_loader_with_the_device_work(tmp_path, capsys):
    """--device-augment: the loader processes only read files and draw parameters (their stages say so), and a
    fourth measurement times the loader with the device's decoding and augmentation, which the verdict uses."""
    data = make_folder(tmp_path / 'data' / 'train')
    out = tmp_path / 'bench.json'
    assert main(['benchmark', '--data', str(tmp_path / 'data'), *TINY, '-j', '1', '--device-augment',
                 '--results-file', str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r['measurement']: r for r in result['results']}
    assert list(rows) == ['loader', 'loader_and_device', 'synthetic', 'end_to_end']
    assert all(r['img_per_s'] > 0 and r['layers'] == '1,1,1,1' for r in rows.values())   # the model as run
    assert 'the CPU decodes, crops, flips and runs RandAugment' in rows['loader']['transform']
    assert list(result['loader_stages_ms_per_image']) == ['read', 'Plan']
    v = result['verdict']
    assert v['loader_img_per_s'] == pytest.approx(rows['loader_and_device']['img_per_s'])
    assert 'loader and device' in capsys.readouterr().out
    assert data.exists()


def test_inference_in_process_from_class_folders_to_csv(tmp_path, capsys):
    """-j 0: the main process loads; DIR itself holds the class folders; the evaluation transform; CSV."""
    data = make_folder(tmp_path / 'flat')
    out = tmp_path / 'bench.csv'
    assert main(['benchmark', '--data', str(data), *TINY, '-j', '0', '--mode', 'infer', '--rnn-engine', 'native',
                 '--results-file', str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == DATA_FIELDS
    assert [r['measurement'] for r in rows] == MEASUREMENTS
    assert all(float(r['img_per_s']) > 0 and r['mode'] == 'infer' and r['data'] == str(data) for r in rows)
    assert rows[0]['workers'] == '0' and float(rows[0]['img_per_s_per_process']) == float(rows[0]['img_per_s'])
    assert rows[0]['transform'].startswith('evaluation transform: resize, centre crop')
    assert rows[0]['pace'] in ('loader', 'model') and float(rows[0]['end_to_end_fraction']) > 0
    assert 'loading in-process' in capsys.readouterr().out


def test_the_loader_is_the_training_commands_with_the_recipes_augmentations(tmp_path):
    """The samples' transform and the mixup are those `sequencer train` builds from the seed's Sequencer2D-S
    recipe (configs/sequencer2d_s_in1k.yaml) on the CPU: random-resized crop, flip, RandAugment and random
    erasing per image; mixup / cutmix with label smoothing in the step."""
    with open(os.path.join(ROOT, 'configs', 'sequencer2d_s_in1k.yaml')) as f:
        recipe = yaml.safe_load(f)
    assert {k: recipe[k] for k in data_benchmark.RECIPE} == data_benchmark.RECIPE
    import torch

    from sequencer import create_model
    root = make_folder(tmp_path / 'data' / 'train', per_class=2)
    dataset, folder, classes = data_benchmark.open_dataset(str(tmp_path / 'data'), 'train')
    assert (folder, classes, len(dataset)) == (str(root), 2, 4)
    args = data_benchmark.train_arguments(str(tmp_path / 'data'), 'train', 2, 0, (3, 28, 28), 0, 3,
                                          torch.device('cpu'))
    model = create_model('sequencer2d_s', layers=(1, 1, 1, 1), num_classes=10)
    loaders = data_benchmark.DataLoaders('train', dataset, args, model, torch.device('cpu'), 10)
    transform = repr(loaders.host.dataset.transform)
    for part in ('RandomResizedCropAndInterpolation(size=(28, 28), scale=(0.08, 1.0)', 'RandomHorizontalFlip(p=0.5)',
                 'RandAugment(n=2', 'm=9, mstd=0.5', 'PosterizeIncreasing', 'RandomErasing(p=0.25, mode=pixel'):
        assert part in transform, part
    m = loaders.mixup
    assert (m.mixup_alpha, m.cutmix_alpha, m.label_smoothing, m.num_classes) == (0.8, 1.0, 0.1, 10)
    # one long epoch: 3 passes over the 4 images, 6 batches of 2, each (images, targets, skipped)
    batches = list(loaders.feed)
    assert len(batches) == 6 and batches[0][0].shape == (2, 3, 28, 28) and batches[0][2] == 0


def test_whole_rounds_and_verdict_arithmetic():
    assert [data_benchmark.rounds(b, p) for b, p in ((1, 0), (3, 1), (3, 2), (20, 8), (16, 16))] == [1, 3, 4, 24, 16]
    v = data_benchmark.verdict(loader=100., synthetic=400., end_to_end=90., workers=4, cpu_count=8)
    assert (v['pace'], v['img_per_s_per_process'], v['workers_needed_estimate']) == ('loader', 25., 15)
    assert v['end_to_end_fraction'] == pytest.approx(0.225)
    text = data_benchmark.describe(v)
    assert 'about 15 loader processes (-j 15)' in text and "more than this machine's 8 CPU cores" in text
    v = data_benchmark.verdict(loader=500., synthetic=400., end_to_end=380., workers=0, cpu_count=8)
    assert (v['pace'], v['img_per_s_per_process'], v['workers_needed_estimate']) == ('model', 500., None)
    assert 'pace: model' in data_benchmark.describe(v)
    # --device-augment: the processes alone keep up, the device's work does not: no process estimate
    v = data_benchmark.verdict(loader=300., synthetic=400., end_to_end=290., workers=8, cpu_count=16,
                               processes_alone=2000.)
    assert (v['pace'], v['workers_needed_estimate']) == ('device augmentation', None)
    assert 'more loader processes would not help' in data_benchmark.describe(v)
    v = data_benchmark.verdict(loader=300., synthetic=400., end_to_end=290., workers=8, cpu_count=16,
                               processes_alone=350.)
    assert (v['pace'], v['workers_needed_estimate']) == ('loader', math.ceil(0.9 * 400 / (300 / 8)))


@pytest.mark.parametrize('case, argv, message', [
    ('missing', [], '--data {d}: no such folder'),
    ('empty', [], '--data {d}: no .jpg/.jpeg/.png images in it'),
    ('no images', [], '--data {d}: no .jpg/.jpeg/.png images in it'),
    ('empty class', [], '{d}/train/b: empty class folder'),
    ('ok', ['-j', '-1'], 'argument -j/--workers: must be an integer at least 0'),
    ('ok', ['-j', 'two'], "argument -j/--workers: must be an integer at least 0, got 'two'"),
    ('ok', ['--mode', 'both'], '--mode both: with --data give train or infer'),
    ('ok', ['-b', '3'], '--mixup / --cutmix need an even --batch-size, got 3'),
    ('ok', ['--compare-timm'], '--compare-timm: not with --data'),
    ('ok', ['--num-classes', '1'], '--num-classes 1: fewer than the 2 classes of {d}/train'),
    (None, ['-j', '2'], '-j/--workers: loader processes are used with --data DIR only'),
    (None, ['--device-augment'], '--device-augment: augments training batches; give --data DIR'),
    ('ok', ['--device-augment', '--mode', 'infer'], '--device-augment: augments training batches'),
])
def test_mistakes_exit_2_with_one_line_naming_them(tmp_path, capsys, case, argv, message):
    d = tmp_path / 'd'
    if case in ('empty', 'no images', 'empty class', 'ok'):
        d.mkdir()
    if case == 'no images':
        (d / 'a').mkdir()
        (d / 'a' / 'notes.txt').write_text('not an image\n')
    if case in ('empty class', 'ok'):
        make_folder(d / 'train', classes=('a', 'c'), per_class=2)
    if case == 'empty class':
        (d / 'train' / 'b').mkdir()
    data = ['--data', str(d)] if case else []
    try:
        code = main(['benchmark', *data, *TINY, *argv])
    except SystemExit as e:   # argparse's own checks
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith('sequencer benchmark: error: ') and message.format(d=d) in err, err


def test_gpu_script_data_part_and_its_jpeg_folder(tmp_path):
    """benchmarks/gpu.sh's data part (commands echoed: no GPU here) makes the JPEG folder first, then runs the
    benchmark with 8 and 16 loader processes and compiled, each with its results file; 'all' leaves it out.
    benchmarks/make_jpegs.py itself makes a small folder that the benchmark reads (on the CPU)."""
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'nvidia-smi').write_text('#!/bin/sh\necho "NVIDIA H100 80GB HBM3"\n')
    (fake / 'nvidia-smi').chmod(0o755)
    results, out = tmp_path / 'results', tmp_path / 'out'
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", PYTHON='echo', RESULTS_DIR=str(results))
    script = os.path.join(ROOT, 'benchmarks', 'gpu.sh')

    def ran(what):
        proc = subprocess.run(['bash', script, what, str(out)], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith('== ') and ' rc=' not in ln]

    assert ran('data') == ['data_jpegs', 'data_j8', 'data_j8_device', 'data_j16', 'data_j16_compiled']
    assert not [s for s in ran('all') if s.startswith('data')]
    jpegs = (out / 'data_jpegs.log').read_text().split()
    assert jpegs[:2] == ['benchmarks/make_jpegs.py', f'{out}/jpegs']
    assert ' '.join(jpegs[2:]) == '--classes 10 --per-class 256 --size 500 375'
    for name, workers in (('data_j8', '8'), ('data_j8_device', '8'), ('data_j16', '16'), ('data_j16_compiled', '16')):
        argv = (out / f'{name}.log').read_text().split()
        opts = dict(zip(argv, argv[1:]))
        assert argv[:3] == ['-m', 'sequencer.cli', 'benchmark']
        assert (opts['--data'], opts['--device'], opts['--precision'], opts['--batch-size'], opts['--mode'],
                opts['--workers']) == (f'{out}/jpegs', 'cuda', 'bf16', '256', 'train', workers)
        assert ('--compile' in argv) == name.endswith('compiled')
        assert ('--device-augment' in argv) == name.endswith('device')
        assert argv[-2:] == ['--results-file', f'{results}/gpu-nvidia-h100-80gb-hbm3-{name}.json']

    folder = tmp_path / 'jpegs'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'make_jpegs.py'), str(folder),
                           '--classes', '2', '--per-class', '3', '--size', '50', '40', '--processes', '2'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())
    assert files == [f'train/class_{c:03d}/{i:05d}.jpg' for c in range(2) for i in range(3)]
    with Image.open(folder / 'train' / 'class_001' / '00002.jpg') as img:
        assert (img.format, img.size, img.mode) == ('JPEG', (50, 40), 'RGB')
    report = tmp_path / 'data.json'
    assert main(['benchmark', '--data', str(folder), *TINY, '-j', '0', '--rnn-engine', 'native',
                 '--results-file', str(report)]) == 0
    assert json.loads(report.read_text())['results'][0]['images'] == 6
