"""The end-to-end demo behind ``fxwormhole demo`` and ``make demo`` (an application, not the library).

A two-layer LSTM classifier reads scikit-learn's bundled 8x8 digits one row per step (8 steps of 8
pixels). The same network is trained twice from the same initial weights: as it is, and rewritten
by :func:`fxwormhole.transform` with a temporal wormhole (top layer's hidden state -> bottom layer's
input, a gated fixed point at every step) plus sensitivity probes and SAL. The demo prints a results
table and writes, under ``out``:

* ``curves.png``: training loss and test accuracy of both models;
* ``iterations.png``: forward fixed-point iterations per test sample (histogram, and against the
  sample's loss);
* ``sensitivity.png``: per-layer sensitivity of both trained models, measured on the training set
  (:func:`measured_sensitivity`): the plain LSTM without SAL next to the SAL model;
* ``graph.png``: the rewritten graph (:func:`fxwormhole.drawing.draw_transformed`);
* ``report.md`` linking the pictures, with the table and the configuration; ``results.json``.

Its helpers are reused by ``examples/``: :func:`~fxwormhole.cli.progress.progress`,
:func:`~fxwormhole.transformed.per_sample_iterations`, :func:`digits_sequences`, :func:`pyplot`,
:class:`TrainLog` and :data:`DEMO_WORMHOLES`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import SALConfig
from ...passes.meta import graph_record
from ...transformed import per_sample_iterations
from ..progress import progress
from .data import digits_sequences
from .plots import pyplot
from .training import DEMO_WORMHOLES, TrainLog, parameter_count

__all__ = [
    "DemoConfig", "DemoResult", "TrainLog", "run_demo", "progress", "per_sample_iterations", "digits_sequences",
    "pyplot", "DEMO_WORMHOLES",
]


@dataclass(frozen=True)
class DemoConfig:
    """Size of the demo run (``quick()`` is the seconds-long configuration of the tests)."""

    steps: int = 300
    batch: int = 64
    hidden: int = 32
    layers: int = 2
    lr: float = 1e-2
    eval_every: int = 25
    seed: int = 0
    sal_eta: float = 1e-3
    threads: Optional[int] = 1  # small recurrent ops: one thread is fastest (and immune to oversubscription)

    @staticmethod
    def quick() -> "DemoConfig":
        return DemoConfig(steps=12, batch=32, hidden=12, eval_every=6)


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote."""

    out: Path
    rows: list
    files: dict = field(default_factory=dict)


def _evaluate(net: nn.Module, x: Tensor, y: Tensor) -> dict:
    net.eval()
    with torch.no_grad():
        logits = net(x)
        fwd, _ = per_sample_iterations(net)
    net.train()
    loss = F.cross_entropy(logits, y, reduction="none")
    return {"loss": float(loss.mean()), "acc": float((logits.argmax(-1) == y).float().mean()),
            "per_sample_loss": loss, "iterations": fwd}


def _train(name: str, net: nn.Module, data, cfg: DemoConfig, log: Callable[[str], None], show: bool) -> dict:
    xtr, ytr, xte, yte = data
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # same batches for every model
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    net.train()
    rec, evals = TrainLog(), []
    for step in progress(range(1, cfg.steps + 1), total=cfg.steps, desc=f"train {name}", enabled=show):
        idx = torch.randint(0, len(ytr), (cfg.batch,), generator=gen)
        rec.step(net, opt, lambda: F.cross_entropy(net(xtr[idx]), ytr[idx]))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = _evaluate(net, xte, yte)
            evals.append((step, ev["acc"], ev["loss"]))
    final = _evaluate(net, xte, yte)
    log(f"{name}: test accuracy {final['acc']:.3f} after {cfg.steps} steps ({rec.seconds:.1f} s)")
    return {"curve": rec.losses, "evals": evals, "final": final, "seconds": rec.seconds, "cpu_seconds": rec.cpu_seconds,
            "train_fwd_iterations": rec.mean_fwd, "train_bwd_iterations": rec.mean_bwd}


