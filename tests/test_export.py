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


# ------------------------------------------------------------------------------------------------
# issue 16 class 6: a batch-1 example, where an error points, colour codes


class _PerSample(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(3, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.head(torch.tanh(self.fc3(torch.tanh(self.fc2(h)))))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_batch_of_one_exports_with_a_dynamic_batch(fmt, tmp_path):
    """torch.export specialises size-1 dims; a one-sample example still gives a dynamic batch."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x1 = torch.randn(1, 3)
    net = fxwormhole.transform(_PerSample(), (x1,), OPEN).eval()
    runner = fxwormhole.export.load(fxwormhole.export(net, (x1,), tmp_path / f"one.{fmt}", format=fmt))
    for batch in (1, 4):
        x = torch.randn(batch, 3)
        with torch.no_grad():
            torch.testing.assert_close(runner(x), net(x), atol=1e-5, rtol=1e-5)


def test_a_batch_of_one_whose_program_differs_is_refused(tmp_path):
    """The program traced at batch 2 is checked against the model at the example's batch of 1."""
    class ExportsDifferently(torch.nn.Module):
        def forward(self, x):
            return x * 2 if torch.compiler.is_exporting() else x

    with pytest.raises(ExportError, match="differs from the model at batch 1"):
        fxwormhole.export(ExportsDifferently(), (torch.randn(1, 3) + 2,), tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


def test_an_export_error_points_at_the_models_line_not_at_fxwormhole():
    from fxwormhole.export import _where

    loop = str(__import__("fxwormhole.runtime._loop", fromlist=["x"]).__file__)
    text = ("Could not guard\n"
            '  File "/home/u/model.py", line 12, in forward\n    y = x.view(-1)\n'
            f'  File "{loop}", line 99, in solve\n    z = torch.where(step_on.view(-1, 1), a, b)\n')
    assert _where(RuntimeError(text)) == " at model.py:12 in forward (y = x.view(-1))"
    only_ours = f'  File "{loop}", line 99, in solve\n    z = torch.where(step_on.view(-1, 1), a, b)\n'
    assert _where(RuntimeError("aliasing inputs; see torch.ops.aten.to.dtype\n" + only_ours)) == ""
    executing = ("boom\nWhile executing %to_3 : [num_users=1] = call_function[target=torch.ops.aten.to.dtype]"
                 "(args = (%x,), kwargs = {})")
    assert _where(RuntimeError(executing)) == " at node to_3 (torch.ops.aten.to.dtype)"


def test_export_messages_carry_no_terminal_colour_codes():
    from fxwormhole.export import _one_line

    assert _one_line(RuntimeError("Failed to decompose. \x1b[96mThis is step 2/3\x1b[0m of exporting")) == (
        "RuntimeError: Failed to decompose. This is step 2/3 of exporting")


def test_a_dynamo_message_says_what_broke_on_its_first_line():
    from fxwormhole.export import _export_hint, _one_line

    exc = RuntimeError("This higher order operator doesn't work unless it is captured completely with torch.compile. "
                       "Got graph break/error:\n\nEncountered aliasing during higher order op tracing\n  Hint: ...")
    assert _one_line(exc).endswith("Got graph break/error: Encountered aliasing during higher order op tracing")
    assert "views of one tensor" in _export_hint(exc, True) and "dynamic_batch" not in _export_hint(exc, True)
