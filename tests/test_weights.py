"""Weight loading: every layout and format, URLs through the hub cache, hf-hub ids, clear errors."""
import os
import pickle
import re
import zipfile

import pytest
import timm
import torch
from safetensors.torch import save_file

from sequencer import CheckpointError, create_model, load_checkpoint

from conftest import randomize

LAYERS = (1, 2, 1, 1)  # a small Sequencer2D-S-shaped model keeps these tests fast


def small(**kw):
    return create_model('sequencer2d_s', layers=LAYERS, **kw).eval()


def to_reference_layout(sd, layers=LAYERS):
    """This project's keys -> the reference code's keys, written out independently of the loader."""
    out = {}
    for k, v in sd.items():
        m = re.match(r'stages\.(\d+)\.downsample\.down\.(.*)', k)
        if m:
            i = int(m.group(1))
            k = f'blocks.{i - 1}.{layers[i - 1]}.down.{m.group(2)}'
        else:
            k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'blocks.\1.\2.', k)
            k = k.replace('head.fc.', 'head.')
        out[k] = v
    return out


@pytest.fixture
def trained():
    model = randomize(small(), seed=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def check(model, x, y):
    with torch.no_grad():
        assert torch.allclose(model(x), y, atol=1e-6)


@pytest.mark.parametrize('ext', ['.pth', '.pt', '.bin', '.safetensors'])
@pytest.mark.parametrize('layout', ['reference', 'project'])
def test_layouts_and_formats(tmp_path, trained, ext, layout):
    model, x, y = trained
    sd = model.state_dict()
    if layout == 'reference':
        sd = to_reference_layout(sd)
        assert 'blocks.0.0.rnn_tokens.rnn_v.weight_ih_l0' in sd and 'blocks.0.1.down.weight' in sd
        assert 'head.weight' in sd
    path = str(tmp_path / f'w{ext}')
    if ext == '.safetensors':
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    check(load_checkpoint(small(), path), x, y)


def test_timm_layout_from_timm_model(tmp_path):
    ref = randomize(timm.create_model('sequencer2d_s'), seed=5).eval()
    path = str(tmp_path / 'timm.safetensors')
    save_file(ref.state_dict(), path)
    ours = load_checkpoint(create_model('sequencer2d_s').eval(), path)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


@pytest.mark.parametrize('wrapper', ['state_dict', 'model', 'state_dict_ema'])
def test_training_checkpoints(tmp_path, trained, wrapper):
    model, x, y = trained
    sd = {f'module.{k}': v for k, v in to_reference_layout(model.state_dict()).items()}
    torch.save({wrapper: sd, 'epoch': 3, 'arch': 'sequencer2d_s', 'optimizer': {'state': {}}}, tmp_path / 'ckpt.pth')
    check(load_checkpoint(small(), str(tmp_path / 'ckpt.pth')), x, y)


def test_use_ema_prefers_ema_weights(tmp_path, trained):
    model, x, y = trained
    other = randomize(small(), seed=9).state_dict()
    torch.save({'state_dict': other, 'state_dict_ema': model.state_dict()}, tmp_path / 'c.pth')
    check(load_checkpoint(small(), str(tmp_path / 'c.pth'), use_ema=True), x, y)


def test_url_served_from_the_hub_cache(trained):
    model, x, y = trained
    cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(cache)
    torch.save(model.state_dict(), os.path.join(cache, 'mine.pth'))
    check(load_checkpoint(small(), 'https://example.invalid/releases/mine.pth'), x, y)


def _put_in_hf_cache(repo, filename, tensors):
    root = os.path.join(os.environ['HF_HUB_CACHE'], 'models--' + repo.replace('/', '--'))
    rev = 'a' * 40
    os.makedirs(os.path.join(root, 'snapshots', rev))
    os.makedirs(os.path.join(root, 'refs'))
    with open(os.path.join(root, 'refs', 'main'), 'w') as f:
        f.write(rev)
    save_file(tensors, os.path.join(root, 'snapshots', rev, filename))


def test_hf_hub_id_from_the_cache(trained):
    model, x, y = trained
    _put_in_hf_cache('someone/tiny-seq', 'model.safetensors', model.state_dict())
    check(load_checkpoint(small(), 'hf-hub:someone/tiny-seq'), x, y)


def _online_without_network(monkeypatch):
    """The hub not in offline mode, no proxy, and host names that do not resolve; returns the list of the
    ``local_files_only`` flags of every ``hf_hub_download`` call made."""
    import socket

    import huggingface_hub
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    for var in ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'ALL_PROXY', 'all_proxy'):
        monkeypatch.delenv(var, raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, 'Name or service not known')
    monkeypatch.setattr(socket, 'getaddrinfo', no_dns)
    calls, real = [], huggingface_hub.hf_hub_download

    def recording(*args, **kwargs):
        calls.append(kwargs.get('local_files_only', False))
        return real(*args, **kwargs)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', recording)
    return calls


