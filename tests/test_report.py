"""fxwormhole.report and fxwormhole.StatsLogger: readable statistics and a one-line logging hook.

References: a closed wormhole's fixed point stops after one evaluation and its gate is
sigmoid(gate_init); a forced-open, non-contracting one (as in test_divergence) reports failures;
per-probe rows equal fxwormhole.sensitivity_report's; the figures a logger writes are the report's,
read back from a real TensorBoard event file when tensorboard is installed.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fxwormhole
from fxwormhole import ConfigError, SALConfig, StatsLogger, WormholeConfig, zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def _step(net, x):
    F.cross_entropy(net(x), torch.zeros(x.shape[0], dtype=torch.long)).backward()


def test_closed_wormhole_report_matches_closed_forms():
    x = torch.randn(6, 8)
    net = fxwormhole.transform(zoo.MLP(), (x,), WormholeConfig(gate="channel"), sal=SALConfig())
    before = fxwormhole.report(net)
    assert before.not_run == ["fixed_point_0"] and not before.fixed_points
    _step(net, x)
    rep = fxwormhole.report(net)
    (row,) = rep.fixed_points
    assert (row.name, row.samples, row.mean_iterations, row.max_iterations) == ("fixed_point_0", 6, 1.0, 1)
    assert row.status == {"converged": 6} and row.ok
    assert row.mean_backward_iterations is not None and row.worst_backward_residual is not None
    (w,) = rep.wormholes
    assert (w.name, w.fixed_point, w.src, w.dst, w.gate_kind) == ("wormhole_0", "fixed_point_0", "layers.2", "layers.0", "channel")
    assert w.gate == pytest.approx(_sigmoid(-6.0), rel=1e-6)
    sens = fxwormhole.sensitivity_report(net)
    assert rep.probes == sens.rows
    text = str(rep)
    assert "fixed_point_0" in text and "layers.2 -> layers.0" in text and "0.0025" in text and "converged 6" in text
    assert len(text.splitlines()) < 20  # a table, not tensors


def test_a_non_contracting_wormhole_reports_its_failures():
    torch.manual_seed(0)
    x = torch.randn(8, 8)
    cfg = WormholeConfig(wormholes=[("layers.2", "layers.0")], gate_init=6.0, proj_init="normal", proj_std=1.0,
                         solver="picard", max_iter=8, on_fail="ignore")
    net = fxwormhole.transform(zoo.MLP(activation="relu"), (x,), cfg)
    with torch.no_grad():
        net(x)
    (row,) = fxwormhole.report(net).fixed_points
    stats = net.fixed_point_stats()["fixed_point_0"]
    assert not row.ok and row.max_iterations == 8 and row.mean_backward_iterations is None
    assert sum(row.status.values()) == 8 and row.status.get("converged", 0) == int((stats.status == 0).sum())
    metrics = fxwormhole.report(net).metrics()
    failed = sum(metrics[f"fixed_point/fixed_point_0/{s}_fraction"] for s in ("max_iter", "diverged", "non_finite"))
    assert failed == pytest.approx(1 - row.status.get("converged", 0) / 8) and failed > 0
    assert metrics["gate/wormhole_0"] == pytest.approx(_sigmoid(6.0), rel=1e-6)
    assert "backward_iterations_mean" not in " ".join(metrics)


def test_recurrent_and_instrumented_models():
    x = torch.randn(3, 5, 6)
    net = fxwormhole.transform(zoo.LSTMClassifier(num_layers=2), (x,), WormholeConfig(gate_init=-2.0))
    _step(net, x)
    rep = fxwormhole.report(net)
    (row,) = rep.fixed_points
    assert row.name == "rnn" and row.samples == 5 * 3  # one solve per time step and sample
    (w,) = rep.wormholes
    assert (w.fixed_point, w.src, w.dst) == ("rnn", "layer1", "layer0") and w.gate == pytest.approx(_sigmoid(-2.0))
    probed = fxwormhole.instrument(zoo.MLP(), (torch.randn(4, 8),))
    probed(torch.randn(4, 8))
    rep = fxwormhole.report(probed)
    assert not rep.fixed_points and not rep.wormholes and [p.layer for p in rep.probes][:1] == ["layers.0"]
    assert str(fxwormhole.report(zoo.MLP())) == "no fixed points, wormholes or sensitivity probes"


def test_stats_logger_sends_the_report_to_a_callable_every_n_steps():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    net = fxwormhole.transform(zoo.MLP(), (x,), WormholeConfig(gate_init=0.0, proj_init="normal", proj_std=0.2),
                               sal=SALConfig())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    seen = []
    log = StatsLogger(seen.append, every=2)
    for step in range(5):
        loss = F.cross_entropy(net(x), torch.zeros(6, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert log(net, step, loss=loss) == (step % 2 == 0)
        if step % 2 == 0:
            want = {f"fxwormhole/{k}": v for k, v in fxwormhole.report(net).metrics().items()}
            assert seen[-1] == {"step": step, **want, "fxwormhole/loss": loss.item()}
    assert [s["step"] for s in seen] == [0, 2, 4]
    assert seen[-1]["fxwormhole/fixed_point/fixed_point_0/forward_iterations_mean"] > 1  # open: it iterates
    assert 0 < seen[-1]["fxwormhole/gate/wormhole_0"] < 1
    assert "fxwormhole/sensitivity/layers.0/log_rms" in seen[-1]
    with pytest.raises(ConfigError, match="every=0"):
        StatsLogger(print, every=0)
    with pytest.raises(ConfigError, match="SummaryWriter .* or a callable"):
        StatsLogger(3)


def test_stats_logger_writes_a_real_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x = torch.randn(4, 8)
    net = fxwormhole.transform(zoo.MLP(), (x,), WormholeConfig(gate_init=0.0, proj_init="normal"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorboard's own deprecation notices
        log = StatsLogger.tensorboard(tmp_path / "runs")
        for step in range(3):
            _step(net, x)
            log(net, step)
        log.close()
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    tag = "fxwormhole/fixed_point/fixed_point_0/forward_iterations_mean"
    assert tag in events.Tags()["scalars"]
    values = [e.value for e in events.Scalars(tag)]
    assert [e.step for e in events.Scalars(tag)] == [0, 1, 2]
    assert values[-1] == pytest.approx(fxwormhole.report(net).metrics()["fixed_point/fixed_point_0/forward_iterations_mean"])


def test_tensorboard_missing_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install fxwormhole\[tensorboard\]"):
        StatsLogger.tensorboard(tmp_path)


def test_stats_repr_is_one_line_with_the_figures_of_summary():
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    net = fxwormhole.transform(zoo.MLP(), (x[:4],), WormholeConfig(gate_init=0.0, proj_init="normal", proj_std=0.3))
    y = net(x)
    stats = net.fixed_point_stats()["fixed_point_0"]
    fwd = stats.summary()["forward"]
    text = repr(stats)
    assert "\n" not in text and len(text) < 200 and "tensor" not in text
    assert text.startswith("FixedPointStats('fixed_point_0'; 512 samples; forward ")
    assert f"forward {fwd['mean_iterations']:.2f} iterations (max {fwd['max_iterations']})" in text
    assert f"worst residual {fwd['worst_residual']:.1e}" in text and f"converged {fwd['status']['converged']}" in text
    assert text.endswith("no backward yet)")
    y.sum().backward()
    bwd = stats.summary()["backward"]
    assert repr(stats).endswith(f"backward {bwd['mean_iterations']:.2f} iterations (max {bwd['max_iterations']}), "
                                f"worst residual {bwd['worst_residual']:.1e})")
    assert repr(stats.backward) == (f"SolveStats(512 samples; {bwd['mean_iterations']:.2f} iterations "
                                    f"(max {bwd['max_iterations']}), worst residual {bwd['worst_residual']:.1e}, "
                                    f"converged {bwd['status']['converged']})")
    assert str(net.fixed_point_stats()) == f"{{'fixed_point_0': {text[:text.index('; no backward')]}; " \
                                           f"backward {bwd['mean_iterations']:.2f} iterations (max {bwd['max_iterations']}), " \
                                           f"worst residual {bwd['worst_residual']:.1e})}}"


def test_temporal_stats_repr_counts_steps_and_samples():
    x = torch.randn(3, 5, 6)
    net = fxwormhole.transform(zoo.LSTMClassifier(num_layers=2), (x,), WormholeConfig(gate_init=-2.0))
    net(x)
    stats = net.fixed_point_stats()["rnn"]
    it = stats.iterations.float()
    assert repr(stats) == (f"TemporalStats(5 x 3 (steps x samples); forward {float(it.mean()):.2f} iterations "
                           f"(max {int(it.max())}), worst residual {float(stats.residual.max()):.1e}, "
                           f"converged 15; no backward yet)")
