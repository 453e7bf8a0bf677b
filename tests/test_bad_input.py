"""Bad-input catalogue (issue 9): every mistake a user can make at the API or the CLI ends in a typed
:class:`~fxwormhole.errors.FxWormholeError` whose message says what to do, and leaves the user's
model exactly as it was (parameters, buffers, training flags).

API cases: ``(id, model factory or None, call, error type, phrase)``; the phrase is a piece of the
"what to do" part of the message. CLI cases: ``fxwormhole.cli.main(argv)`` in-process must return 2
and print exactly one line, ``fxwormhole: error: ...``, on stderr. The table in
docs/reliability.md lists the same cases.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import fxwormhole as fw
from fxwormhole import zoo
from fxwormhole.cli import main as cli_main
from fxwormhole.errors import CaptureError, ConfigError, ExportError, FxWormholeError, PlacementError
from helpers import assert_unchanged as _assert_unchanged, snapshot as _snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(3, 4)


# ---------------------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def shallow() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def bn_mlp() -> nn.Module:
    """Has buffers (running stats) that a careless capture in training mode would update."""
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


class SeqThenMap(nn.Module):
    """A sequence layer feeding a convolution: a wormhole map -> sequence cannot be bridged."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Linear(32, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(self.c(h.reshape(h.shape[0], 1, 4, 4)).flatten(1))


class Activations(nn.Module):
    def forward(self, x):
        return torch.relu(torch.tanh(x))


class ProjLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, proj_size=2, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class RNNHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


SEQ = torch.randn(2, 5, 4)


def _cfg(**kw) -> fw.WormholeConfig:
    return fw.WormholeConfig(**kw)


def _t(model, inputs=(X,), config=None, **kw):
    return fw.transform(model, inputs, config, **kw)


def _closure_fixed_point(_):
    w = torch.randn(3, requires_grad=True)
    return fw.fixed_point(lambda z, a: torch.tanh(z * w + a), torch.zeros(2, 3), torch.randn(2, 3))


def _prepare_without_inputs(_):
    from fxwormhole.runtime.fixed_point import FixedPoint

    return FixedPoint(nn.Tanh(), name="node").prepare()