def test_hf_hub_id_in_the_cache_loads_without_network(monkeypatch, trained):
    model, x, y = trained
    _put_in_hf_cache('someone/tiny-seq', 'model.safetensors', model.state_dict())
    calls = _online_without_network(monkeypatch)
    check(load_checkpoint(small(), 'hf-hub:someone/tiny-seq'), x, y)
    assert calls == [True]   # the cache only, at once


def test_hf_hub_id_without_network_fails_at_once_in_one_line(monkeypatch):
    """Offline and not cached: one line naming the id and the unreachable host, without a download attempt
    (huggingface_hub retries each for tens of seconds)."""
    calls = _online_without_network(monkeypatch)
    with pytest.raises(CheckpointError, match=r'^hf-hub:someone/absent: not in the local Hugging Face cache .* '
                                              r'and huggingface\.co cannot be reached \(\[Errno -2\]') as e:
        load_checkpoint(small(), 'hf-hub:someone/absent')
    assert '\n' not in str(e.value)
    assert calls and all(calls), calls   # the cache only: no download was attempted
    with pytest.raises(CheckpointError, match=r'^hf-hub:bad//id: not a Hugging Face repository id \('):
        load_checkpoint(small(), 'hf-hub:bad//id')


def test_hub_reachability_check_uses_the_endpoint_port(monkeypatch):
    """The check connects to the endpoint's own port (a mirror on http://host:port), and leaves the decision to
    the proxy when one is set."""
    import socket

    from sequencer.models.weights import _hub_unreachable
    for var in ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'ALL_PROXY', 'all_proxy'):
        monkeypatch.delenv(var, raising=False)
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert _hub_unreachable(f'http://127.0.0.1:{port}') is None
    finally:
        server.close()
    why = _hub_unreachable(f'http://127.0.0.1:{port}')
    assert why is not None and why.startswith('127.0.0.1 cannot be reached (')
    monkeypatch.setenv('HTTP_PROXY', 'http://proxy.invalid:3128')
    assert _hub_unreachable(f'http://127.0.0.1:{port}') is None


def test_pretrained_uses_the_reference_release(monkeypatch):
    ref = randomize(create_model('sequencer2d_s'), seed=11).eval()
    cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(cache)
    torch.save(to_reference_layout(ref.state_dict(), layers=(4, 3, 8, 3)), os.path.join(cache, 'sequencer2d_s.pth'))
    model = create_model('sequencer2d_s', pretrained=True).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-6)
    tuned = create_model('sequencer2d_s', pretrained=True, num_classes=10)
    assert tuned.get_classifier().out_features == 10
    assert torch.equal(tuned.stem.proj.weight, ref.stem.proj.weight)
    assert torch.count_nonzero(tuned.get_classifier().weight) == 0  # a fresh head


def test_pretrained_weights_adapt_to_other_input_channels(tmp_path):
    ref = randomize(create_model('sequencer2d_s'), seed=13).eval()
    cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(cache)
    torch.save(to_reference_layout(ref.state_dict(), layers=(4, 3, 8, 3)), os.path.join(cache, 'sequencer2d_s.pth'))
    gray = create_model('sequencer2d_s', pretrained=True, in_chans=1).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():  # one channel: the RGB filters summed, so a gray image gives the RGB model's output
        assert torch.allclose(gray(x), ref(x.expand(1, 3, 64, 64)), atol=1e-5)
    four = create_model('sequencer2d_s', pretrained=True, in_chans=4)
    assert four.stem.proj.weight.shape[1] == 4  # more channels: repeated, rescaled by 3/4
    assert torch.allclose(four.stem.proj.weight[:, :3] * 4 / 3, ref.stem.proj.weight, atol=1e-6)
    assert torch.allclose(four.stem.proj.weight[:, 3] * 4 / 3, ref.stem.proj.weight[:, 0], atol=1e-6)
    # fine-tuning from a file (--pretrained-path) adapts too; restoring a checkpoint does not
    torch.save(ref.state_dict(), tmp_path / 'rgb.pth')
    tuned = load_checkpoint(create_model('sequencer2d_s', in_chans=1, num_classes=5), str(tmp_path / 'rgb.pth'),
                            reset_head=True, adapt_in_chans=True)
    assert torch.allclose(tuned.stem.proj.weight[:, 0], ref.stem.proj.weight.sum(1))
    with pytest.raises(CheckpointError, match=r'wrong shape: stem\.proj\.weight \(192, 3, 7, 7\) vs \(192, 1, 7, 7\)'):
        load_checkpoint(create_model('sequencer2d_s', in_chans=1), str(tmp_path / 'rgb.pth'))


def test_pretrained_falls_back_to_timm_hub_copy(monkeypatch):
    ref = randomize(timm.create_model('sequencer2d_m'), seed=12).eval()
    _put_in_hf_cache('timm/sequencer2d_m.in1k', 'model.safetensors', ref.state_dict())

    def no_network(*args, **kwargs):
        raise OSError('network unreachable')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    model = create_model('sequencer2d_m', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_pretrained_unavailable_names_every_source(monkeypatch):
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda *a, **k: (_ for _ in ()).throw(OSError('offline')))
    with pytest.raises(CheckpointError,
                       match=r'sequencer2d_s: published weights unavailable: .*sequencer2d_s.pth.*hf-hub'):
        create_model('sequencer2d_s', pretrained=True)
    with pytest.raises(CheckpointError, match='gru_sequencer2d_s: no published weights'):
        create_model('gru_sequencer2d_s', pretrained=True)


