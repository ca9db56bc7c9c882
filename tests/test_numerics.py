"""Whole-model numerics of each engine against a float64 reference, with the tolerances the engines are held to.

The reference is the plain model (``nn.LSTM``) in float64 on the CPU with the same weights and inputs. Errors are
relative Frobenius norms: ``|y - y_ref| / |y_ref|`` for the logits and for the gradient of every parameter group
(the loss is a fixed random projection of the logits, so that all gradients are non-trivial).

Tolerances (stated here, checked on every device the machine has):
* float32, any engine: logits 1e-4, gradients 1e-3 (float32 rounding through 16 blocks);
* bfloat16 autocast: logits 5e-2, gradients 1e-1, and the fused engine's errors at most twice the native
  engine's plus 1e-2: its low-precision products must not be worse than ``nn.LSTM``'s own under autocast.
"""
import copy

import pytest
import torch

from sequencer import create_model

F32 = dict(out=1e-4, grad=1e-3)
BF16 = dict(out=5e-2, grad=1e-1)
GROUPS = ('stem', 'rnn', 'fc', 'mlp', 'norm', 'head')


def _group(name: str) -> str:
    if name.startswith('stem'):
        return 'stem'
    if '.rnn_v.' in name or '.rnn_h.' in name:
        return 'rnn'
    if '.rnn_tokens.fc.' in name or 'downsample' in name:
        return 'fc'
    if 'mlp' in name:
        return 'mlp'
    if 'norm' in name:
        return 'norm'
    return 'head'


def _run(model, x, proj, device, autocast):
    model = model.to(device)
    x = x.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    loss = (y.double() * proj.to(device)).sum()
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = _group(n)
        grads.setdefault(g, []).append(p.grad.detach().double().cpu().flatten())
    return y.detach().double().cpu(), {g: torch.cat(v) for g, v in grads.items()}


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def engine_errors(device: torch.device, autocast: bool, engines=('native', 'fused'), layers=(2, 1, 2, 1),
                  batch: int = 2, size: int = 56):
    """{engine: (logit error, {group: gradient error})} against the float64 plain model on the CPU."""
    torch.manual_seed(0)
    base = create_model('sequencer2d_s', rnn_engine='native', layers=layers, num_classes=10)
    torch.nn.init.normal_(base.head.fc.weight, std=0.05)   # the head starts at zero: nothing would flow back
    base.train()   # no dropout / drop-path in this model: train mode runs the same function as eval
    x = torch.randn(batch, 3, size, size)
    proj = torch.randn(batch, 10, dtype=torch.float64)
    y_ref, g_ref = _run(copy.deepcopy(base).double(), x.double(), proj, torch.device('cpu'), False)
    out = {}
    for engine in engines:
        model = create_model('sequencer2d_s', rnn_engine=engine, layers=layers, num_classes=10)
        model.load_state_dict(base.state_dict())
        model.train()
        y, g = _run(model, x, proj, device, autocast)
        out[engine] = (_rel(y, y_ref), {k: _rel(g[k], g_ref[k]) for k in g_ref})
    return out


def _check(errors, tol, relative_to_native: bool):
    for engine, (out_err, grad_errs) in errors.items():
        assert out_err < tol['out'], (engine, out_err)
        for group, err in grad_errs.items():
            assert err < tol['grad'], (engine, group, err)
    if relative_to_native:
        nat_out, nat_grads = errors['native']
        fus_out, fus_grads = errors['fused']
        assert fus_out <= 2 * nat_out + 1e-2, (fus_out, nat_out)
        for group in nat_grads:
            assert fus_grads[group] <= 2 * nat_grads[group] + 1e-2, (group, fus_grads[group], nat_grads[group])


def test_float32_engines_match_float64_on_cpu():
    _check(engine_errors(torch.device('cpu'), autocast=False), F32, relative_to_native=False)


@pytest.mark.slow
def test_bfloat16_autocast_engines_within_tolerance_on_cpu():
    _check(engine_errors(torch.device('cpu'), autocast=True), BF16, relative_to_native=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_float32_engines_match_float64_on_gpu():
    _check(engine_errors(torch.device('cuda'), autocast=False, batch=8, size=224), F32, relative_to_native=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_bfloat16_autocast_engines_within_tolerance_on_gpu():
    errors = engine_errors(torch.device('cuda'), autocast=True, batch=8, size=224, layers=(4, 3, 8, 3))
    _check(errors, BF16, relative_to_native=True)
