"""The pipeline commands: rewrite -> compile / export / bench, and their one-line errors (exit 2)."""
import pytest
import torch

import fxwormhole
from fxwormhole import zoo
from fxwormhole.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "mlp.pt"
    code = main(["rewrite", "fxwormhole.zoo:MLP", "--input", "4x8", "--wormhole", "layers.2:layers.0",
                 "--out", str(path)])
    assert code == 0
    return path


def test_rewrite_reports_and_saves_a_model_equal_to_the_original(saved, capsys, tmp_path):
    path = tmp_path / "m.pt"
    code, out, _ = _run(capsys, "rewrite", "fxwormhole.zoo:MLP", "--input", "4x8", "-w", "layers.2:layers.0",
                        "--gate", "channel", "--out", str(path))
    assert code == 0
    assert "wormhole_0: layers.2" in out and "fixed_point_0" in out and "new parameters: " in out
    net = torch.load(path, weights_only=False)
    assert isinstance(net, fxwormhole.transformed.TransformedModule)
    assert list(net.fixed_point_modules()) == ["fixed_point_0"]
    # closed gate + zero projection: the saved model computes what the original computes
    original = zoo.MLP()
    missing = original.load_state_dict(net.state_dict(), strict=False)
    assert not missing.missing_keys
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), original(x), atol=1e-6, rtol=1e-6)
    added = sum(p.numel() for n, p in net.named_parameters() if "wormhole" in n)
    assert f"new parameters: {added}" in out


def test_compile_command_checks_against_eager(saved, capsys):
    code, out, _ = _run(capsys, "compile", str(saved), "--input", "5x8", "--backend", "aot_eager")
    assert code == 0, out
    assert "compile:" in out and "-> OK" in out


def test_export_command_writes_a_loadable_artifact(saved, capsys, tmp_path):
    out_file = tmp_path / "mlp.pt2"
    code, out, _ = _run(capsys, "export", str(saved), "--input", "4x8", "--format", "pt2", "--out", str(out_file))
    assert code == 0 and "inference-only" in out
    runner = fxwormhole.export.load(out_file)
    net = torch.load(saved, weights_only=False).eval()
    x = torch.randn(7, 8)  # another batch size than the example's
    with torch.no_grad():
        torch.testing.assert_close(runner(x), net(x), atol=1e-5, rtol=1e-5)


def test_bench_prints_a_table(capsys):
    code, out, _ = _run(capsys, "bench", "fxwormhole.zoo:MLP", "--input", "8x8", "--gate-init", "0",
                        "--proj-init", "normal", "--steps", "2", "--warmup", "0", "--no-compile")
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("variant"))
    assert "step ms" in lines[header] and "fp iters" in lines[header]
    rows = lines[header + 2: header + 4]
    assert rows[0].startswith("original (eager)") and rows[0].split()[-2] == "-"
    assert rows[1].startswith("transformed (eager)") and float(rows[1].split()[-2]) >= 1


@pytest.mark.parametrize("command", ["rewrite", "compile", "export", "bench"])
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"fxwormhole {command} " in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["export", "fxwormhole.zoo:MLP", "--input", "4x8", "--format", "tflite", "--out", "x.tflite"], "invalid choice"),
    (["compile", "missing.pt", "--input", "4x8"], "does not exist"),
    (["compile", "{corrupt}", "--input", "4x8"], "not a model saved by 'fxwormhole rewrite'"),
    (["rewrite", "fxwormhole.zoo:MLP", "--input", "4x8", "--wormhole", "layers.2", "--out", "m.pt"], "expected SRC:DST"),
    (["rewrite", "fxwormhole.zoo:MLP", "--input", "4x8", "--wormhole", "nope:layers.0", "--out", "m.pt"], "nope"),
    (["rewrite", "fxwormhole.zoo:MLP", "--input", "4x8", "--out", "m.txt"], "expected a .pt or .pth file"),
    (["rewrite", "fxwormhole.zoo:Nope", "--input", "4x8", "--out", "m.pt"], "no attribute 'Nope'"),
    (["bench", "fxwormhole.zoo:MLP", "--input", "4x8", "--steps", "0"], "need steps >= 1"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00 definitely not a pickle")
    argv = [str(corrupt) if a == "{corrupt}" else a for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxwormhole: error:"), err
    assert message in lines[0]


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def test_errors_nobody_typed_are_one_line_too(capsys, monkeypatch):
    argv = ["inspect", "fxwormhole.zoo:MLP", "--input", "4x8"]
    monkeypatch.setattr("fxwormhole.cli.inspect_cmd.load_model", _raise(ZeroDivisionError("boom")))
    code, _, err = _run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("fxwormhole: error: unexpected ZeroDivisionError: boom") and "FXWORMHOLE_TRACEBACK=1" in err
    monkeypatch.setenv("FXWORMHOLE_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main(argv)
    monkeypatch.delenv("FXWORMHOLE_TRACEBACK")
    monkeypatch.setattr("fxwormhole.cli.inspect_cmd.load_model",
                        _raise(FileNotFoundError(2, "No such file or directory", "weights.bin")))
    code, _, err = _run(capsys, *argv)
    assert code == 2 and err == "fxwormhole: error: No such file or directory: weights.bin; check the path and its permissions\n"


def test_inspect_after_draws_the_rewritten_graph(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    from fxwormhole.cli.inspect_cmd import after_highlights

    code, out, _ = _run(capsys, "inspect", "fxwormhole.zoo:MLP", "--input", "4x8", "--picture",
                        str(tmp_path / "g.png"), "--after")
    assert code == 0
    assert "after transform:" in out and "fixed_point_0" in out
    assert (tmp_path / "g_after.png").stat().st_size > 1000
    model = zoo.MLP()
    marks = after_highlights(fxwormhole.transform(model, model.example_inputs(4)))
    assert marks.get("fixed_point_0") == "fixed_point"
