"""fxwormhole.export / fxwormhole.export.load: .pt2 and ONNX artifacts equal eager outputs at batch
sizes other than the example's, the fixed point survives as a while_loop / ONNX Loop, and a loaded
artifact refuses every attempt to train it."""
import sys

import pytest
import torch

import fxwormhole
from fxwormhole import WormholeConfig, zoo
from fxwormhole.errors import ConfigError, ExportError

OPEN = WormholeConfig(gate_init=0.0, proj_init="normal", proj_std=0.3, tol=1e-6, max_iter=60)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = zoo.MLP(hidden=12)
    return fxwormhole.transform(model, model.example_inputs(4), OPEN)


@pytest.fixture(scope="module")
def pt2(net, tmp_path_factory):
    return fxwormhole.export(net, (torch.randn(4, 8),), tmp_path_factory.mktemp("pt2") / "net.pt2")


def _eager(net, x):
    mode = net.training
    net.eval()
    try:
        with torch.no_grad():
            return net(x)
    finally:
        net.train(mode)


def test_pt2_round_trip_at_other_batch_sizes(net, pt2):
    assert net.training, "export must leave the model's mode as it found it"
    assert not net.fixed_point_0._cstats, "export must not leave tracer stats on the fixed point"
    runner = fxwormhole.export.load(pt2)
    for batch in (3, 11):
        x = torch.randn(batch, 8)
        with torch.no_grad():
            got = runner(x)
        torch.testing.assert_close(got, _eager(net, x), atol=1e-5, rtol=1e-5)
    assert max(int(s.iterations.max()) for s in net.fixed_point_stats().values()) > 3
    ep = torch.export.load(str(pt2))
    hops = {n.target.name() for n in ep.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)}
    assert "while_loop" in hops
    assert runner.meta["inference_only"] is True


def test_loaded_artifact_refuses_training(pt2):
    runner = fxwormhole.export.load(pt2)
    x = torch.randn(5, 8)
    assert runner.eval() is runner
    with pytest.raises(ExportError, match="inference-only.*TransformedModule"):
        runner.train()
    with pytest.raises(ExportError, match="inference-only"):
        runner(x).sum().backward()
    with pytest.raises(ExportError, match="input requires grad"):
        runner(x.clone().requires_grad_())
    p = next(runner.parameters())
    p.requires_grad_(True)
    with pytest.raises(ExportError, match="require grad"):
        runner(x)
    p.requires_grad_(False)
    with torch.inference_mode():
        assert runner(x).shape == (5, 4)


def test_onnx_has_a_loop_and_matches_eager(net, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = fxwormhole.export(net, (torch.randn(4, 8),), tmp_path / "net.onnx", format="onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Loop" in ops, ops
    runner = fxwormhole.export.load(path)
    for batch in (2, 9):
        x = torch.randn(batch, 8)
        with torch.no_grad():
            torch.testing.assert_close(runner(x), _eager(net, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ExportError, match="inference-only"):
        runner.train()


def test_missing_onnx_extra_names_the_install_command(net, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ExportError, match=r"pip install fxwormhole\[onnx\]"):
        fxwormhole.export(net, (torch.randn(4, 8),), tmp_path / "net.onnx", format="onnx")


def test_bad_arguments(net, tmp_path):
    with pytest.raises(ConfigError, match="format='tflite'"):
        fxwormhole.export(net, (torch.randn(4, 8),), tmp_path / "x", format="tflite")
    with pytest.raises(ExportError, match="no such file"):
        fxwormhole.export.load(tmp_path / "missing.pt2")
    bad = tmp_path / "corrupt.pt2"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ExportError, match="not a readable torch.export archive"):
        fxwormhole.export.load(bad)


def test_export_failure_is_wrapped_with_the_line(tmp_path):
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow: torch.export cannot trace it
                return x * 2
            return x

    with pytest.raises(ExportError, match=r"torch.export failed at test_export.py:\d+ in forward"):
        fxwormhole.export(Branchy(), (torch.randn(3, 2),), tmp_path / "b.pt2")


def test_pipeline_example_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "compile_and_export.py"
    spec = importlib.util.spec_from_file_location("compile_and_export", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch._dynamo.reset()
    code = example.main(["--backend", "aot_eager", "--formats", "pt2", "--out", str(tmp_path), "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all checks passed" in out and (tmp_path / "mlp_wormhole.pt2").is_file()
