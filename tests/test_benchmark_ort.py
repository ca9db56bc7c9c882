"""`sequencer benchmark --compare-onnxruntime`: our model exported to ONNX and run by onnxruntime, timed alternately
with ours (inference only), its row and ratio in the results; one-line errors where it cannot run.

Runs on a tiny configuration (one block per stage, 28 px inputs) and never asserts on speed."""
import json
import sys
import tempfile

import pytest

from sequencer.cli import main

pytest.importorskip('onnxruntime')
pytest.importorskip('onnx')

TINY = ['--layers', '1,1,1,1', '--img-size', '28', '--batch-size', '2', '--warmup', '1', '--iters', '2',
        '--num-threads', '2', '-q']


def test_onnxruntime_row_and_ratio(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / 'scratch'
    scratch.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
    out = tmp_path / 'bench.json'
    assert main(['benchmark', *TINY, '--mode', 'infer', '--compare-onnxruntime', '--results-file', str(out)]) == 0
    data = json.loads(out.read_text())
    env = data['environment']
    import onnxruntime
    assert env['onnxruntime'] == onnxruntime.__version__
    check = env['onnxruntime_check']
    assert check['intra_op_threads'] == 2 and check['provider'] == 'CPUExecutionProvider'
    assert 0 <= check['relative_difference'] <= 1e-3
    ours, ort = data['results']
    assert (ours['impl'], ort['impl']) == ('sequencer', 'onnxruntime')
    assert ort['mode'] == 'infer' and ort['threads'] == 2 and ort['compile'] is False
    assert ort['img_per_s'] > 0 and ort['latency_ms_median'] > 0 and ort['peak_mem_mb'] is None
    assert ort['gmacs_per_img'] == ours['gmacs_per_img']   # the same network
    # ours / onnxruntime in its row, from the two rows' own figures; not a comparison with timm
    assert ort['ours_ratio'] == pytest.approx(ours['img_per_s'] / ort['img_per_s'])
    assert ort['ours_ratio_median'] == pytest.approx(ort['latency_ms_median'] / ours['latency_ms_median'])
    assert ours['ratio_vs_timm'] is None and ours['ours_ratio'] is None
    assert ort['onnxruntime'] == ours['onnxruntime'] == onnxruntime.__version__
    printed = capsys.readouterr().out
    assert f"compared with onnxruntime {onnxruntime.__version__}" in printed and 'max |difference| from ours' in printed
    assert 'infer: ours / onnxruntime = ' in printed
    (line,) = [ln for ln in printed.splitlines() if ln.startswith('onnxruntime ')]
    assert line.split()[1] == 'infer' and float(line.split()[2]) > 0
    assert list(scratch.iterdir()) == []   # the exported file is gone


@pytest.mark.parametrize('argv, message', [
    (['--mode', 'train'], '--compare-onnxruntime: inference only; not with --mode train'),
    (['--device', 'cuda'], '--compare-onnxruntime: onnxruntime runs on the CPU here; not with --device cuda'),
    (['--precision', 'bf16'], '--compare-onnxruntime: the ONNX model runs in float32'),
    (['--input-size', '3', '28', '42'], '--compare-onnxruntime: the ONNX export takes square inputs'),
])
def test_refused_in_one_line(argv, message, capsys):
    assert main(['benchmark', *TINY, '--compare-onnxruntime', *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f'sequencer benchmark: error: {err.split("error: ", 1)[1]}']
    assert message in err


@pytest.mark.parametrize('module', ['onnxruntime', 'onnx'])
def test_missing_package_names_the_extra(module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)   # `import module` raises ImportError
    assert main(['benchmark', *TINY, '--mode', 'infer', '--compare-onnxruntime']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("sequencer benchmark: error: --compare-onnxruntime needs the export extra "
                          "(pip install 'sequencer-lstm[export]')") and module in err


def test_output_mismatch_fails_before_timing(monkeypatch, capsys):
    """An exported model that does not reproduce ours (here its classifier's bias shifted by 1 after our reference
    output was taken) stops the run with one line giving the difference."""
    import torch

    from sequencer.analysis import benchmark
    export = benchmark.export_onnx

    def shifted(model, path, **kwargs):
        with torch.no_grad():
            model.get_classifier().bias.add_(1.0)
        return export(model, path, **kwargs)

    monkeypatch.setattr(benchmark, 'export_onnx', shifted)
    assert main(['benchmark', *TINY, '--mode', 'infer', '--compare-onnxruntime']) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("sequencer benchmark: error: --compare-onnxruntime: onnxruntime's output differs from "
                           "our model's by 1 (max |difference|")
    assert 'above 0.001); nothing timed' in line
