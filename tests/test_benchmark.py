"""`sequencer benchmark`: results files with every field, timm compared in one run, one-line errors.

Runs on a tiny configuration (one block per stage, 28 px inputs) and never asserts on speed."""
import csv
import json
import os
import subprocess
import sys

import pytest

from sequencer.analysis.benchmark import FIELDS, _uses_cuda_graphs, timm_name_for
from sequencer.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--layers', '1,1,1,1', '--img-size', '28', '--batch-size', '2', '--warmup', '0', '--iters', '2',
        '--num-threads', '2', '-q']
POSITIVE = ('img_per_s', 'latency_ms_median', 'latency_ms_p90', 'latency_ms_mean', 'gmacs_per_img', 'gmac_per_s',
            'gflop_per_s')


def test_csv_with_timm_comparison_and_matmul_peak(tmp_path, capsys):
    out = tmp_path / 'bench.csv'
    assert main(['benchmark', *TINY, '--compare-timm', '--matmul-peak', '--matmul-size', '256',
                 '--results-file', str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == FIELDS
    assert [(r['impl'], r['mode']) for r in rows] == [
        ('sequencer', 'infer'), ('timm', 'infer'), ('sequencer', 'train'), ('timm', 'train')]
    # timm's rows name the timm model; ours may be compared with several, so ours names none
    assert [r['timm_model'] for r in rows] == ['', 'sequencer2d_s', '', 'sequencer2d_s']
    for r in rows:
        assert r['model'] == 'sequencer2d_s'
        assert r['input_size'] == '3x28x28' and r['batch_size'] == '2' and r['threads'] == '2'
        for k in POSITIVE + ('matmul_peak_gflop_s', 'fraction_of_peak'):
            assert float(r[k]) > 0, k
        assert float(r['peak_mem_mb']) >= 0 and r['memory_method']
        assert float(r['latency_ms_p90']) >= float(r['latency_ms_median'])
    # the same forward MACs for both; training counts forward + backward as 3x
    assert rows[0]['gmacs_per_img'] == rows[1]['gmacs_per_img']
    ours = [r for r in rows if r['impl'] == 'sequencer']
    assert all(float(r['ratio_vs_timm']) > 0 and float(r['ratio_vs_timm_median']) > 0 for r in ours)
    assert all(r['ratio_vs_timm'] == '' for r in rows if r['impl'] == 'timm')
    for r_ours, r_timm in (rows[0:2], rows[2:4]):   # each timm row holds ours / it, as ours does for the first
        assert r_timm['ours_ratio'] == r_ours['ratio_vs_timm'] and r_ours['ours_ratio'] == ''
    printed = capsys.readouterr().out
    assert 'infer: ours / timm = ' in printed and 'train: ours / timm = ' in printed
    assert f'results written to {out}' in printed


def test_json_training_with_checkpointing_and_autocast(tmp_path):
    out = tmp_path / 'bench.json'
    assert main(['benchmark', *TINY, '--mode', 'train', '--grad-checkpointing', '--precision', 'bf16',
                 '--rnn-engine', 'native', '--iters', '1', '--results-file', str(out)]) == 0
    with open(out) as f:
        data = json.load(f)
    assert {'torch', 'timm', 'python', 'cpu', 'date'} <= set(data['environment'])
    (row,) = data['results']
    assert set(FIELDS) <= set(row)
    assert (row['mode'], row['impl'], row['precision'], row['rnn_engine']) == ('train', 'sequencer', 'bf16', 'native')
    assert row['grad_checkpointing'] is True and row['compile'] is False
    assert row['ratio_vs_timm'] is None and row['fraction_of_peak'] is None
    for k in POSITIVE:
        assert row[k] > 0, k
    assert row['peak_mem_mb'] >= 0
    # 3x the forward MACs of one image, times images per second
    assert row['gmac_per_s'] == pytest.approx(3 * row['gmacs_per_img'] * row['img_per_s'])
    assert not [p for p in os.listdir(tmp_path) if p != 'bench.json']  # no temporary file left behind


def test_fused_mlp_switch(tmp_path):
    """Our channel MLPs run fused on CPU in float32 unless --no-fused-mlp; the row says which."""
    from sequencer.fast import cpu_kernel
    if not cpu_kernel.available():
        pytest.skip('no CPU kernel')
    rows = {}
    for flag in ([], ['--no-fused-mlp']):
        out = tmp_path / f'bench{len(flag)}.json'
        assert main(['benchmark', *TINY, '--mode', 'train', '--iters', '1', '--no-memory', *flag,
                     '--results-file', str(out)]) == 0
        with open(out) as f:
            (rows[bool(flag)],) = json.load(f)['results']
    assert rows[False]['fused_mlp'] is True and rows[True]['fused_mlp'] is False


def test_fused_norm_switch(tmp_path, monkeypatch):
    """--no-fused-norm turns the GPU pre-norm kernels off in every block of our model; rows record whether they
    ran (on this CPU machine: never)."""
    import argparse

    from sequencer.analysis import benchmark
    from sequencer.fast import FastSequencerBlock
    for flag in (False, True):
        args = argparse.Namespace(model='sequencer2d_s', num_classes=10, rnn_engine=None, no_fused_mlp=False,
                                  no_fused_norm=flag)
        model = benchmark.build_ours(args, (3, 28, 28), {'layers': (1, 1, 1, 1)})
        assert [b.fused_norm for b in model.modules() if isinstance(b, FastSequencerBlock)] == [not flag] * 4
    out = tmp_path / 'bench.json'
    assert main(['benchmark', *TINY, '--mode', 'train', '--iters', '1', '--no-memory', '--no-fused-norm',
                 '--results-file', str(out)]) == 0
    with open(out) as f:
        (row,) = json.load(f)['results']
    assert row['fused_norm'] is False


def test_timm_eager_compiles_ours_only(tmp_path, monkeypatch):
    """--compile --timm-eager: our model goes through torch.compile (with the mode asked for), timm's does not;
    each row records its own compile flag. (torch.compile is replaced by a recorder: inductor's C++ build takes
    minutes on two cores; the compiled path itself is covered in test_fused.py.)"""
    import torch
    seen = []

    def fake_compile(model, mode=None, dynamic=None, **kw):
        seen.append((type(model).__module__.split('.')[0], mode, dynamic))
        return model

    monkeypatch.setattr(torch, 'compile', fake_compile)
    out = tmp_path / 'bench.json'
    assert main(['benchmark', *TINY, '--mode', 'train', '--compare-timm', '--compile-mode', 'reduce-overhead',
                 '--timm-eager', '--no-memory', '--results-file', str(out)]) == 0
    assert seen == [('sequencer', 'reduce-overhead', False)]
    with open(out) as f:
        rows = json.load(f)['results']
    assert [(r['impl'], r['compile']) for r in rows] == [('sequencer', True), ('timm', False)]


def test_gemm_backend_in_the_results(tmp_path, capsys):
    """--gemm forces the fast engine's CPU GEMMs for the run only; our rows (not timm's) record the backends in
    `gemm`, printed after the run; a plain PyTorch model (--rnn-engine native) records none."""
    from sequencer.fast import gemm
    out = tmp_path / 'onednn.json'
    assert main(['benchmark', *TINY, '--mode', 'infer', '--no-memory', '--compare-timm', '--gemm', 'onednn',
                 '--results-file', str(out)]) == 0
    ours, theirs = json.loads(out.read_text())['results']
    assert (ours['impl'], ours['gemm']) == ('sequencer', 'onednn (set)') and theirs['gemm'] is None
    assert 'GEMMs of our fast engine: onednn (set)' in capsys.readouterr().out
    assert gemm.forced() is None   # set for the run only
    out = tmp_path / 'packed.json'
    assert main(['benchmark', *TINY, '--mode', 'infer', '--no-memory', '--gemm', 'onednn', '--pack-weights',
                 '--results-file', str(out)]) == 0
    (row,) = json.loads(out.read_text())['results']
    assert row['gemm'] == 'onednn (set); oneDNN weights packed'   # (the packing itself: tests/test_gemm.py)
    assert not gemm.packing()      # for the run only
    out = tmp_path / 'auto.csv'
    assert main(['benchmark', *TINY, '--mode', 'infer', '--no-memory', '--results-file', str(out)]) == 0
    with open(out) as f:
        (row,) = csv.DictReader(f)
    assert row['gemm'] == 'mkl (measuring off)'   # the tests turn measuring off (conftest)
    assert 'GEMMs of our fast engine: mkl (measuring off)' in capsys.readouterr().out
    out = tmp_path / 'native.json'
    assert main(['benchmark', *TINY, '--mode', 'infer', '--no-memory', '--rnn-engine', 'native',
                 '--results-file', str(out)]) == 0
    (row,) = json.loads(out.read_text())['results']
    assert row['rnn_engine'] == 'native' and row['gemm'] is None
    assert 'GEMMs of our fast engine' not in capsys.readouterr().out


def test_timm_counterpart_of_each_model():
    assert timm_name_for('sequencer2d_m') == 'sequencer2d_m'
    assert timm_name_for('sequencer2d_l_392') == 'sequencer2d_l'  # same architecture, other input size


@pytest.mark.parametrize('argv, message', [
    (['--batch-size', '0'], 'argument --batch-size/-b: must be an integer at least 1, got 0'),
    (['--iters', '0'], 'argument --iters: must be an integer at least 1, got 0'),
    (['--layers', '1,1,1,1', '--img-size', '13'], "--img-size 13x13: smaller than the model's total patch size 14"),
    (['--model', 'sequencer2d_x'], "unknown model 'sequencer2d_x'"),
    (['--results-file', 'out.txt'], 'the name must end in .csv or .json'),
    (['--layers', '1,x'], "--layers '1,x': expected comma-separated integers"),
    (['--layers', '1,1'], 'sequencer2d_s: cannot build with'),
    (['--model', 'v_sequencer_s', '--compare-timm', '--layers', '1,1,1,1'],
     'timm has no model with the architecture of v_sequencer_s'),
    (['--mode', 'train', '--num-classes', '0'], 'training needs a classifier'),
    (['--compile', '--timm-eager'], '--timm-eager compiles our model only: it needs --compare-timm'),
    (['--compare-timm', '--timm-eager'], '--timm-eager compiles our model only'),
    (['--gemm', 'blas'], "argument --gemm: invalid choice: 'blas'"),
    (['--gemm', 'onednn', '--rnn-engine', 'native'], '--gemm onednn: with --rnn-engine native our model is plain'),
    (['--gemm', 'mkl', '--device', 'cuda'], '--gemm mkl: chooses CPU GEMMs; not with --device cuda'),
    (['--pack-weights', '--rnn-engine', 'native'], "--pack-weights: packs the weights of our fast engine's CPU GEMMs; "
     "not with --rnn-engine native"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    try:
        code = main(['benchmark', '--img-size', '56', '--iters', '1', '--warmup', '0', '-q', *argv])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith('sequencer benchmark: error: ') and message in err


def test_root_script_is_the_same_command(tmp_path):
    proc = subprocess.run([sys.executable, 'benchmark.py', '--model', 'resnet50'], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["benchmark.py: error: unknown model 'resnet50'; see `sequencer models`"]


def test_cpu_memory_tensors_is_the_peak_of_live_tensor_bytes():
    """--cpu-memory tensors: allocations minus frees over the step, their maximum (here two 8 MB tensors live
    at once at most), independent of the C allocator."""
    import torch

    from sequencer.analysis.benchmark import _CpuPeakTensors

    def work():
        a = torch.ones(2 * 2 ** 20)            # 8 MB
        b = torch.ones(2 * 2 ** 20)
        del a
        c = torch.ones(2 * 2 ** 20)
        return b, c

    peak = _CpuPeakTensors().measure(work)
    assert 16 <= peak < 17


def test_cpu_memory_tensors_from_the_command_line(tmp_path):
    out = tmp_path / 'mem.json'
    assert main(['benchmark', *TINY, '--mode', 'train', '--cpu-memory', 'tensors', '--results-file', str(out)]) == 0
    rows = json.loads(out.read_text())['results']
    assert rows[0]['memory_method'].startswith('cpu-tensors') and rows[0]['peak_mem_mb'] > 0


@pytest.mark.slow
def test_profile_and_gpu_scripts_run_on_cpu():
    """benchmarks/profile_step.py prints torch.profiler's table of one step (here on the CPU); the GPU-only
    scripts say they need CUDA when there is none."""
    import torch
    prof = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'profile_step.py'), '--device', 'cpu',
                           '--batch-size', '1', '--img-size', '32', '--precision', 'fp32', '--top', '3'],
                          capture_output=True, text=True, timeout=600)
    assert prof.returncode == 0, prof.stderr[-2000:]
    assert 'Self CPU time total' in prof.stdout
    if not torch.cuda.is_available():
        for argv in (['gpu_accuracy.py'], ['profile_step.py', '--device', 'cuda']):
            proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', *argv[:1]), *argv[1:]],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode != 0 and 'CUDA device' in proc.stderr, (argv, proc.stderr[-500:])


def test_call_overhead_script_checks_outputs_and_writes_every_variant(tmp_path):
    """benchmarks/call_overhead.py: timm's block and ours (native, fused, fused through Function.apply) give the
    same output, and each variant's times per round are written."""
    out = tmp_path / 'overhead.json'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'call_overhead.py'), '--rounds', '2',
                           '--number', '3', '--results', str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, 'PYTHONPATH': ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data['summary']) == {'timm', 'native', 'fused', 'fused, Function.apply'}
    assert all(len(t) == 2 and all(v > 0 for v in t) for t in data['per_round_us'].values())
    assert "of timm's median" in proc.stdout


def test_prepack_script_times_three_variants_and_records_the_choice(tmp_path):
    """benchmarks/prepack_ab.py: MKL, plain and packed oneDNN in one process, packed outputs identical to plain,
    the 'auto' choices recorded, the JSON written."""
    from sequencer.fast import gemm
    if not gemm.available():
        pytest.skip('no oneDNN inner product')
    out = tmp_path / 'prepack.json'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'prepack_ab.py'), '--batch-sizes', '1',
                           '--iters', '1', '--warmup', '0', '--img-size', '64', '--results', str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, 'PYTHONPATH': ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    run = data['runs']['b1']
    assert run['packed_outputs_identical_to_plain'] and run['max_relative_difference_to_mkl'] < 1e-4
    assert all(len(run[f'step_s_{v}']) == 1 for v in ('mkl', 'onednn', 'onednn_packed'))
    assert set(data['auto_choice'].values()) <= set(gemm.BACKENDS) and set(data['auto_choice']) == {
        'forward', gemm.PACKED}
    assert 'identical to plain' in proc.stdout


