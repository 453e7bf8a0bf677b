"""The command line as a person meets it: fast help with examples, the zoo listing, progress that
stays off pipes, --open round trips, what rewrite says about shapes and probes, compile --eval/--mode,
third-party noise filtered."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
import warnings

import pytest
import torch

import fxwormhole
from fxwormhole import zoo
from fxwormhole.cli import COMMANDS, SUMMARIES, build_parser, command_name, main
from fxwormhole.cli._progress import Progress
from fxwormhole.cli._quiet import quiet_third_party
from fxwormhole.cli.specs import parse_input_spec
from fxwormhole.cli.zoo_cmd import zoo_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- help -----------------------------------------------------------------------------------------
_HELP_IMPORTS = """
import sys
from fxwormhole.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["rewrite", "--help"], ["compile", "--help"],
                                  ["export", "--help"], ["zoo", "--help"], ["demo", "--help"]])
def test_help_imports_no_torch(argv):
    """What keeps --help fast (docs/cli.md has the measured time): neither the package nor the parser
    of these commands imports torch."""
    done = subprocess.run([sys.executable, "-c", _HELP_IMPORTS.format(argv=argv)], capture_output=True, text=True,
                          timeout=60)
    assert "usage: fxwormhole" in done.stdout and "examples:" in done.stdout
    assert done.stderr.strip().endswith("NO-TORCH"), done.stderr


def test_every_command_has_a_summary_and_examples(capsys):
    parser = build_parser()  # every command registered in full
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert helps == {command_name(m): SUMMARIES[command_name(m)] for m in COMMANDS}
    for module in COMMANDS:
        name = command_name(module)
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        assert "example" in out and f"fxwormhole {name}" in out.split("example")[-1], name


def test_export_formats_match_the_library():
    from fxwormhole.cli.export_cmd import FORMATS
    from fxwormhole.cli.inspect_cmd import FRONT_ENDS
    from fxwormhole.capture import FRONT_ENDS as CAPTURE_FRONT_ENDS
    from fxwormhole.export import FORMATS as EXPORT_FORMATS

    assert FORMATS == EXPORT_FORMATS and FRONT_ENDS == CAPTURE_FRONT_ENDS


# --- zoo ------------------------------------------------------------------------------------------
def test_zoo_lists_every_model_with_inputs_that_it_accepts(capsys):
    code, out, _ = _run(capsys, "zoo")
    assert code == 0
    rows = zoo_rows()
    assert [r[0] for r in rows] == [f"fxwormhole.zoo:{n}" for n in zoo.ZOO]
    for spec, inputs, kwargs, _ in rows:
        assert spec in out and inputs in out
        name = spec.split(":")[1]
        model = zoo.build(name)
        args = [parse_input_spec(s) for s in inputs.replace("--input ", "").split()]
        if name != "DataDependentBreak":  # runs eagerly; it only defeats capture
            model(*args)
        assert all(f"{k}=" in kwargs for k in ("hidden",)) or name in ("CNN", "ResidualBlock", "TransformerStack")
    assert "in_features=8, hidden=16, out_features=4, depth=3, activation='tanh'" in out
    code, out, _ = _run(capsys, "zoo", "CNN")
    assert code == 0 and "fxwormhole inspect fxwormhole.zoo:CNN --input 4x1x12x12" in out and "conv -> ReLU" in out
    code, _, err = _run(capsys, "zoo", "Nope")
    assert code == 2 and "is not a bundled model: expected one of MLP, CNN" in err


# --- progress -------------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_long_steps_on_a_terminal_and_erases_itself():
    tty = _Tty()
    with Progress(stream=tty, delay=0.05, interval=0.02).step("transforming"):
        time.sleep(0.3)
    text = tty.getvalue()
    assert "transforming ... 0 s" in text and text.endswith("\r\033[K")
    quick = _Tty()
    with Progress(stream=quick, delay=5.0).step("short"):
        pass
    assert quick.getvalue() == ""  # a short step shows nothing
    for quiet_stream, quiet in ((io.StringIO(), False), (_Tty(), True)):  # a pipe, or --quiet
        with Progress(quiet, stream=quiet_stream, delay=0.0, interval=0.01).step("x"):
            time.sleep(0.05)
        assert quiet_stream.getvalue() == ""


