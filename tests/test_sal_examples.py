"""The SAL reproductions' short configurations (the full ones are in docs/sensitivity.md)."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lyapunov_short():
    table, rows = load("sal_lyapunov").main([])
    lams = [lam for _, lam, _ in table]
    assert lams == sorted(lams)  # lambda_max grows with the gain
    assert lams[0] < -0.3 and lams[-1] > 0.1
    for g, lam, ls in table:  # log RMS sensitivity tracks lambda_max (random weights)
        assert abs(ls - lam) < 0.12, (g, lam, ls)
    assert rows[0][1] < -1.0  # small weights: strongly contracting
    assert abs(rows[-1][1]) < 0.02  # SAL: edge of chaos
    assert rows[-1][4] < 0.1  # one-sided SAL switched itself off for (almost) all neurons


def test_deep_mlp_short():
    out = load("sal_deep_mlp").main([])
    bp, sal = out["bp"][-1], out["sal"][-1]
    assert bp[2] < 0.6 and sal[2] > 0.9  # (it, loss, test_acc, |dL/dW1|, mean log RMS s)
    assert sal[3] > 100 * bp[3]
    assert sal[4] > bp[4] + 0.3


def test_lag_rnn_short():
    out = load("sal_lag_rnn").main(["--iters", "10", "--report", "10", "--modes", "bptt,sal"])
    assert out["sal"][-1][4] > out["bptt"][-1][4] + 0.01  # SAL grows the recurrent weights from the small start
    assert out["bptt"][-1][4] == pytest.approx(0.5, abs=0.05)
