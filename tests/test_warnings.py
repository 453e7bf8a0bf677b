"""Non-convergence warnings are aggregated (issue 15): a long run with a diverging fixed point prints a
handful of lines, each saying what failed and how often.

References: the number of failed solves is counted independently (from the stats every call leaves
on the model) and compared with the figures the summary lines carry; the schedule (first failure in
full, then after 10, 100, ... more) is checked line by line; a subprocess shows what a user's
terminal gets, including the line printed at interpreter exit.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxwormhole as fw
from fxwormhole.runtime import _warnings
from fxwormhole.runtime.recurrent import add_temporal_wormhole

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
NODE = "fixed_point_0"
SUMMARY = re.compile(r"fixed point '(\w+)': (\d+) more solves did not converge \((.*?); (\d+) of (\d+) samples: "
                     r"(.*?); worst residual (\S+)\); (\d+) since the first warning")


@pytest.fixture(autouse=True)
def _default_policy():
    yield
    fw.set_convergence_warnings()


def _diverging_net() -> nn.Module:
    """Gates open and a large random projection: the cycle expands (as in test_divergence)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    cfg = fw.WormholeConfig(wormholes=[("2", "0")], gate_init=6.0, proj_init="normal", proj_std=1.0,
                            solver="picard", max_iter=6)
    return fw.transform(model, (torch.randn(4, 8),), cfg)


def _train(net: nn.Module, steps: int) -> tuple[int, int]:
    """``steps`` SGD steps; returns the failed forward and backward solves counted from the stats."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    failed_fwd = failed_bwd = 0
    for _ in range(steps):
        x = torch.randn(4, 8, generator=gen)
        opt.zero_grad()
        F.mse_loss(net(x), torch.zeros(4, 4)).backward()
        opt.step()
        st = net.fixed_point_stats()[NODE]
        failed_fwd += not st.forward.ok
        failed_bwd += st.backward is not None and not st.backward.ok
    return failed_fwd, failed_bwd


def test_a_400_step_run_prints_a_few_lines_that_add_up():
    net = _diverging_net()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        fwd, bwd = _train(net, 400)
        failures = _warnings.convergence_failures()
        report = fw.report(net)
        fw.flush_convergence_warnings()
    assert fwd == 400, "the forced-open cycle must fail at every step for this test to mean anything"
    texts = [str(w.message) for w in seen if issubclass(w.category, fw.NonConvergenceWarning)]
    assert len(seen) == len(texts), [str(w.message) for w in seen]
    total = fwd + bwd
    # first failure in full, then after 10 and 100 more, then the rest at the flush
    assert len(texts) == 4, texts
    assert "did not converge" in texts[0] and "gate_init" in texts[0] and "set_convergence_warnings" in texts[0]
    parsed = [SUMMARY.match(t) for t in texts[1:]]
    assert all(parsed), texts[1:]
    assert [int(m.group(8)) for m in parsed] == [10, 100, total - 1]
    assert sum(int(m.group(2)) for m in parsed) == total - 1
    assert all(m.group(1) == NODE for m in parsed)
    assert "next summary after 90 more" in texts[1] and "next summary after 900 more" in texts[2]
    assert "next summary" not in texts[3]
    # the phases and samples of the last window: forward solves are one per step, 4 samples each
    last = parsed[-1]
    phases = dict(p.rsplit(" ", 1) for p in last.group(3).split(", "))
    assert sum(int(v) for v in phases.values()) == int(last.group(2))
    assert int(last.group(5)) == 4 * int(last.group(2))
    assert 0 < int(last.group(4)) <= int(last.group(5))
    assert failures == {NODE: total}
    # report() shows the running count next to the last call's figures
    (row,) = report.fixed_points
    assert row.failed_solves == total and report.metrics()[f"fixed_point/{NODE}/failed_solves"] == total
    assert "failed solves so far" in str(report) and str(report).splitlines()[2].endswith(f" {total}")


def test_every_n_and_always():
    net = _diverging_net()
    fw.set_convergence_warnings(every=25)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        fwd, bwd = _train(net, 30)  # 30 forward + up to 30 adjoint solves
    total = fwd + bwd
    assert len(seen) == 1 + (total - 1) // 25
    fw.set_convergence_warnings("always")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        fwd, bwd = _train(net, 5)
    assert len(seen) == fwd + bwd and all("to fix:" in str(w.message) for w in seen)
    fw.set_convergence_warnings()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # the standard way to ask for every warning
        fwd, bwd = _train(net, 5)
    assert len(seen) == fwd + bwd
    with pytest.raises(fw.ConfigError, match="every"):
        fw.set_convergence_warnings(every=0)
    with pytest.raises(fw.ConfigError, match="mode"):
        fw.set_convergence_warnings("loud")


def test_filters_silence_them_and_a_new_recorder_sees_the_first_failure_in_full():
    net = _diverging_net()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=fw.NonConvergenceWarning)
        _train(net, 3)
    assert seen == []
    for _ in range(2):  # each recorder: the full warning again
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            _train(net, 3)
        assert len(seen) == 1 and "to fix:" in str(seen[0].message)
        assert seen[0].filename == __file__  # points at the user's code, not fxwormhole's
        assert issubclass(seen[0].category, RuntimeWarning)


def test_temporal_fixed_points_are_aggregated_too():
    from fxwormhole.config import SolverConfig

    torch.manual_seed(0)
    cfg = fw.WormholeConfig(gate_init=4.0, proj_init="normal", proj_std=0.5,
                            solver=SolverConfig(name="picard", tol=1e-12, max_iter=2), on_fail="warn")
    lstm = add_temporal_wormhole(nn.LSTM(3, 5, 2), cfg)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(12):
            lstm(torch.randn(4, 2, 3))[0].sum().backward()
    texts = [str(w.message) for w in seen]
    assert len(texts) == 2, texts  # the first in full, the summary after 10 more
    assert "(step, sample) pairs" in texts[0] and "to fix:" in texts[0]
    assert "10 since the first warning" in texts[1] and "of 80 (step, sample) pairs" in texts[1]


SCRIPT = """
import torch, torch.nn.functional as F
from torch import nn
import fxwormhole as fw
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
cfg = fw.WormholeConfig(wormholes=[("2", "0")], gate_init=6.0, proj_init="normal", proj_std=1.0,
                        solver="picard", max_iter=6)
net = fw.transform(model, (torch.randn(4, 8),), cfg)
opt = torch.optim.SGD(net.parameters(), lr=1e-3)
for step in range(400):
    opt.zero_grad()
    F.mse_loss(net(torch.randn(4, 8)), torch.zeros(4, 4)).backward()
    opt.step()
print("trained")
"""


@pytest.mark.slow
def test_a_user_script_prints_four_warnings_in_400_steps(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "trained\n"
    warned = [line for line in done.stderr.splitlines() if "NonConvergenceWarning" in line]
    assert len(warned) == 4, done.stderr
    assert all(f"{script}:" in line for line in warned)  # each points at the script's line
    assert "since the first warning" in warned[-1]  # the exit summary
    assert len(done.stderr.splitlines()) <= 8, done.stderr  # each warning and its source line