def test_gemm_shapes_script_records_every_gemm_of_a_training_step(tmp_path):
    """benchmarks/gemm_shapes.py: every GEMM of one training step with its kind (each forward GEMM has a weight
    gradient, and all but the stem's an input gradient: images need none), timed on both backends, the step's
    share written to JSON."""
    from sequencer.fast import gemm
    if not gemm.available():
        pytest.skip('no oneDNN inner product')
    out = tmp_path / 'shapes.json'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'gemm_shapes.py'), '--batch-size', '1',
                           '--img-size', '64', '--repeats', '1', '--steps', '1', '--reference-size', '128',
                           '--results', str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, 'PYTHONPATH': ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    per_kind = {k: sum(r['per_step'] for r in data['gemms'] if r['kind'] == k) for k in gemm.KINDS}
    # Sequencer2D-S: the stem, 18 blocks of 4 GEMMs (input projection, fc1, fc2, fc), 3 downsamplings, the head
    assert per_kind == {'forward': 77, 'input_grad': 76, 'weight_grad': 77}, per_kind
    assert all(r['ms_mkl'] > 0 and r['ms_onednn'] > 0 for r in data['gemms'])
    assert all(r['a_transposed'] for r in data['gemms'] if r['kind'] == 'weight_grad')
    summary = data['summary']
    assert 0 < summary['gemm_share_of_step_chosen'] and set(summary['chosen']) == set(gemm.KINDS)
    assert 'of the step' in proc.stdout


