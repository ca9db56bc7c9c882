#!/usr/bin/env python3
"""Check that torch.compile works on every model: graphs, graph breaks, and agreement with eager.

For each model of ``sequencer.list_models()`` (or a glob), at a small input:

1. ``torch._dynamo.explain`` traces the forward and reports how many graphs it produced and how many
   graph breaks split them (with the distinct reasons);
2. ``torch.compile`` (inductor by default, ``dynamic=False`` unless ``--dynamic`` says otherwise) runs the forward
   and is compared with eager: max |compiled - eager| of the logits, relative to max |eager|;
3. with ``--backward`` (the default) a forward + backward through the compiled model is compared with
   eager too: the largest relative difference over all parameter gradients.

The head is re-initialised with small random weights (it starts at zero, which would make every
comparison trivially equal). Exit status 1 when any model fails to compile or disagrees beyond
``--rtol``.

    python benchmarks/check_compile.py                         # every model, 56 px, full depth
    python benchmarks/check_compile.py --layers 1,1,1,1        # every model, one block per stage (faster)
    python benchmarks/check_compile.py 'sequencer2d_*' --rnn-engine native --markdown
    # the fused engine's GPU path (Triton kernels) on the CPU, through Triton's interpreter, under bf16 autocast
    python benchmarks/check_compile.py sequencer2d_s --layers 1,1,1,1 --img-size 28 --rnn-engine fused \
        --gpu-path --precision bf16 --rtol 1e-2
"""
import argparse
import contextlib
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sequencer  # noqa: E402
from sequencer.fast import cpu_kernel_disabled, triton_on_cpu  # noqa: E402
from sequencer.fast.cpu_kernel import prepare_for_compile  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('pattern', nargs='?', default='*', help="glob over model names (default '*': every model)")
    p.add_argument('--img-size', type=int, default=56, help='square input side (default 56: small and valid for '
                   'every model)')
    p.add_argument('--batch-size', type=int, default=2, help='images per batch (default 2)')
    p.add_argument('--layers', default=None, metavar='N,N,N,N', help='blocks per stage, overriding the models\' '
                   '(default: the real depths)')
    p.add_argument('--rnn-engine', choices=('auto', 'native', 'fused'), default=None,
                   help="engine of the recurrences (default: the model's default)")
    p.add_argument('--backend', default='inductor', help='torch.compile backend (default inductor)')
    p.add_argument('--dynamic', choices=('false', 'auto', 'true'), default='false',
                   help="torch.compile's dynamic argument: false (default; shapes fixed, one graph per stage shape), "
                        "auto (torch's default None: shapes that change between calls become symbolic), true")
    p.add_argument('--no-backward', dest='backward', action='store_false',
                   help='check the forward only (default: forward and the gradients of a backward pass)')
    p.add_argument('--rtol', type=float, default=1e-4,
                   help='largest accepted difference relative to the largest eager value (default 1e-4)')
    p.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32',
                   help='fp32 (default), or bf16 autocast around every forward (eager and compiled)')
    p.add_argument('--gpu-path', action='store_true',
                   help="run the fused engine's GPU path (its Triton kernels) on the CPU through Triton's interpreter "
                        "(runs with TRITON_INTERPRET=1; slow: use small models); with --rnn-engine fused")
    p.add_argument('--num-threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--markdown', action='store_true', help='print the table as markdown')
    return p.parse_args(argv)


DYNAMIC = {'false': False, 'auto': None, 'true': True}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def build(name: str, args) -> torch.nn.Module:
    kwargs = {}
    if args.layers:
        kwargs['layers'] = tuple(int(t) for t in args.layers.split(','))
    torch.manual_seed(0)
    model = sequencer.create_model(name, rnn_engine=args.rnn_engine, **kwargs)
    torch.nn.init.normal_(model.get_classifier().weight, std=0.02)
    return model.eval()


def _context(args):
    """The autocast (and, with --gpu-path, the CPU kernels switched off and the GPU path on CPU tensors) of every
    forward."""
    stack = contextlib.ExitStack()
    if args.gpu_path:
        stack.enter_context(triton_on_cpu())
        stack.enter_context(cpu_kernel_disabled())
    stack.enter_context(torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.precision == 'bf16'))
    return stack