# (id, model factory or None, call(model), error, phrase from the "what to do" part)
API_CASES: list[tuple[str, Callable[[], nn.Module] | None, Callable[[Any], Any], type, str]] = [
    # the model and its example inputs
    ("model is not a module", None, lambda m: fw.transform(lambda x: x, (X,)), ConfigError, "must be a torch.nn.Module"),
    ("example_inputs is None", mlp, lambda m: _t(m, None), ConfigError, "pass e.g. (torch.randn"),
    ("example_inputs is a dict", mlp, lambda m: _t(m, {"x": X}), ConfigError, "pass e.g. (torch.randn"),
    ("no example inputs", mlp, lambda m: _t(m, ()), CaptureError, "one tensor per positional argument"),
    ("too many example inputs", mlp, lambda m: _t(m, (X, X)), CaptureError, "one tensor per positional argument"),
    ("wrong input shape", bn_mlp, lambda m: _t(m, (torch.randn(3, 5),)), CaptureError, "pass example_inputs that model"),
    ("0-d input", mlp, lambda m: _t(m, (torch.tensor(1.0),)), CaptureError, "pass example_inputs that model"),
    ("nested list input", mlp, lambda m: _t(m, ([1, 2, 3],)), CaptureError, "pass example_inputs that model"),
    ("float64 input, float32 model", mlp, lambda m: _t(m, (X.double(),)), FxWormholeError, "check that example_inputs are a valid call"),
    ("integer input at a wormhole destination", mlp, lambda m: _t(m, (torch.randint(0, 3, (3, 4)),)), PlacementError,
     "pick a destination whose input is floating point"),
    ("untraceable model", lambda: zoo.build("DataDependentBreak"), lambda m: _t(m, zoo.example_inputs("DataDependentBreak")),
     CaptureError, "torch.where or torch.cond"),
    ("unknown front end", mlp, lambda m: _t(m, front_end="jit"), ConfigError, "expected one of ('auto'"),
    ("config is a dict", mlp, lambda m: _t(m, config={"wormholes": "auto"}), ConfigError, "must be a WormholeConfig"),
    ("sal is a dict", mlp, lambda m: _t(m, sal={"eta": 0.1}), ConfigError, "must be a SALConfig"),
    # where the wormholes go
    ("unknown layer name", mlp, lambda m: _t(m, config=_cfg(wormholes=[("fc9", "0")])), PlacementError, "known layers and modules"),
    ("reversed span", mlp, lambda m: _t(m, config=_cfg(wormholes=[("0", "2")])), PlacementError, "swap them"),
    ("auto on a one-hidden-layer model", shallow, lambda m: _t(m), PlacementError, "name wormholes explicitly"),
    ("every:K longer than the model", mlp, lambda m: _t(m, config=_cfg(wormholes="every:5")), PlacementError, "use a smaller K"),
    ("unbridgeable shapes (map -> sequence)", SeqThenMap, lambda m: _t(m, (torch.randn(2, 4, 4),), _cfg(wormholes=[("c", "a")])),
     PlacementError, "choose layers whose outputs are vectors or feature maps"),
    ("temporal wormhole pair reversed", RNNHead, lambda m: _t(m, (SEQ,), _cfg(wormholes=[("rnn.layer0", "rnn.layer1")])),
     PlacementError, "swap the pair"),
    ("temporal wormhole to a non-recurrent layer", RNNHead, lambda m: _t(m, (SEQ,), _cfg(wormholes=[("head", "rnn.layer0")])),
     PlacementError, "both ends must name layers"),
    ("compiling a cycle whose BatchNorm trains", bn_mlp,
     lambda m: fw.compile.prepare(_t(m, config=_cfg(wormholes=[("4", "1")], gate_init=0.0, proj_init="normal")).train()),
     FxWormholeError, "call model.eval() before compiling"),
    # solver and gradient names
    ("unknown solver", mlp, lambda m: _t(m, config=_cfg(solver="newton")), ConfigError, "register_solver"),
    ("unknown adjoint solver", mlp, lambda m: _t(m, config=_cfg(grad=fw.GradConfig(solver="cg"))), ConfigError, "register_solver"),
    ("unknown gradient mode", None, lambda m: _cfg(grad="magic"), ConfigError, "expected one of ('implicit'"),
    ("unknown gate kind", None, lambda m: _cfg(gate="sigmoid"), ConfigError, "expected one of ('scalar'"),
    ("solver of the wrong type", None, lambda m: _cfg(solver=3), ConfigError, "or a SolverConfig"),
    ("duplicate solver registration", None, lambda m: fw.register_solver("picard", object), ConfigError, "pass overwrite=True"),
    # SAL and probes
    ("SAL on a model with nothing to probe", Activations, lambda m: fw.instrument(m, (X,), fw.SALConfig()), PlacementError,
     "wrap it in a module"),
    ("SAL on a bare layer", lambda: nn.Linear(4, 4), lambda m: fw.instrument(m, (X,), fw.SALConfig()), PlacementError,
     "wrap it in a module"),
    ("SAL on an LSTM with proj_size", ProjLSTM, lambda m: fw.instrument(m, (SEQ,), fw.SALConfig()), PlacementError,
     "exclude the layer"),
    ("sensitivity report without probes", mlp, lambda m: fw.sensitivity_report(m), ConfigError, "build it with fxwormhole.instrument"),
    ("SAL.configure with an unknown field", None, lambda m: fw.SAL(fw.instrument(mlp(), (X,))).configure(speed=2), ConfigError,
     "expected some of"),
    # functional API and runtime
    ("fixed_point closes over a trainable tensor", None, _closure_fixed_point, ConfigError, "pass it through *args"),
    ("fixed_point with an unknown option", None, lambda m: fw.fixed_point(torch.tanh, torch.zeros(2, 3), beta=2), ConfigError,
     "expected SolverConfig fields"),
    ("prepare() with nothing to prepare from", None, _prepare_without_inputs, FxWormholeError, "run one eager forward"),
]

