"""``fxwormhole demo``: the quick configuration end to end, its helpers, and its error messages."""
from __future__ import annotations

import builtins
import json
import math
import re
import sys

import pytest
import torch

from fxwormhole import WormholeConfig, transform, zoo
from fxwormhole.cli import main
from fxwormhole.cli.demo import digits_sequences, per_sample_iterations, progress, pyplot, run_demo, DemoConfig
from fxwormhole.errors import ConfigError

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def test_demo_quick_writes_plots_and_a_report_that_links_them(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| LSTM " in printed and "| LSTM + wormholes + SAL |" in printed
    assert "| x LSTM |" in printed and re.search(r"\| LSTM +\|.*\| 1\.00 +\|", printed)  # the ratio column
    pictures = ["curves.png", "iterations.png", "sensitivity.png", "graph.png"]
    for name in pictures + ["report.md", "results.json"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in pictures:  # real PNGs
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert set(re.findall(r"\]\(([^)]+\.png)\)", report)) == set(pictures)
    data = json.loads((out / "results.json").read_text())
    base, wh = data["rows"]
    assert wh["params"] > base["params"]  # the wormhole's gate and projection
    assert wh["cpu_ms_per_step"] > 0 and base["cpu_ms_per_step"] > 0
    for r in (base, wh):
        assert 0.0 <= r["test_acc"] <= 1.0 and math.isfinite(r["test_loss"])
    assert wh["fwd_iterations"] >= 1 and wh["bwd_iterations"] >= 1 and math.isnan(base["fwd_iterations"])
    for curve in data["curves"].values():
        assert all(math.isfinite(v) for v in curve["train_loss"])
    assert torch.get_num_threads() >= 1


def test_per_sample_iterations_are_the_temporal_stats_mean_over_time():
    m = zoo.LSTMClassifier(in_features=3, hidden=6, num_layers=2, seq=5, classes=2)
    x = torch.randn(4, 5, 3)
    net = transform(m, (x,), WormholeConfig(gate="input", gate_init=0.0, proj_init="normal", proj_std=0.5,
                                             solver="picard", tol=1e-6, max_iter=40))
    assert per_sample_iterations(m) == (None, None)  # a plain model has no fixed point
    net(x).sum().backward()
    st = net.fixed_point_stats()["rnn"]
    fwd, bwd = per_sample_iterations(net)
    assert torch.equal(fwd, st.iterations.float().mean(0)) and torch.equal(bwd, st.backward_iterations.float().mean(0))
    assert fwd.shape == (4,) and bool((fwd > 1).all())  # open gates: more than one iteration


def test_digits_sequences_shapes_and_split():
    xtr, ytr, xte, yte = digits_sequences("rows")
    assert xtr.shape[1:] == (8, 8) and len(ytr) + len(yte) == 1797 and len(yte) == 359
    assert float(xtr.min()) >= 0 and float(xtr.max()) <= 1
    px = digits_sequences("pixels")[0]
    assert px.shape[1:] == (64, 1) and torch.equal(px.view(-1, 8, 8), xtr)
    with pytest.raises(ConfigError, match="'rows' or 'pixels'"):
        digits_sequences("columns")


def test_progress_without_tqdm_prints_plain_lines(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert list(progress(range(20), total=20, desc="steps")) == list(range(20))
    err = capsys.readouterr().err
    assert "steps 0/20" in err and "steps 18/20" in err


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ConfigError, match=r"pip install fxwormhole\[plots\]"):
        pyplot()
    with pytest.raises(ConfigError, match=r"pip install fxwormhole\[plots\]"):
        run_demo(tmp_path, DemoConfig.quick(), log=lambda s: None)
    assert not any(tmp_path.iterdir())  # failed before writing anything
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