def test_quiet_third_party_keeps_fxwormhole_warnings():
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with quiet_third_party():
                log.warning("torchvision is not installed. Skipping torchvision::nms")
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning)
                warnings.warn("fixed_point_0: 3 samples did not converge", RuntimeWarning)
            log.warning("after the command")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue() == "after the command\n"
    assert [str(w.message) for w in seen] == ["fixed_point_0: 3 samples did not converge"]


# --- rewrite --------------------------------------------------------------------------------------
def test_rewrite_open_prints_bridging_and_probes_and_iterates(capsys, tmp_path):
    path = tmp_path / "cnn.pt"
    code, out, _ = _run(capsys, "rewrite", "fxwormhole.zoo:CNN", "--input", "2x1x12x12", "--open", "--sal",
                        "--out", str(path))
    assert code == 0, out
    assert "bridge: [B,32] -> Linear 32->1 -> broadcast onto [B,1,12,12]" in out
    assert "gate:   one gate, open 0.5000" in out
    assert "probes:     4 sensitivity probes (SAL on, eta=0.001, target=1)" in out
    net = torch.load(path, weights_only=False).eval()
    original = zoo.CNN()
    original.load_state_dict(net.state_dict(), strict=False)
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        y = net(x)
        assert (y - original(x)).abs().max() > 1e-4  # open: not the original function any more
    stats = net.fixed_point_stats()["fixed_point_0"]
    assert stats.iterations.float().mean() > 1.5 and bool((stats.status == 0).all())  # iterates, converges


def test_rewrite_explicit_options_override_open_and_spectral_norm_is_refused(capsys, tmp_path):
    code, out, _ = _run(capsys, "rewrite", "fxwormhole.zoo:MLP", "--input", "4x8", "--open", "--gate-init", "-6",
                        "--out", str(tmp_path / "m.pt"))
    assert code == 0 and "gate:   one gate, open 0.0025" in out and "probes:     none (add --sal" in out
    code, _, err = _run(capsys, "rewrite", "fxwormhole.zoo:MLP", "--input", "4x8", "--spectral-norm",
                        "--out", str(tmp_path / "s.pt"))
    assert code == 2 and err.count("\n") == 1 and "torch.save cannot write a spectrally normalised projection" in err
    assert not (tmp_path / "s.pt").exists()


# --- compile --------------------------------------------------------------------------------------
def test_compile_eval_compiles_a_sal_model_for_inference(capsys, tmp_path):
    path = tmp_path / "mlp.pt"
    assert main(["rewrite", "fxwormhole.zoo:MLP", "--input", "4x8", "--open", "--sal", "--out", str(path)]) == 0
    capsys.readouterr()
    code, out, _ = _run(capsys, "compile", str(path), "--input", "5x8", "--backend", "aot_eager", "--eval")
    assert code == 0, out
    assert "(dynamic batch, eval)" in out and "first forward " in out and "max|grad" not in out and "-> OK" in out
    code, _, err = _run(capsys, "compile", str(path), "--input", "5x8", "--backend", "aot_eager", "--mode", "max-autotune")
    assert code == 2 and "compile modes are Inductor settings" in err


def test_compile_mode_becomes_inductor_options():
    from fxwormhole.cli.compile_cmd import _mode_options

    assert _mode_options(None, "inductor") == {}
    assert _mode_options("max-autotune-no-cudagraphs", "inductor")["options"]["max_autotune"] is True


def test_quiet_third_party_prints_non_convergence_as_one_line():
    from fxwormhole.runtime._warnings import NonConvergenceWarning

    standard = warnings.formatwarning
    with quiet_third_party():
        own = warnings.formatwarning("fixed point 'fp': 3 more solves did not converge", NonConvergenceWarning,
                                     "/x/cli/__main__.py", 6, "sys.exit(main())")
        other = warnings.formatwarning("something else", RuntimeWarning, "/x/y.py", 3, "z = 1")
    assert own == "fxwormhole: warning: fixed point 'fp': 3 more solves did not converge\n"
    assert other == standard("something else", RuntimeWarning, "/x/y.py", 3, "z = 1")
    assert "y.py:3: RuntimeWarning: something else" in other
    assert warnings.formatwarning is standard