@pytest.mark.slow
def test_check_compile_script_on_the_gpu_path(tmp_path):
    """benchmarks/check_compile.py --gpu-path: the fused engine's Triton kernels (through Triton's interpreter)
    under bf16 autocast, compiled (AOT autograd here; inductor takes minutes on two cores) against eager,
    forward and gradients; --gpu-path without the fused engine is a one-line error."""
    pytest.importorskip('triton')
    script = os.path.join(ROOT, 'benchmarks', 'check_compile.py')
    common = [sys.executable, script, 'sequencer2d_s', '--layers', '1,1,1,1', '--img-size', '28', '--gpu-path']
    proc = subprocess.run(common + ['--rnn-engine', 'fused', '--precision', 'bf16', '--rtol', '1e-2', '--backend',
                                    'aot_eager'], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'GPU path through the Triton interpreter' in proc.stdout
    (row,) = [ln for ln in proc.stdout.splitlines() if ln.startswith('sequencer2d_s ')]
    assert row.split()[1:3] == ['1', '0'] and ' ok' in row, row    # one graph, no break
    bad = subprocess.run(common, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == 'check_compile.py: error: --gpu-path needs --rnn-engine fused'


def test_gpu_script_runs_the_steps_asked_for(tmp_path):
    """benchmarks/gpu.sh selects steps by name or part (commands echoed here instead of run: no GPU), passes each
    its options, names each `sequencer benchmark` step's results file after the GPU and the step, and rejects an
    unknown name with exit 2."""
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'nvidia-smi').write_text('#!/bin/sh\necho "NVIDIA H200"\n')
    (fake / 'nvidia-smi').chmod(0o755)
    results = tmp_path / 'results'
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", PYTHON='echo', RESULTS_DIR=str(results))
    script = os.path.join(ROOT, 'benchmarks', 'gpu.sh')

    def ran(what):
        proc = subprocess.run(['bash', script, what, str(tmp_path / 'out')], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith('== ') and ' rc=' not in ln]

    assert ran('train_fused_cudagraphs,tests') == ['train_fused_cudagraphs', 'tests']
    assert ran('infer') == ['infer_eager', 'infer_compiled', 'infer_auto']
    assert len(ran('all')) == 17
    assert ran('session') == ['train_fused', 'infer_eager', 'infer_auto', 'compare_train', 'compare_infer', 'tests']
    assert ran('diag') == ['tests', 'accuracy', 'parity', 'profile_fused', 'profile_timm']
    assert ran('session2') == ['parity', 'data_jpegs', 'data_j8', 'data_j8_device']
    assert ran('train')[:2] == ['train_fused', 'train_fused_plain_norm']
    log = (tmp_path / 'out' / 'train_fused_cudagraphs.log').read_text()
    assert log.startswith('-m sequencer.cli benchmark --model sequencer2d_s --device cuda')
    assert '--compile-mode reduce-overhead --timm-eager' in log and '--batch-size 256 --precision bf16' in log
    assert log.split()[-2:] == ['--results-file', f'{results}/gpu-nvidia-h200-train_fused_cudagraphs.json']
    ran('infer_auto')
    log = (tmp_path / 'out' / 'infer_auto.log').read_text()
    assert '--mode infer' in log and '--rnn-engine auto' in log and '--rnn-engine fused' not in log
    assert 'benchmarks/profile_step.py --timm' in (tmp_path / 'out' / 'profile_timm.log').read_text()
    log = (tmp_path / 'out' / 'compare_train.log').read_text()
    assert '--compare-timm sequencer2d_s convnext_tiny swin_tiny_patch4_window7_224' in log
    assert 'tests/test_numerics.py' in (tmp_path / 'out' / 'tests.log').read_text()
    for what, name in (('train,nosuchstep', 'nosuchstep'), ('train infer', 'train infer'), ('train,,tests', '')):
        bad = subprocess.run(['bash', script, what], env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and f"unknown step or part '{name}'" in bad.stderr, (what, bad.stderr)


def test_cpu_script_runs_both_engines_and_names_results_after_the_processor(tmp_path):
    """benchmarks/cpu.sh (commands echoed here instead of run): Sequencer2D-S against timm with 'auto' and 'native',
    batch 8 both modes and batch 1 inference, 'auto' training with the tuned allocator, extra options passed on,
    results named after the processor: its model name, family and model numbers."""
    import re
    with open('/proc/cpuinfo') as f:
        fields = dict(ln.split(':', 1) for ln in f.read().split('\n\n')[0].splitlines() if ':' in ln)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if 'model name' not in fields:
        pytest.skip('no model name in /proc/cpuinfo')
    slug = re.sub(r'[^a-z0-9]+', '-', re.sub(r'\((r|tm)\)', '', fields['model name'].lower())).strip('-')
    if fields.get('cpu family', '').isdigit() and fields.get('model', '').isdigit():   # e.g. -family-25-model-17
        slug += f"-family-{fields['cpu family']}-model-{fields['model']}"
    env = dict(os.environ, PYTHON='echo', RESULTS_DIR=str(tmp_path))
    proc = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'cpu.sh'), '--iters', '2'], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    runs = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith('-m sequencer.cli benchmark')]
    assert len(runs) == 5
    common = ('--model sequencer2d_s --num-threads 2 --compare-timm --no-memory').split()
    want = [('auto', '8', 'both', ''), ('native', '8', 'both', ''), ('auto', '1', 'infer', ''),
            ('native', '1', 'infer', ''), ('auto', '8', 'train', '-malloc')]
    for argv, (engine, batch, mode, suffix) in zip(runs, want):
        assert argv[3:3 + len(common)] == common, argv
        opts = dict(zip(argv, argv[1:]))
        assert (opts['--rnn-engine'], opts['-b'], opts['--mode'], opts['--iters']) == (engine, batch, mode, '2')
        assert ('--malloc-tuning' in argv) == (suffix == '-malloc'), argv
        assert argv[-2:] == ['--results-file', f'{tmp_path}/cpu-{slug}-{engine}-b{batch}{suffix}.json'], argv
    (shapes,) = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith('benchmarks/gemm_shapes.py')]
    assert shapes[-2:] == ['--results', f'{tmp_path}/cpu-{slug}-gemm-shapes-b8.json'], shapes


