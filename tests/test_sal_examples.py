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


def test_depth300_variants_resume_from_the_warmup_checkpoint(tmp_path):
    """sal_depth300 (at depth 4): variants started from a saved warm-up checkpoint follow exactly the
    curves of the run that saved it; the summary and the comparison row come out of the saved runs."""
    mod = load("sal_depth300")
    ck, first, second, row = (str(tmp_path / n) for n in ("ck.pt", "a.json", "b.json", "row.json"))
    common = ["--depth", "4", "--branch", "6", "--iters", "12", "--every", "3", "--warmup-checkpoint", ck]
    a = mod.main(common + ["--variants", "separate + clip 1,SAL off", "--out", first])
    b = mod.main(common + ["--variants", "separate + clip 1", "--out", second])
    assert b["warmup"] == [] and len(a["warmup"]) == 2  # the second run trained no warm-up
    assert b["variants"]["separate + clip 1"] == a["variants"]["separate + clip 1"]
    merged = mod.main(["--load", f"{second},{first}", "--compare-row", row])
    assert set(merged["variants"]) == {"separate + clip 1", "SAL off"} and merged["warmup"] == a["warmup"]
    assert "| separate + clip 1 | 6-12 |" in mod.summary(merged)
    saved = load("sal_compare").main(["--load", row])
    (r,) = saved["rows"]
    assert r["task"] == "depth 4" and r["steps"] == 12 and r["seeds"] == 5
    curve = saved["curves"]["depth 4"][r["method"]]["curves"][0]
    assert curve["steps"] == [0, 3, 6, 9, 12] and curve["acc"][2:] == [x["acc"][0] for x in a["variants"]["separate + clip 1"]]