def _table(rows: list) -> str:
    head = ["model", "params", "test acc", "test loss", "ms/step", "cpu ms/step", "x LSTM", "fwd iters", "bwd iters"]
    body = [[r["model"], str(r["params"]), f"{r['test_acc']:.3f}", f"{r['test_loss']:.3f}", f"{r['ms_per_step']:.1f}",
             f"{r['cpu_ms_per_step']:.1f}", f"{r['cpu_ms_per_step'] / rows[0]['cpu_ms_per_step']:.2f}",
             "-" if math.isnan(r["fwd_iterations"]) else f"{r['fwd_iterations']:.2f}",
             "-" if math.isnan(r["bwd_iterations"]) else f"{r['bwd_iterations']:.2f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |" for cells in [head] + body]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _plots(out: Path, runs: dict, base: nn.Module, net: nn.Module, names: Tuple[str, str], inputs: Tensor) -> dict:
    from ...drawing import draw_transformed

    plt = pyplot()
    files = {}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, run in runs.items():
        curve = torch.tensor(run["curve"])
        k = max(1, len(curve) // 20)
        smooth = curve.unfold(0, k, 1).mean(1) if len(curve) >= k else curve
        a1.plot(range(k, k + len(smooth)), smooth.tolist(), label=name)
        steps, acc, _ = zip(*run["evals"])
        a2.plot(steps, acc, marker="o", ms=3, label=name)
    a1.set(xlabel="training step", ylabel="train loss (moving mean)", title="training loss")
    a2.set(xlabel="training step", ylabel="test accuracy", title="test accuracy")
    for a in (a1, a2):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    files["curves"] = _save(fig, out / "curves.png", plt)

    final = runs[names[1]]["final"]
    it, loss = final["iterations"], final["per_sample_loss"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.hist(it.numpy(), bins=20, color="#8e44ad")
    a1.set(xlabel="forward iterations per step (mean over the 8 steps)", ylabel="test samples",
           title="fixed-point iterations per sample")
    r = _pearson(loss, it)
    a2.scatter(loss.numpy(), it.numpy(), s=6, alpha=0.5, color="#8e44ad")
    a2.set(xscale="log", xlabel="per-sample test loss (difficulty)", ylabel="forward iterations",
           title=f"iterations vs difficulty (Pearson r = {r:.2f})")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    files["iterations"] = _save(fig, out / "iterations.png", plt)

    files["sensitivity"] = _sensitivity_plot(out / "sensitivity.png", plt, (base, net), names, inputs)
    files["graph"] = draw_transformed(net, out / "graph.png", title="LSTM classifier rewritten by fxwormhole.transform")
    return files


def measured_sensitivity(model: nn.Module, inputs: Tensor) -> list:
    """Sensitivity rows of ``model`` measured afresh on ``inputs`` (one batch: the exact per-neuron
    means, not a moving average). A model without probes gets measuring probes (no SAL); a model
    with probes is copied and its statistics restarted. Neither model changes."""
    import copy

    from ...instrument import instrument, sensitivity_report
    from ...runtime.sensitivity import probes_of

    if probes_of(model):
        probed = copy.deepcopy(model)
        for probe in probes_of(probed).values():
            probe.zero_stats()
    else:
        probed = instrument(model, (inputs[:4],))
    probed.train()  # probes measure in training mode; no backward, so SAL changes no weight
    with torch.no_grad():
        probed(inputs)
    return list(sensitivity_report(probed).rows)


def _sensitivity_plot(path: Path, plt, models: Tuple[nn.Module, nn.Module], names: Tuple[str, str], inputs: Tensor) -> Path:
    """Per layer, both trained models side by side: log RMS sensitivity on the training set."""
    rows = [measured_sensitivity(m, inputs) for m in models]
    layers = [r.layer for r in rows[1]]
    width = 0.38
    fig, a = plt.subplots(figsize=(7, 3.6))
    for k, (name, colour) in enumerate(zip(names, ("#7f8c8d", "#16a085"))):
        by_layer = {r.layer: r.log_rms_s for r in rows[k]}
        xs = [i + (k - 0.5) * width for i in range(len(layers))]
        a.bar(xs, [by_layer.get(layer, math.nan) for layer in layers], width, color=colour,
              label=name + ("" if k else " (no SAL)"))
    a.axhline(0.0, color="k", lw=1.0, ls="--", label="target: s = 1 (SAL's set point)")
    top = max([r.log_rms_s for rs in rows for r in rs] + [0.0])
    a.set_ylim(top=top + 0.15)  # the target line inside the frame, not on its edge
    a.set_xticks(range(len(layers)), layers)
    a.set(xlabel="layer", ylabel="log RMS of s over its neurons\n(0: s = 1, < 0: gradients shrink)",
          title="neuron sensitivity s = f'(U) ||w|| after training (training set)")
    a.legend(fontsize=8, loc="lower right")
    a.grid(alpha=0.3, axis="y")
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def _report(out: Path, rows: list, cfg: DemoConfig, files: dict, summary: str, sens: str, r: float) -> Path:
    text = f"""# fxwormhole demo

An LSTM classifier (`fxwormhole.zoo.LSTMClassifier`, {cfg.layers} layers, hidden {cfg.hidden}) reads
scikit-learn's 8x8 digits one row per step (8 steps). Both models start from the same weights and
see the same {cfg.steps} batches of {cfg.batch} (Adam, lr {cfg.lr}, gradient clipping 1.0).
The second one is `fxwormhole.transform(model, x, DEMO_WORMHOLES, sal=SALConfig(eta={cfg.sal_eta}))`:

```
{DEMO_WORMHOLES}
```

## Results (test set: a held-out 20% of the digits)

{_table(rows)}

`fwd iters` / `bwd iters`: fixed-point iterations per time step, mean over test samples (forward)
and over training batches (adjoint solve of the implicit gradient). `ms/step`: one training step
(wall time); `cpu ms/step`: its CPU time (1 thread), and `x LSTM` the ratio of that to the plain
LSTM's (CPU time: the runs are sequential, and other jobs on the machine stretch wall time unevenly).

## Training curves

![training curves](curves.png)

## Fixed-point iterations per sample

Pearson correlation between a test sample's loss and its forward iterations: r = {r:.3f}.

![iterations](iterations.png)

## Sensitivity per layer, with and without SAL

Each neuron's sensitivity `s = f'(U) ||w||`, measured on the training set after training
(`fxwormhole.sensitivity_report` of a measuring copy); a bar is the layer's log RMS of `s`, so
0 means `s = 1`, the value SAL steers towards. The rows below are the SAL model's moving averages
over its last training steps.

![sensitivity](sensitivity.png)

```
{sens}
```

## The rewritten graph

![rewritten graph](graph.png)

```
{summary}
```
"""
    path = out / "report.md"
    path.write_text(text)
    return path


def run_demo(out: str | Path = "demo_out", cfg: DemoConfig = DemoConfig(), *, log: Callable[[str], None] = print,
             show_progress: bool = True) -> DemoResult:
    """Train the plain and the transformed LSTM on digit rows; print the table; write ``out``.

    Raises:
        ConfigError: matplotlib (``pip install fxwormhole[plots]``) or scikit-learn is missing.
    """
    pyplot()  # fail before training when the plots cannot be drawn
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(Path(out), cfg, log, show_progress)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, cfg: DemoConfig, log: Callable[[str], None], show_progress: bool) -> DemoResult:
    from ... import zoo
    from ...api import transform
    from ...instrument import sensitivity_report

    out.mkdir(parents=True, exist_ok=True)
    data = digits_sequences("rows", seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    base = zoo.LSTMClassifier(in_features=8, hidden=cfg.hidden, num_layers=cfg.layers, seq=8, classes=10)
    names = ("LSTM", "LSTM + wormholes + SAL")
    net = transform(base, (data[0][:4],), DEMO_WORMHOLES, sal=SALConfig(eta=cfg.sal_eta))
    log(f"transformed: {net.summary().splitlines()[-1]}; temporal wormholes {dict(graph_record(net).temporal.placed)}")
    runs = {names[0]: _train(names[0], base, data, cfg, log, show_progress),
            names[1]: _train(names[1], net, data, cfg, log, show_progress)}
    rows = []
    for (name, run), model in zip(runs.items(), (base, net)):
        fwd = run["final"]["iterations"]
        rows.append({"model": name, "params": parameter_count(model), "test_acc": run["final"]["acc"],
                     "test_loss": run["final"]["loss"], "ms_per_step": 1000 * run["seconds"] / cfg.steps,
                     "cpu_ms_per_step": 1000 * run["cpu_seconds"] / cfg.steps,
                     "fwd_iterations": float(fwd.mean()) if fwd is not None else math.nan,
                     "bwd_iterations": run["train_bwd_iterations"]})
    log("\n" + _table(rows))
    files = _plots(out, runs, base, net, names, data[0])
    final = runs[names[1]]["final"]
    r = _pearson(final["per_sample_loss"], final["iterations"])
    files["report"] = _report(out, rows, cfg, files, net.summary(), str(sensitivity_report(net)), r)
    payload = {"config": asdict(cfg), "wormholes": str(DEMO_WORMHOLES), "rows": rows,
               "loss_iterations_pearson": r,
               "curves": {k: {"train_loss": v["curve"], "evals": v["evals"]} for k, v in runs.items()}}
    files["results"] = out / "results.json"
    files["results"].write_text(json.dumps(payload, indent=1))
    log(f"\nwrote {', '.join(str(p) for p in files.values())}")
    return DemoResult(out=out, rows=rows, files=files)