# invalid values of every config dataclass: (id, constructor, field, phrase)
INVALID_VALUES = [
    ("gate_init=nan", lambda: _cfg(gate_init=math.nan), "expected a finite float"),
    ("proj_init='xavier'", lambda: _cfg(proj_init="xavier"), "expected 'zero' or 'normal'"),
    ("proj_std=0", lambda: _cfg(proj_std=0), "expected a finite float > 0"),
    ("tol=-1", lambda: _cfg(tol=-1.0), "expected a finite float > 0"),
    ("max_iter=0", lambda: _cfg(max_iter=0), "expected an int >= 1"),
    ("on_fail='explode'", lambda: _cfg(on_fail="explode"), "expected one of ('warn'"),
    ("gate_cap=2", lambda: _cfg(gate_cap=2.0), "a float in (0, 1]"),
    ("wormholes='every:0'", lambda: _cfg(wormholes="every:0"), "'every:K' (K >= 1)"),
    ("wormholes=[]", lambda: _cfg(wormholes=[]), "non-empty list of (src, dst) name pairs"),
    ("wormholes=[('a',)]", lambda: _cfg(wormholes=[("a",)]), "non-empty list of (src, dst) name pairs"),
    ("SolverConfig damping=1.5", lambda: fw.SolverConfig(damping=1.5), "a float in (0, 1]"),
    ("SolverConfig halting='token'", lambda: fw.SolverConfig(halting="token"), "one of ('sample', 'batch')"),
    ("SolverConfig memory=0", lambda: fw.SolverConfig(memory=0), "an int >= 1"),
    ("GradConfig k=0", lambda: fw.GradConfig(mode="phantom", k=0), "an int >= 1"),
    ("GradConfig tau=0", lambda: fw.GradConfig(tau=0.0), "a float in (0, 1]"),
    ("SALConfig eta=-1", lambda: fw.SALConfig(eta=-1.0), "a finite float >= 0"),
    ("SALConfig beta=1", lambda: fw.SALConfig(beta=1.0), "a float in [0, 1)"),
    ("SALConfig target=0", lambda: fw.SALConfig(target=0.0), "a finite float > 0"),
]


# --------------------------------------------------------------------------------------- helpers

def _check_message(exc: BaseException, phrase: str) -> None:
    text = str(exc)
    assert phrase in text, f"message lacks {phrase!r}: {text}"


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_api_bad_input_raises_typed_error_and_leaves_the_model_alone(case, training):
    _, factory, call, error, phrase = case
    if factory is None and not training:
        pytest.skip("no model involved: one run is enough")
    model = factory() if factory is not None else None
    snap = None
    if model is not None:
        model.train(training)
        snap = _snapshot(model)
    with pytest.raises(FxWormholeError) as info:
        call(model)
    assert isinstance(info.value, error), f"expected {error.__name__}, got {type(info.value).__name__}: {info.value}"
    _check_message(info.value, phrase)
    if model is not None:
        _assert_unchanged(model, snap)


@pytest.mark.parametrize("case", INVALID_VALUES, ids=[c[0] for c in INVALID_VALUES])
def test_invalid_config_values_name_the_field_and_the_allowed_values(case):
    name, build, phrase = case
    with pytest.raises(ConfigError) as info:
        build()
    field = re.split(r"[=\s]", name.split()[-1])[0]
    assert f".{field}=" in str(info.value), f"message does not name the field {field!r}: {info.value}"
    _check_message(info.value, phrase)


# ----------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small transformed model exported to pt2 and loaded back (inference only)."""
    export = importlib.import_module("fxwormhole.export")
    torch.manual_seed(0)
    net = fw.transform(mlp().eval(), (X,), _cfg(wormholes=[("2", "0")]))
    path = tmp_path_factory.mktemp("export") / "net.pt2"
    export.export(net, (X,), path)
    return export, export.load(path)


def test_exported_artifact_refuses_training(exported):
    _, runner = exported
    with torch.no_grad():
        assert runner(X).shape == (3, 2)
    with pytest.raises(ExportError, match="train the TransformedModule instead"):
        runner.train()
    with pytest.raises(ExportError, match="inference-only"):
        runner(X.clone().requires_grad_(True))
    out = runner(X)
    with pytest.raises(ExportError, match="train the TransformedModule instead"):
        out.sum().backward()


