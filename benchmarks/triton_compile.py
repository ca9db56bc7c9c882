"""Compiles every Triton kernel of the GPU path for a GPU architecture, without a GPU, and reports what each
launch configuration needs: registers per thread, local memory (register spills) and shared memory.

Triton compiles ahead of time for a target (``triton.compile`` with a ``GPUTarget``; ptxas ships with
Triton's wheels), so a machine without a GPU can check that the kernels compile for the GPU (the
interpreter, which the tests run, accepts some code the compiler rejects) and see their resource use.
The shapes are Sequencer2D-S's: LayerNorm over 192 and 384 channels, LSTM hidden sizes 48 and 96, in
bfloat16 and float32, every LSTM launch candidate of ``triton_lstm.CANDIDATES``.

    python benchmarks/triton_compile.py [--arch 90] [--only norm|lstm] [--json FILE]

Exits 1 if a kernel fails to compile or a LayerNorm kernel spills registers to local memory (the LayerNorm
kernels are sized to stay in registers); an LSTM configuration that exceeds the shared memory of the
architecture (227 KB on sm_90) or spills is reported, since the autotuner skips or times it on the GPU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

# shared memory per block, in bytes, by architecture (opt-in maximum)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}


def _usage(compiled, cuobjdump: str) -> dict:
    """Registers, local (spill) and shared memory of a compiled kernel, read from its cubin."""
    with tempfile.NamedTemporaryFile(suffix='.cubin', delete=False) as f:
        f.write(compiled.asm['cubin'])
        path = f.name
    try:
        out = subprocess.run([cuobjdump, '-res-usage', path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    line = next(ln for ln in out.splitlines() if 'REG:' in ln)
    fields = dict(item.split(':')[:2] for item in line.split() if ':' in item)
    shared = max(int(fields.get('SHARED', 0)), int(getattr(compiled.metadata, 'shared', 0) or 0))
    spill = int(fields.get('LOCAL', 0)) + int(fields.get('STACK', 0))   # local memory and the spill stack
    return {'registers': int(fields['REG']), 'local_bytes': spill, 'shared_bytes': shared}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', type=int, default=90, help='compute capability x 10 (default 90: H100 / H200)')
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    p.add_argument('--only', choices=('norm', 'lstm'), default=None, help='only the LayerNorm or the LSTM kernels')
    args = p.parse_args(argv)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        print(f'triton_compile.py: needs Triton ({e})', file=sys.stderr)
        return 2
    from sequencer.fast import triton_lstm as tl_
    from sequencer.fast import triton_norm as tn
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
    if not os.path.exists(cuobjdump):
        print(f'triton_compile.py: no cuobjdump in this Triton installation ({cuobjdump})', file=sys.stderr)
        return 2
    target = GPUTarget('cuda', args.arch, 32)
    limit = SHARED_LIMIT.get(args.arch)
    rows, failed = [], False

    def build(kernel, name, signature, constexprs, num_warps, strict):
        nonlocal failed
        row = dict(kernel=name, num_warps=num_warps, **{k: v for k, v in constexprs.items()})
        try:
            src = ASTSource(fn=JITFunction(kernel), signature=signature, constexprs=constexprs)
            row.update(_usage(triton.compile(src, target=target, options={'num_warps': num_warps}), cuobjdump))
            row['fits'] = limit is None or row['shared_bytes'] <= limit
            if strict and (row['local_bytes'] or not row['fits']):
                failed = True
                row['error'] = 'spills registers' if row['local_bytes'] else 'exceeds shared memory'
        except Exception as e:   # a compile error: report it, keep going
            failed = True
            row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        rows.append(row)
        extra = row.get('error') or (f"{row['registers']} registers, {row['local_bytes']} B spilled, "
                                     f"{row['shared_bytes'] / 1024:.1f} KB shared"
                                     + ('' if row['fits']
                                        else ' (exceeds the shared memory: skipped by the autotuner)'))
        consts = ' '.join(f'{k}={v}' for k, v in constexprs.items())
        print(f'{name:16s} {consts:70s} warps={num_warps}: {extra}', flush=True)

    for C in ((192, 384) if args.only != 'lstm' else ()):
        block_c, block_m, warps = tn._blocks(C)
        for dt in ('bf16', 'fp32'):
            out = 'bf16' if dt == 'bf16' else 'fp32'
            build(tn._ln_fwd_kernel, 'layer_norm_fwd',
                  {'x_ptr': f'*{dt}', 'w_ptr': '*fp32', 'b_ptr': '*fp32', 'out_ptr': f'*{out}', 'stats_ptr': '*fp32',
                   'M': 'i32', 'C': 'i32', 'eps': 'fp32', 'BLOCK_M': 'constexpr', 'BLOCK_C': 'constexpr',
                   'RNE': 'constexpr'},
                  {'BLOCK_M': block_m, 'BLOCK_C': block_c, 'RNE': False}, warps, True)
            build(tn._ln_bwd_kernel, 'layer_norm_bwd',
                  {'g_ptr': f'*{out}', 'x_ptr': f'*{dt}', 'stats_ptr': '*fp32', 'w_ptr': '*fp32', 'gres_ptr': f'*{dt}',
                   'dx_ptr': f'*{dt}', 'part_ptr': '*fp32', 'M': 'i32', 'C': 'i32', 'rows_per_prog': 'i32',
                   'HAS_RES': 'constexpr', 'BLOCK_M': 'constexpr', 'BLOCK_C': 'constexpr', 'RNE': 'constexpr'},
                  {'HAS_RES': True, 'BLOCK_M': block_m, 'BLOCK_C': block_c, 'RNE': False}, warps, True)
    common = {'T': 'i32', 'N': 'i32', 'D': 'i32', 'R': 'i32'}
    for hidden in ((48, 96) if args.only != 'norm' else ()):
        _, block_h = tl_.config_for(hidden)
        for lowp in (True, False):
            if not tl_.supported(hidden, lowp):
                continue
            w = 'bf16' if lowp else 'fp32'
            saved = 'fp16' if lowp else 'fp32'
            for cfg in tl_.CANDIDATES:
                if not lowp and cfg.block_n > 32:   # as the autotuner's pruning
                    continue
                consts = {'HID': hidden, 'BLOCK_N': cfg.block_n, 'BLOCK_H': block_h, 'LOWP': lowp,
                          'RELOAD': cfg.reload, 'UPCAST': False}
                build(tl_._lstm_fwd_kernel, 'lstm_fwd',
                      {'xp_ptr': f'*{w}', 'whh_ptr': f'*{w}', 'rows_ptr': '*i64', 'y_ptr': f'*{w}',
                       'act_ptr': f'*{saved}', 'cs_ptr': f'*{saved}', **common, 'HID': 'constexpr',
                       'BLOCK_N': 'constexpr', 'BLOCK_H': 'constexpr', 'SAVE': 'constexpr', 'LOWP': 'constexpr',
                       'RELOAD': 'constexpr', 'UPCAST': 'constexpr'},
                      {**consts, 'SAVE': True}, cfg.num_warps, False)
                build(tl_._lstm_bwd_kernel, 'lstm_bwd',
                      {'gy_ptr': f'*{w}', 'whh_ptr': f'*{w}', 'rows_ptr': '*i64', 'act_ptr': f'*{saved}',
                       'cs_ptr': f'*{saved}', 'dxp_ptr': f'*{w}', **common, 'HID': 'constexpr',
                       'BLOCK_N': 'constexpr', 'BLOCK_H': 'constexpr', 'LOWP': 'constexpr', 'RELOAD': 'constexpr',
                       'UPCAST': 'constexpr'},
                      consts, cfg.num_warps, False)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'arch': args.arch, 'triton': triton.__version__, 'kernels': rows}, f, indent=1)
    print(f"{len(rows)} kernels compiled for sm_{args.arch}; "
          + ('FAILED: see above' if failed else 'no compile error' + ('; the LayerNorm kernels keep to registers'
                                                                    if args.only != 'lstm' else '')))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
