"""Does the fused engine train like nn.LSTM? The demo's recipe, trained with each engine and several seeds.

    python benchmarks/engine_parity.py [--engines native fused] [--seeds 0 1 2] [--epochs 12]

Each run is ``sequencer train`` on the embedded digits with the demo's model and recipe (see
``sequencer.engine.demo``), ``--rnn-engine ENGINE --seed SEED``, on the CPU. The per-epoch training loss and
validation top-1 of every run go to ``benchmarks/results/engine-parity-cpu.json`` and one plot,
``docs/engine-parity.png``; the summary compares each engine's final top-1 (mean, min, max over seeds) with
the seed-to-seed spread.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from sequencer.analysis.benchmark import environment
from sequencer.data.demo import write_digits
from sequencer.engine.demo import DATA, MODEL, RECIPE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(engine: str, seed: int, data: str, out: str, epochs: int) -> dict:
    recipe = list(RECIPE)
    i = recipe.index('--epochs')
    recipe[i + 1] = str(epochs)
    experiment = f'{engine}-seed{seed}'
    cmd = [sys.executable, '-m', 'sequencer.cli', 'train', data, *MODEL, *DATA, *recipe, '--rnn-engine', engine,
           '--seed', str(seed), '--output', out, '--experiment', experiment, '--log-interval', '1000']
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    took = time.time() - t0
    with open(os.path.join(out, experiment, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    return {'engine': engine, 'seed': seed, 'seconds': round(took, 1),
            'epoch': [int(r['epoch']) for r in rows],
            'train_loss': [float(r['train_loss']) for r in rows],
            'eval_top1': [float(r['eval_top1']) for r in rows]}


def plot(runs, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {'native': 'tab:blue', 'fused': 'tab:orange', 'auto': 'tab:green'}
    for r in runs:
        kw = dict(color=colors.get(r['engine'], 'k'), alpha=0.8,
                  label=r['engine'] if r['seed'] == min(x['seed'] for x in runs) else None)
        a.plot(r['epoch'], r['train_loss'], **kw)
        b.plot(r['epoch'], r['eval_top1'], **kw)
    a.set(xlabel='epoch', ylabel='training loss', title='training loss')
    b.set(xlabel='epoch', ylabel='validation top-1 (%)', title='validation top-1')
    a.legend()
    fig.suptitle('demo recipe (digits, CPU): nn.LSTM (native) vs the fused engine, one line per seed')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--engines', nargs='+', default=['native', 'fused'])
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--results', default=os.path.join(ROOT, 'benchmarks', 'results', 'engine-parity-cpu.json'))
    p.add_argument('--plot', default=os.path.join(ROOT, 'docs', 'engine-parity.png'))
    a = p.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits(os.path.join(tmp, 'digits'))
        for seed in a.seeds:
            for engine in a.engines:
                r = run(engine, seed, data, os.path.join(tmp, 'runs'), a.epochs)
                print(f"{engine:6s} seed {seed}: final top-1 {r['eval_top1'][-1]:.2f}%  "
                      f"loss {r['train_loss'][-1]:.4f}  ({r['seconds']:.0f} s)", flush=True)
                runs.append(r)
    summary = {}
    for engine in a.engines:
        final = [r['eval_top1'][-1] for r in runs if r['engine'] == engine]
        summary[engine] = {'final_top1_mean': round(statistics.mean(final), 3), 'final_top1_min': min(final),
                           'final_top1_max': max(final)}
        print(f"{engine:6s}: final top-1 mean {summary[engine]['final_top1_mean']:.2f}% "
              f"(min {min(final):.2f}, max {max(final):.2f}) over seeds {a.seeds}")
    result = {'environment': environment(torch.device('cpu')), 'epochs': a.epochs, 'seeds': a.seeds,
              'summary': summary, 'runs': runs}
    os.makedirs(os.path.dirname(a.results), exist_ok=True)
    tmp = a.results + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, a.results)
    plot(runs, a.plot)
    print(f"results {a.results}\nplot {a.plot}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