def test_mismatch_lists_keys_and_names_the_model(tmp_path, trained):
    model, _, _ = trained
    torch.save(model.state_dict(), tmp_path / 'small.pth')
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(create_model('sequencer2d_s_add', layers=LAYERS), str(tmp_path / 'small.pth'))
    msg = str(e.value)
    assert 'does not fit sequencer2d_s_add' in msg and 'wrong shape' in msg and 'rnn_tokens.fc.weight' in msg
    assert '\n' not in msg
    with pytest.raises(CheckpointError, match=r'missing: stages\.1\.blocks\.1'):
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith('stages.1.blocks.1.')}
        torch.save(sd, tmp_path / 'partial.pth')
        load_checkpoint(small(), str(tmp_path / 'partial.pth'))
    # non-strict loading tolerates missing keys
    missing_ok = load_checkpoint(small(), str(tmp_path / 'partial.pth'), strict=False)
    assert torch.equal(missing_ok.stem.proj.weight, model.stem.proj.weight)


def test_corrupt_truncated_and_missing_files(tmp_path, trained):
    model, _, _ = trained
    good = tmp_path / 'good.pth'
    torch.save(model.state_dict(), good)
    data = good.read_bytes()
    (tmp_path / 'trunc.pth').write_bytes(data[: len(data) // 2])
    (tmp_path / 'empty.safetensors').write_bytes(b'')
    for name in ('trunc.pth', 'empty.safetensors'):
        with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / name)) + ': not a readable checkpoint'):
            load_checkpoint(small(), str(tmp_path / name))
    with pytest.raises(CheckpointError, match='no such checkpoint file'):
        load_checkpoint(small(), str(tmp_path / 'nope.pth'))
    # bytes flipped inside a stored tensor: torch.load would read them; the archive's checksum catches them
    with zipfile.ZipFile(good) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.orig_filename.encode()) + len(info.extra)
    damaged = bytearray(data)
    damaged[start + 64:start + 96] = bytes(255 - b for b in damaged[start + 64:start + 96])
    (tmp_path / 'flipped.pth').write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / 'flipped.pth')) + r': .*checksum of \S+ does'):
        load_checkpoint(small(), str(tmp_path / 'flipped.pth'))


class Exploit:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_pickles_that_execute_code_are_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': Exploit()}, f)
    with pytest.raises(CheckpointError, match='execute code'):
        load_checkpoint(small(), str(path))


def test_files_that_are_not_checkpoints_or_hold_no_weights_are_named(tmp_path, capsys):
    from PIL import Image

    from sequencer.cli import main
    torch.save({'epoch': 3}, tmp_path / 'epoch.pth')
    save_file({}, str(tmp_path / 'none.safetensors'))
    (tmp_path / 'notes.pth').write_text('hello\n')
    Image.new('RGB', (8, 8)).save(tmp_path / 'photo.pth', format='JPEG')
    not_checkpoint = ': not a readable checkpoint (not a PyTorch (torch.save) or safetensors file)'
    for name, message in [('epoch.pth', ': holds no weights (no tensors; keys: epoch)'),
                          ('none.safetensors', ': holds no weights'),
                          ('notes.pth', not_checkpoint), ('photo.pth', not_checkpoint)]:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(small(), str(tmp_path / name))
        assert str(e.value).startswith(str(tmp_path / name) + message) and '\n' not in str(e.value), str(e.value)
    Image.new('RGB', (8, 8)).save(tmp_path / 'x.jpg')
    argv = ['predict', '--model', 'sequencer2d_s', '--checkpoint', str(tmp_path / 'photo.pth'), str(tmp_path / 'x.jpg')]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sequencer predict: error: {tmp_path / 'photo.pth'}{not_checkpoint}", err


def test_position_embedding_is_resampled_on_load(tmp_path):
    src = create_model('v_sequencer_s_pe', layers=(1, 1, 1, 1), img_size=224)
    torch.save(src.state_dict(), tmp_path / 'pe.pth')
    dst = load_checkpoint(create_model('v_sequencer_s_pe', layers=(1, 1, 1, 1), img_size=392), str(tmp_path / 'pe.pth'))
    assert dst.absolute_pos_embed.shape == (1, 28, 28, 384)


def test_sha256_is_checked_when_given(tmp_path, trained):
    import hashlib
    model, x, y = trained
    path = tmp_path / 'w.pth'
    torch.save(model.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    check(load_checkpoint(small(), str(path), sha256=digest[:10]), x, y)
    with pytest.raises(CheckpointError, match='does not match the expected'):
        load_checkpoint(small(), str(path), sha256='0' * 10)