def test_cuda_graph_modes_are_recognised():
    """The compile modes that replay CUDA graphs, whose replays' CUDA peak memory is not reported (the graphs'
    pool was allocated at capture)."""
    assert _uses_cuda_graphs('reduce-overhead') and _uses_cuda_graphs('max-autotune')
    assert not _uses_cuda_graphs('max-autotune-no-cudagraphs')
    assert not _uses_cuda_graphs('default') and not _uses_cuda_graphs(None)


def test_cpu_script_names_a_restricted_mkl_and_adds_onnxruntime_to_auto(tmp_path):
    """With MKL_ENABLE_INSTRUCTIONS set, the results' names say so; the 'auto' runs (only) time onnxruntime
    where it is importable (PYTHON=echo: the import check succeeds)."""
    env = dict(os.environ, PYTHON='echo', RESULTS_DIR=str(tmp_path), MKL_ENABLE_INSTRUCTIONS='AVX2')
    proc = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'cpu.sh')], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    runs = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith('-m sequencer.cli benchmark')]
    assert len(runs) == 5
    for argv in runs:
        engine = argv[argv.index('--rnn-engine') + 1]
        suffix = '-malloc' if '--malloc-tuning' in argv else ''
        assert argv[-1].endswith(f'-mkl-avx2-{engine}-b{argv[argv.index("-b") + 1]}{suffix}.json'), argv
        # onnxruntime times inference, in the 'auto' runs that infer
        infers = argv[argv.index('--mode') + 1] in ('infer', 'both')
        assert ('--compare-onnxruntime' in argv) == (engine == 'auto' and infers), argv


