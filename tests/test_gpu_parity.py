"""benchmarks/gpu_parity.py: the verdict on synthetic curves (fused inside / outside native's envelope), and a tiny
run on the CPU (one block per stage, 16 px, 3 steps) that writes the JSON a GPU session would."""
import importlib.util
import json
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location('gpu_parity', os.path.join(ROOT, 'benchmarks', 'gpu_parity.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gp = _script()


def _runs(fused):
    # native seeds give per-window means 2.0 / 1.0, 2.2 / 1.2, 2.4 / 1.4 over two windows of 4 steps
    native = [{'arm': 'native', 'seed': s, 'loss': [2.0 + 0.2 * s] * 4 + [1.0 + 0.2 * s] * 4} for s in range(3)]
    return native + [{'arm': 'fused', 'seed': 0, 'loss': fused}]


def test_verdict_inside_envelope():
    v = gp.verdict(_runs([2.1, 2.3, 2.1, 2.3] + [1.3] * 4), window=4, tol_spread=0.5, tol_level=0.0)
    assert v['windows'] == [[0, 4], [4, 8]]
    assert v['native_min'] == pytest.approx([2.0, 1.0]) and v['native_max'] == pytest.approx([2.4, 1.4])
    assert v['native_mean'] == pytest.approx([2.2, 1.2])
    assert v['margin'] == pytest.approx([0.2, 0.2])
    e = v['runs']['fused seed 0']
    assert e['window_means'] == pytest.approx([2.2, 1.3])
    assert e['inside'] == [True, True] and e['n_outside'] == 0 and e['passed'] and v['passed']
    assert e['max_excess'] == 0.0
    assert e['max_dev_mean'] == pytest.approx(0.1)
    assert e['max_dev_same_seed'] == pytest.approx(0.3)   # native seed 0: 2.0, 1.0


def test_verdict_outside_envelope_and_tolerances():
    fused = [2.2] * 4 + [1.7] * 4    # second window 0.3 above native's max
    v = gp.verdict(_runs(fused), window=4, tol_spread=0.5, tol_level=0.0)   # widened by 0.2: outside
    e = v['runs']['fused seed 0']
    assert e['inside'] == [True, False] and e['n_outside'] == 1 and not e['passed'] and v['passed'] is False
    assert e['max_excess'] == pytest.approx(0.3)
    assert e['max_dev_mean'] == pytest.approx(0.5)
    # widened by 0.5 x 0.4 + 0.1 x 1.2 = 0.32 >= 0.3: inside
    assert gp.verdict(_runs(fused), window=4, tol_spread=0.5, tol_level=0.1)['passed'] is True
    # a diverged run is never inside, and a partial last window is its own window
    nan = gp.verdict(_runs([2.2] * 4 + [math.nan] + [1.2] * 3), window=3, tol_spread=0.5, tol_level=0.0)
    assert nan['windows'] == [[0, 3], [3, 6], [6, 8]]
    assert nan['runs']['fused seed 0']['inside'] == [True, False, True]
    assert nan['runs']['fused seed 0']['max_excess'] == math.inf
    with pytest.raises(ValueError, match='as many steps'):
        gp.verdict(_runs([2.0] * 5), window=4, tol_spread=0.5, tol_level=0.0)


def test_slug_and_batch_order():
    assert gp.slug('NVIDIA H100 80GB HBM3') == 'nvidia-h100-80gb-hbm3'
    assert gp.slug('Intel(R) Xeon(R) Processor') == 'intel-xeon-processor'
    order = gp.batch_order(10, steps=7, batch_size=4, seed=3)
    assert order.shape == (7, 4)
    flat = order.flatten().tolist()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))   # whole passes
    assert torch.equal(order, gp.batch_order(10, 7, 4, 3)) and not torch.equal(order, gp.batch_order(10, 7, 4, 4))


@pytest.mark.slow
def test_tiny_cpu_run_writes_results(tmp_path, capsys):
    out = tmp_path / 'parity.json'
    rc = gp.main(['--device', 'cpu', '--layers', '1,1,1,1', '--img-size', '16', '--steps', '3', '--batch-size', '2',
                  '--window', '2', '--native-seeds', '0', '1', '--results', str(out), '--plot',
                  str(tmp_path / 'parity.png')])
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert set(r) == {'config', 'environment', 'runs', 'verdict'}
    assert r['config']['steps'] == 3 and r['config']['layers'] == [1, 1, 1, 1] and r['config']['autocast'] == 'bfloat16'
    assert r['environment']['device'] == 'cpu' and r['environment']['torch'] == torch.__version__
    assert [(x['arm'], x['seed']) for x in r['runs']] == [('native', 0), ('fused', 0), ('timm', 0), ('native', 1)]
    for x in r['runs']:
        assert len(x['loss']) == 3 and all(math.isfinite(v) and 1.0 < v < 4.0 for v in x['loss'])
        assert x['seconds'] > 0 and 0 <= x['val_top1'] <= 100
        assert f"{x['arm']} seed {x['seed']}: 3 steps in" in printed
    # the same weights and data order: the first step's loss is the same function of the same numbers in all arms
    first = [x['loss'][0] for x in r['runs'] if x['seed'] == 0]
    assert max(first) - min(first) < 1e-2
    # the verdict in the file is the verdict of the curves in the file
    cfg = r['config']
    again = gp.verdict(r['runs'], cfg['window'], cfg['tol_spread'], cfg['tol_level'])
    assert r['verdict'] == json.loads(json.dumps(gp._finite(again)))
    assert set(r['verdict']['runs']) == {'fused seed 0', 'timm seed 0'}
    assert r['verdict']['windows'] == [[0, 2], [2, 3]]
    assert rc == (0 if r['verdict']['passed'] else 1)
    assert (tmp_path / 'parity.png').stat().st_size > 0
