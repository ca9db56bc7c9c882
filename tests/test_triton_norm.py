"""The GPU pre-norm (Triton LayerNorm fused with the residual's gradient), run by Triton's interpreter on CPU
tensors: the kernels against torch's LayerNorm, and whole models against the same models without them."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> dict:
    """Runs ``code`` with TRITON_INTERPRET=1 (read when Triton is imported); its lines 'NAME value ...'."""
    pytest.importorskip('triton')
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=dict(os.environ, TRITON_INTERPRET='1'),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for ln in proc.stdout.splitlines():
        name, *vals = ln.split()
        out[name] = vals
    return out


_KERNELS = '''
    import torch
    import torch.nn.functional as F
    from sequencer.fast import triton_norm as tn
    torch.manual_seed(0)
    # rows not a multiple of the row block, channels not a power of two, several rows per program
    for M, C, max_programs in [(37, 24, 1024), (130, 48, 3), (5, 200, 1)]:
        x = torch.randn(M, C) * 3 + 1
        w, b = torch.randn(C), torch.randn(C)
        g, g_res = torch.randn(M, C), torch.randn(M, C)
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        ref = F.layer_norm(xr, (C,), wr, br, 1e-6)
        ref.backward(g)
        out, mean, rstd = tn.layer_norm_forward(x, w, b, 1e-6, torch.float32)
        assert out.dtype == torch.float32 and mean.shape == rstd.shape == (M,)
        print(f'FWD_{M}', (out - ref).abs().max().item(), ref.abs().max().item())
        for res in (None, g_res):
            dx, dw, db = tn.layer_norm_backward(g, x, mean, rstd, w, res, max_programs=max_programs)
            want = xr.grad if res is None else xr.grad + res
            err = max((dx - want).abs().max().item(), (dw - wr.grad).abs().max().item(),
                      (db - br.grad).abs().max().item())
            print(f'BWD_{M}_{res is not None}', err, want.abs().max().item())
        # other rows per loop step give the same gradients (the interpreter ignores num_warps)
        for block_m, warps in ((1, 1), (16, 8)):
            dx, dwb = tn.norm_backward(g, x, torch.stack([mean, rstd]), w, g_res, max_programs=max_programs,
                                       block_m=block_m, num_warps=warps)
            err = max((dx - xr.grad - g_res).abs().max().item(), (dwb[0] - wr.grad).abs().max().item(),
                      (dwb[1] - br.grad).abs().max().item())
            print(f'BWDCFG_{M}_{block_m}', err, (xr.grad + g_res).abs().max().item())
        # low-precision output: exactly what casting the kernel's float32 output gives (round to nearest even)
        for dt in (torch.bfloat16, torch.float16):
            lp, _, _ = tn.layer_norm_forward(x, w, b, 1e-6, dt)
            print(f'LOWP_{M}_{dt}', int(not torch.equal(lp, out.to(dt))), 1.0)
        # low-precision x and output gradient (the residual stream and the first product's gradient under
        # autocast): the float32 computation on the same values, the input gradient rounded once
        xb, gb, rb = x.bfloat16(), g.bfloat16(), g_res.bfloat16()
        _, mean_b, rstd_b = tn.layer_norm_forward(xb, w, b, 1e-6, torch.bfloat16)
        dx_b, dw_b, db_b = tn.layer_norm_backward(gb, xb, mean_b, rstd_b, w, rb)
        xf = xb.float().requires_grad_()
        F.layer_norm(xf, (C,), w, b, 1e-6).backward(gb.float())
        want = xf.grad + rb.float()
        print(f'BF16IN_{M}', ((dx_b.float() - want).abs() / want.abs().max()).max().item(), 1e-2 * 0.5)
    for i, bad in enumerate([
            lambda: tn.layer_norm_forward(torch.randn(4, 8).t(), torch.ones(4), torch.zeros(4), 1e-6, torch.float32),
            lambda: tn.layer_norm_forward(torch.randn(4, 8), torch.ones(7), torch.zeros(8), 1e-6, torch.float32),
            lambda: tn.layer_norm_backward(torch.randn(4, 8), torch.randn(4, 8), torch.zeros(3), torch.ones(3),
                                           torch.ones(8))]):
        try:
            bad()
        except ValueError:
            print(f'ERROR_{i} 0 1')
'''


@pytest.mark.slow
def test_triton_layer_norm_kernels():
    """Forward and backward (with and without the residual's gradient, one or several programs per run of
    rows) equal torch's LayerNorm within float32 rounding; low-precision outputs are the float32 result rounded
    to nearest even; each bad shape is a ValueError."""
    found = _run(_KERNELS)
    assert sum(1 for k in found if k.startswith('FWD')) == 3
    assert sum(1 for k in found if k.startswith('BWDCFG')) == 6
    assert {'ERROR_0', 'ERROR_1', 'ERROR_2'} <= set(found), found   # each bad call raised
    for name, (err, scale) in found.items():
        err, scale = float(err), float(scale)
        if name.startswith(('FWD', 'BWD')):
            assert err < 1e-5 * max(1.0, scale), (name, err, scale)
        elif name.startswith('LOWP'):
            assert err == 0, name            # 1: differs from the rounded float32 output
        elif name.startswith('BF16IN'):
            assert err < scale, (name, err)


_MODELS = '''
    import torch
    from sequencer import Sequencer2D, set_engine
    from sequencer.fast import FastRNN2D, FastSequencerBlock, cpu_kernel_disabled, to_plain, triton_norm, triton_on_cpu
    calls = {'fwd': 0, 'bwd': 0}
    for name in ('norm_forward', 'norm_backward'):
        def spy(*a, _f=getattr(triton_norm, name), _k='fwd' if name == 'norm_forward' else 'bwd', **k):
            calls[_k] += 1
            return _f(*a, **k)
        setattr(triton_norm, name, spy)

    def model(drop_path):
        torch.manual_seed(0)
        m = set_engine(Sequencer2D(layers=(1, 1, 1, 1), patch_sizes=(7, 2, 1, 1), embed_dims=(16, 24, 24, 24),
                                   hidden_sizes=(4, 8, 8, 8), mlp_ratios=(2, 2, 2, 2), num_classes=5,
                                   drop_path_rate=drop_path), 'fused')
        with torch.no_grad():   # the head starts at zero, the norms at (1, 0): random, so every gradient counts
            for mod in m.modules():
                if isinstance(mod, (torch.nn.LayerNorm, torch.nn.Linear)) and mod.weight.abs().max() in (0, 1):
                    mod.weight.normal_(1.0 if isinstance(mod, torch.nn.LayerNorm) else 0.0, 0.5)
                    mod.bias.normal_(0.0, 0.5)
        return m

    def run(m, fused_norm, autocast, seed=0):
        for b in m.modules():
            if isinstance(b, FastSequencerBlock):
                b.fused_norm = fused_norm
        m.zero_grad(set_to_none=True)
        x = torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(seed)   # the same drop-path draws
        # the backward too: checkpointed blocks run their forward again there
        with triton_on_cpu(), cpu_kernel_disabled():
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                out = m(x)
            (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return [out.detach().float(), x.grad] + [p.grad for p in m.parameters()]

    def err(ref, got):   # the largest error of any tensor relative to its largest entry
        return max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ref, got))

    for drop_path in (0.0, 0.5):      # the residual handed to the branches, and the drop-path form
        m = model(drop_path).train()
        ref = run(m, False, False)
        calls.update(fwd=0, bwd=0)
        got = run(m, True, False)
        print(f'MODEL_{drop_path}_fp32', err(ref, got), calls['fwd'], calls['bwd'])
        # bf16 autocast: against the float32 model, no further off than the model without the kernels: each
        # tensor's error relative to its largest entry, summed over the output and all gradients
        plain = run(m, False, True)
        calls.update(fwd=0, bwd=0)
        got = run(m, True, True)
        errs = lambda res: sum(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ref, res))
        print(f'MODEL_{drop_path}_bf16', errs(got) / errs(plain), calls['fwd'], calls['bwd'])
    # gradient checkpointing: the blocks' forwards (kernels included) run again in the backward
    m = model(0.0).train()
    ref = run(m, True, False)
    m.set_grad_checkpointing(True)
    calls.update(fwd=0, bwd=0)
    got = run(m, True, False)
    print('CHECKPOINTED', err(ref, got), calls['fwd'], calls['bwd'])
    # inference (no graph): the forward kernel alone
    m = model(0.0).eval()
    calls.update(fwd=0, bwd=0)
    with torch.no_grad(), triton_on_cpu(), cpu_kernel_disabled():
        x = torch.randn(2, 3, 28, 42)
        for b in m.modules():
            if isinstance(b, FastSequencerBlock):
                b.fused_norm = False
        ref = m(x)
        for b in m.modules():
            if isinstance(b, FastSequencerBlock):
                b.fused_norm = True
        got = m(x)
    print('INFER', (ref - got).abs().max().item(), calls['fwd'], calls['bwd'])
    # a double backward (create_graph) takes LayerNorm's own, differentiable backward; under autocast its
    # bfloat16 input meets float32 weights there
    m = model(0.0).train()
    for mod in m.modules():   # the BiLSTM2Ds on nn.LSTM: the fused engine's own backward is not differentiable
        if isinstance(mod, FastRNN2D):
            to_plain(mod)
    x = torch.randn(1, 3, 28, 28, requires_grad=True)
    for autocast in (False, True):
        res = {}
        for fused_norm in (False, True):
            for b in m.modules():
                if isinstance(b, FastSequencerBlock):
                    b.fused_norm = fused_norm
            calls.update(fwd=0, bwd=0)
            with triton_on_cpu(), cpu_kernel_disabled():
                with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                    y = m(x)
                g, = torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
                gg, = torch.autograd.grad(g.square().sum(), x)
            res[fused_norm] = (g.detach(), gg)
        print(f'DOUBLE_{autocast}', max((a - b).abs().max().item() / a.abs().max().item()
                                       for a, b in zip(res[False], res[True])), calls['fwd'], calls['bwd'])
'''


@pytest.mark.slow
def test_models_through_the_triton_norm():
    """A model's every pre-norm runs the Triton kernels (two per block, forward and backward), in both forms
    of the block (residual handed to the branches; drop path), and outputs and all gradients equal the same
    model without them within float32 rounding; under bf16 autocast (where the norm writes bfloat16 for the
    branch's first product) they are as close to the float32 model as the model without them. Gradient
    checkpointing runs them again in the backward; inference runs the forward kernel only; a double backward
    works."""
    found = _run(_MODELS)
    assert set(found) == {'MODEL_0.0_fp32', 'MODEL_0.0_bf16', 'MODEL_0.5_fp32', 'MODEL_0.5_bf16', 'INFER',
                          'DOUBLE_False', 'DOUBLE_True', 'CHECKPOINTED'}, found
    for name, (err, n_fwd, n_bwd) in found.items():
        err = float(err)
        if name.startswith('MODEL'):
            assert (n_fwd, n_bwd) == ('8', '8'), (name, n_fwd, n_bwd)   # 4 blocks x 2 pre-norms
            # float32: equal within rounding; bf16: its summed error against float32 over the plain model's
            # (0.94-0.95 here; 1.3-1.7 when the bfloat16 stores truncated instead of rounding)
            assert err < (1.1 if name.endswith('bf16') else 1e-5), (name, err)
        elif name == 'CHECKPOINTED':   # each block's forward twice (the second time inside the backward)
            assert (n_fwd, n_bwd) == ('16', '8') and err < 1e-5, (name, err, n_fwd, n_bwd)
        elif name == 'INFER':
            assert (n_fwd, n_bwd) == ('8', '0') and err < 1e-5, (name, err, n_fwd, n_bwd)
        else:   # DOUBLE: the kernels ran forward (their backward is LayerNorm's own here)
            assert n_fwd == '8' and err < (5e-2 if name.endswith('True') else 1e-5), (name, err, n_fwd)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_triton_norm_on_cuda_matches_plain_layer_norm():
    """On a GPU: Sequencer2D-S-like blocks under bf16 autocast with and without the pre-norm kernels; outputs
    and gradients against the float32 model no further off with them than without."""
    pytest.importorskip('triton')
    from sequencer import Sequencer2D, set_engine
    from sequencer.fast import FastSequencerBlock
    torch.manual_seed(0)
    m = set_engine(Sequencer2D(layers=(1, 1, 1, 1), embed_dims=(192, 384, 384, 384), hidden_sizes=(48, 96, 96, 96),
                               num_classes=10).cuda(), 'fused')
    with torch.no_grad():
        m.head.fc.weight.normal_(0, 0.05)
    x = torch.randn(4, 3, 224, 224, device='cuda')

    def run(fused_norm, autocast):
        for b in m.modules():
            if isinstance(b, FastSequencerBlock):
                b.fused_norm = fused_norm
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
            out = m(xi)
        out.float().square().sum().backward()
        return [out.detach().float(), xi.grad] + [p.grad for p in m.parameters()]

    def err(ref, got):
        return max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ref, got))

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = run(False, False)
        assert err(ref, run(True, False)) < 1e-4
        assert err(ref, run(True, True)) < 1.5 * err(ref, run(False, True)) + 1e-3
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.slow
def test_kernels_compile_for_the_gpu():
    """benchmarks/triton_compile.py compiles the pre-norm kernels for sm_90 without a GPU (Triton's ahead-of-time
    compiler and ptxas): no compile error, no register spill."""
    pytest.importorskip('triton')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'triton_compile.py'), '--only', 'norm'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode == 2:
        pytest.skip(proc.stderr.strip())   # a Triton installation without the NVIDIA tools
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert sum(ln.startswith('layer_norm_') for ln in lines) == 8, proc.stdout
    assert all(' 0 B spilled' in ln for ln in lines if ln.startswith('layer_norm_')), proc.stdout
    assert lines[-1].startswith('8 kernels compiled for sm_90; no compile error'), lines[-1]