def test_cpu_script_as_avx2_holds_every_library_to_avx2(tmp_path):
    """AS_AVX2=1: every run sees PyTorch's kernels, MKL, oneDNN and ours held to AVX2, and the results' names say
    so (a stand-in python prints its environment's limits with its arguments)."""
    fake = tmp_path / 'python'
    fake.write_text('#!/usr/bin/env bash\n'
                    'echo "$ATEN_CPU_CAPABILITY $MKL_ENABLE_INSTRUCTIONS $ONEDNN_MAX_CPU_ISA $SEQUENCER_CPU_ISA $*"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), RESULTS_DIR=str(tmp_path), AS_AVX2='1')
    for name in ('ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS', 'ONEDNN_MAX_CPU_ISA', 'SEQUENCER_CPU_ISA'):
        env.pop(name, None)
    proc = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'cpu.sh')], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    runs = [ln.split() for ln in proc.stdout.splitlines() if '--results' in ln]
    assert len(runs) == 6   # five benchmarks and the GEMM shapes (the import check prints too, without --results)
    for argv in runs:
        assert argv[:4] == ['avx2', 'AVX2', 'AVX2', 'x86_64_v3'], argv
        assert '-as-avx2-' in argv[-1], argv


def test_instruction_set_limits_are_printed_and_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('MKL_ENABLE_INSTRUCTIONS', 'AVX2')
    out = tmp_path / 'limited.json'
    assert main(['benchmark', *TINY, '--mode', 'infer', '--no-memory', '--results-file', str(out)]) == 0
    assert json.loads(out.read_text())['environment']['isa_limits'] == {'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}
    assert "instruction sets held below this processor's: MKL_ENABLE_INSTRUCTIONS=AVX2" in capsys.readouterr().out