def check(name: str, args) -> dict:
    row = dict(model=name, graphs='-', breaks='-', reasons='', compile_s='-', fwd_diff='-', grad_diff='-', ok=False)
    model = build(name, args)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
    try:
        torch._dynamo.reset()
        prepare_for_compile(x.device)
        with torch.no_grad(), _context(args):
            explained = torch._dynamo.explain(model)(x)
        row['graphs'], row['breaks'] = explained.graph_count, explained.graph_break_count
        reasons = sorted({r.reason.splitlines()[0][:90] for r in explained.break_reasons})
        row['reasons'] = '; '.join(reasons)

        torch._dynamo.reset()
        compiled = torch.compile(model, backend=args.backend, dynamic=DYNAMIC[args.dynamic])
        start = time.perf_counter()
        with torch.no_grad(), _context(args):
            got = compiled(x).float()
        row['compile_s'] = f"{time.perf_counter() - start:.1f}"
        with torch.no_grad(), _context(args):
            want = model(x).float()
        row['fwd_diff'] = f"{_rel(got, want):.1e}"
        ok = _rel(got, want) <= args.rtol

        if args.backward:
            model.train()  # no dropout / drop-path in these models by default: deterministic
            params = [p for p in model.parameters() if p.requires_grad]
            with _context(args):
                loss = model(x).float().square().mean()
            loss.backward()
            eager_grads = [p.grad.clone() for p in params]
            model.zero_grad(set_to_none=True)
            with _context(args):
                loss = compiled(x).float().square().mean()
            loss.backward()
            diff = max(_rel(p.grad, g) for p, g in zip(params, eager_grads) if g.abs().max() > 0)
            row['grad_diff'] = f"{diff:.1e}"
            ok = ok and diff <= args.rtol * 10  # gradients accumulate more rounding than the forward
        row['ok'] = ok
    except Exception as e:  # report and go on with the next model
        row['reasons'] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        traceback.print_exc(file=sys.stderr)
    return row


COLUMNS = (('model', 'model'), ('graphs', 'graphs'), ('graph breaks', 'breaks'), ('compile s (fwd)', 'compile_s'),
           ('fwd rel. diff', 'fwd_diff'), ('grad rel. diff', 'grad_diff'), ('result', 'ok'),
           ('graph-break reasons', 'reasons'))


def render(rows, markdown: bool) -> str:
    table = [[c for c, _ in COLUMNS]] + [
        [('ok' if r[k] else 'FAIL') if k == 'ok' else str(r[k]) for _, k in COLUMNS] for r in rows]
    if markdown:
        lines = ['| ' + ' | '.join(table[0]) + ' |', '|' + '---|' * len(COLUMNS)]
        return '\n'.join(lines + ['| ' + ' | '.join(v.replace('|', '/') for v in line) + ' |' for line in table[1:]])
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return '\n'.join('  '.join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.gpu_path:
        if args.rnn_engine != 'fused':
            print("check_compile.py: error: --gpu-path needs --rnn-engine fused", file=sys.stderr)
            return 2
        if os.environ.get('TRITON_INTERPRET') != '1':
            # Triton reads it when it is imported (here, already by torch): start again with it set
            sys.stdout.flush()
            os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv],
                      dict(os.environ, TRITON_INTERPRET='1'))
        try:
            import triton  # noqa: F401
        except ImportError:
            print("check_compile.py: error: --gpu-path needs Triton installed", file=sys.stderr)
            return 2
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    names = sequencer.list_models(args.pattern)
    if not names:
        print(f"check_compile.py: error: no model matches {args.pattern!r}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, backend {args.backend}, dynamic={DYNAMIC[args.dynamic]}, {args.precision}"
          f"{', GPU path through the Triton interpreter' if args.gpu_path else ''}, "
          f"input {args.batch_size}x3x{args.img_size}x{args.img_size}, "
          f"engine {args.rnn_engine or 'default'}, layers {args.layers or 'as in the table'}",
          flush=True)
    rows = []
    for i, name in enumerate(names, 1):
        start = time.perf_counter()
        rows.append(check(name, args))
        print(f"[{i}/{len(names)}] {name}: {'ok' if rows[-1]['ok'] else 'FAIL'} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print(render(rows, args.markdown))
    return 0 if all(r['ok'] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