def test_exported_artifact_files_missing_or_corrupt(exported, tmp_path):
    export, _ = exported
    with pytest.raises(ExportError, match=r"write it with fxwormhole.export"):
        export.load(tmp_path / "missing.pt2")
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"not a zip archive")
    with pytest.raises(ExportError, match="re-export"):
        export.load(corrupt)


# -------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    (d / "models.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, width=4):\n"
        "        super().__init__()\n"
        "        self.a, self.b, self.c = nn.Linear(3, width), nn.Linear(width, width), nn.Linear(width, 2)\n"
        "    def forward(self, x):\n"
        "        return self.c(self.b(self.a(x).tanh()).tanh())\n"
        "def not_a_module():\n"
        "    return 3\n"
        "VALUE = 3\n")
    (d / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    (d / "corrupt.pt").write_bytes(b"garbage, not a pickle")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["rewrite", f"{d / 'models.py'}:Net", "-i", "2x3", "-w", "b:a", "--out", str(d / "saved.pt")]) == 0
    return {"dir": d, "net": d / "models.py", "saved": d / "saved.pt"}


def _m(files, name="Net") -> str:
    return f"{files['net']}:{name}"


# (id, argv builder, phrase)
CLI_CASES: list[tuple[str, Callable[[dict], list[str]], str]] = [
    ("no command", lambda f: [], "required: COMMAND"),
    ("unknown command", lambda f: ["frobnicate"], "choose from"),
    ("model file missing", lambda f: ["inspect", f"{f['dir']}/nope.py:Net", "-i", "2x3"], "does not exist"),
    ("module not importable", lambda f: ["inspect", "no.such.module:Net", "-i", "2x3"], "expected 'path/to/file.py:Name'"),
    ("name not in module", lambda f: ["inspect", "fxwormhole.zoo:Nope", "-i", "2x3"], "nn.Module classes there"),
    ("name is not callable", lambda f: ["inspect", _m(f, "VALUE"), "-i", "2x3"], "not a class or factory"),
    ("factory returns no module", lambda f: ["inspect", _m(f, "not_a_module"), "-i", "2x3"], "not an nn.Module"),
    ("model file fails to import", lambda f: ["inspect", f"{f['dir']}/broken.py:Net", "-i", "2x3"], "boom at import"),
    ("malformed --input", lambda f: ["inspect", _m(f), "-i", "2by3"], "expected '[DTYPE:]DIMS[:HIGH]'"),
    ("zero-size --input", lambda f: ["inspect", _m(f), "-i", "0x3"], "every dimension must be >= 1"),
    ("--input missing", lambda f: ["inspect", _m(f)], "required: --input"),
    ("--kwargs not JSON", lambda f: ["inspect", _m(f), "-i", "2x3", "--kwargs", "{width: 4}"], "expected an object such as"),
    ("--kwargs not an object", lambda f: ["inspect", _m(f), "-i", "2x3", "--kwargs", "[4]"], "expected an object such as"),
    ("--kwargs the class does not take", lambda f: ["inspect", _m(f), "-i", "2x3", "--kwargs", '{"depth": 4}'],
     "unexpected keyword argument 'depth'"),
    ("input shape does not fit", lambda f: ["inspect", _m(f), "-i", "2x5"], "pass example_inputs that model"),
    ("untraceable model", lambda f: ["inspect", "fxwormhole.zoo:DataDependentBreak", "-i", "2x5x8"], "torch.where or torch.cond"),
    ("unknown --front-end", lambda f: ["inspect", _m(f), "-i", "2x3", "--front-end", "jit"], "choose from"),
    ("malformed --wormhole", lambda f: ["rewrite", _m(f), "-i", "2x3", "-w", "b", "--out", f"{f['dir']}/o.pt"],
     "expected SRC:DST"),
    ("unknown layer in --wormhole", lambda f: ["rewrite", _m(f), "-i", "2x3", "-w", "zz:a", "--out", f"{f['dir']}/o.pt"],
     "known layers and modules"),
    ("reversed --wormhole", lambda f: ["rewrite", _m(f), "-i", "2x3", "-w", "a:b", "--out", f"{f['dir']}/o.pt"], "swap them"),
    ("--wormhole with --every", lambda f: ["rewrite", _m(f), "-i", "2x3", "-w", "b:a", "--every", "1", "--out",
                                          f"{f['dir']}/o.pt"], "pick explicit pairs or every:K"),
    ("unknown --solver", lambda f: ["rewrite", _m(f), "-i", "2x3", "--solver", "newton", "--out", f"{f['dir']}/o.pt"],
     "register_solver"),
    ("unknown --gate", lambda f: ["rewrite", _m(f), "-i", "2x3", "--gate", "sigmoid", "--out", f"{f['dir']}/o.pt"],
     "choose from"),
    ("negative --tol", lambda f: ["rewrite", _m(f), "-i", "2x3", "--tol", "-1", "--out", f"{f['dir']}/o.pt"],
     "expected a finite float > 0"),
    ("negative --sal-eta", lambda f: ["rewrite", _m(f), "-i", "2x3", "--sal-eta", "-1", "--out", f"{f['dir']}/o.pt"],
     "expected a finite float >= 0"),
    ("--out with a wrong suffix", lambda f: ["rewrite", _m(f), "-i", "2x3", "--out", f"{f['dir']}/o.txt"],
     "expected a .pt or .pth file"),
    # was: the check ran after capturing and drawing, on the temporary file ('.g.tmp-1a2b3c4d.jpg')
    ("--picture with a wrong suffix", lambda f: ["inspect", _m(f), "-i", "2x3", "--picture", f"{f['dir']}/g.jpg"],
     "/g.jpg': expected a file name ending in .png or .svg"),
    ("saved model file missing", lambda f: ["export", f"{f['dir']}/nope.pt", "-i", "2x3", "--out", f"{f['dir']}/o.pt2"],
     "write one with 'fxwormhole rewrite"),
    ("saved model file corrupt (export)", lambda f: ["export", f"{f['dir']}/corrupt.pt", "-i", "2x3", "--out",
                                                    f"{f['dir']}/o.pt2"], "not a model saved by 'fxwormhole rewrite'"),
    ("saved model file corrupt (compile)", lambda f: ["compile", f"{f['dir']}/corrupt.pt", "-i", "2x3"],
     "not a model saved by 'fxwormhole rewrite'"),
    ("unknown export --format", lambda f: ["export", _m(f), "-i", "2x3", "--format", "tflite", "--out", f"{f['dir']}/o.x"],
     "choose from"),
    # issue 13, rows 5 and 6
    ("--every 0", lambda f: ["rewrite", _m(f), "-i", "2x3", "--every", "0", "--out", f"{f['dir']}/o.pt"],
     "argument --every: expected an int >= 1, got 0"),
    ("--input does not fit a saved model (compile)", lambda f: ["compile", str(f["saved"]), "-i", "2x5"],
     "it was transformed with --input 2x3: pass inputs of those shapes"),
    ("--input does not fit a saved model (export)", lambda f: ["export", str(f["saved"]), "-i", "2x5", "--out",
                                                              f"{f['dir']}/o.pt2"], "pass inputs of those shapes"),
    ("--input too large to allocate", lambda f: ["rewrite", _m(f), "-i", "100000x100000x100", "--out", f"{f['dir']}/o.pt"],
     "use a smaller example input"),
    ("demo --out an existing file", lambda f: ["demo", "--quick", "--out", str(f["net"])],
     "is an existing file, not a folder: pass a folder path"),
    ("--out in a folder that does not exist", lambda f: ["rewrite", _m(f), "-i", "2x3", "--out", f"{f['dir']}/no/o.pt"],
     "create it first (mkdir -p"),
    ("--out is a folder", lambda f: ["export", str(f["saved"]), "-i", "2x3", "--out", str(f["dir"])],
     "it is a directory; pass the path of a file"),
]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def _listing(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in directory.rglob("*") if "__pycache__" not in p.parts}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_prints_one_line_and_exits_2(case, files):
    _, argv, phrase = case
    before = _listing(files["dir"])
    code, _, err = run_cli(argv(files))
    assert _listing(files["dir"]) == before, "a failed command wrote or changed a file"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("fxwormhole: error: ")
    assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"
    assert "Traceback" not in err
