"""Model coverage: what fxwormhole does with third-party model code, one row per model.

    python bench/model_coverage.py [--models a,b] [--steps s,t] [--timeout 900] [--out docs/coverage.md]

For every model of ``tests/thirdparty/models.py`` (transformers from tiny configs, torchvision,
pytorch/examples patterns) and every step of ``tests/thirdparty/steps.py`` (capture, transform with
"auto", equal to the original at init, a training step with open gates, instrument, compile for
inference and training, export to pt2 and ONNX, another input size) it records the result -- ok,
a typed ``FxWormholeError`` with its message, an untyped error's type and first line, WRONG
numbers, or a timeout -- and the time, and writes the table to ``docs/coverage.md`` (and the raw
results to ``docs/coverage.json``; ``--models``/``--steps`` re-run a part and merge).

Each model runs in its own subprocess at ``nice 19`` with one thread; a step that runs past
``--timeout`` seconds is killed and recorded, and the remaining steps go on in a fresh subprocess.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from thirdparty import models as tp_models  # noqa: E402  (path set above)
from thirdparty.steps import NEEDS, OPEN_GATES, RTOL, RTOL_COMPILED, STEPS  # noqa: E402

STEP_TITLES = {
    "capture": "capture", "transform": "transform", "equals": "= original", "train": "train step",
    "instrument": "instrument", "compile_infer": "compile", "compile_train": "compile+grad",
    "export_pt2": "pt2", "export_onnx": "ONNX", "other_size": "other size",
}


# ------------------------------------------------------------------------------------------------
# child: run steps of one model, one JSON line per event


def _first_line(exc: BaseException) -> str:
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return text[:400]


def child(name: str, steps: list[str], log: Path, failed: set[str]) -> None:
    import logging
    import warnings

    import torch

    os.nice(19)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import fxwormhole
    from thirdparty.steps import Mismatch, run_step

    with log.open("a") as out:
        def emit(**event) -> None:
            out.write(json.dumps(event) + "\n")
            out.flush()

        for step in steps:
            blocker = next((n for n in NEEDS.get(step, ()) if n in failed), None)
            if blocker is not None:
                emit(step=step, event="done", status="blocked", detail=f"{blocker} failed", seconds=None)
                failed.add(step)
                continue
            emit(step=step, event="start")
            t0 = time.perf_counter()
            try:
                detail, status = run_step(name, step), "ok"
            except Mismatch as exc:
                detail, status = _first_line(exc), "WRONG"
            except fxwormhole.FxWormholeError as exc:
                detail, status = _first_line(exc), f"typed {type(exc).__name__}"
            except Exception as exc:  # noqa: BLE001 - the point is to record every failure
                detail, status = _first_line(exc), f"untyped {type(exc).__name__}"
            if status != "ok":
                failed.add(step)
            emit(step=step, event="done", status=status, detail=detail, seconds=round(time.perf_counter() - t0, 2))


# ------------------------------------------------------------------------------------------------
# parent: schedule subprocesses, enforce per-step timeouts


def _read_events(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]


def run_model(name: str, steps: list[str], timeout: float) -> dict[str, dict]:
    """Results of ``steps`` on ``name``: ``{step: {status, detail, seconds}}``."""
    results: dict[str, dict] = {}
    todo = list(steps)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "events.jsonl"
        while todo:
            failed = ",".join(s for s, r in results.items() if r["status"] != "ok")
            seen = len(_read_events(log))
            proc = subprocess.Popen([sys.executable, __file__, "--child", name, "--steps", ",".join(todo), "--log", str(log),
                                     "--failed", failed],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True)
            started = time.monotonic()
            current = None
            while proc.poll() is None:
                time.sleep(0.5)
                events = _read_events(log)[seen:]
                for ev in events:
                    if ev["event"] == "start":
                        current, started = ev["step"], time.monotonic()
                    else:
                        results[ev["step"]] = {k: ev[k] for k in ("status", "detail", "seconds")}
                        todo.remove(ev["step"])
                        current = None
                seen += len(events)
                if current is not None and time.monotonic() - started > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    results[current] = {"status": "timeout", "detail": f"killed after {timeout:.0f} s", "seconds": timeout}
                    todo.remove(current)
                    current = None
            for ev in _read_events(log)[seen:]:
                if ev["event"] == "done" and ev["step"] in todo:
                    results[ev["step"]] = {k: ev[k] for k in ("status", "detail", "seconds")}
                    todo.remove(ev["step"])
            if proc.returncode not in (0, -signal.SIGKILL) and todo:
                crashed = todo.pop(0)  # the process died inside this step (segfault, abort)
                err = (proc.stderr.read() or "").strip().splitlines()
                results[crashed] = {"status": "crash", "detail": f"exit {proc.returncode}: {(err or [''])[-1][:300]}",
                                    "seconds": None}
            proc.stderr.close()
    return results


# ------------------------------------------------------------------------------------------------
# the page


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    status = r["status"]
    if status == "ok":
        return f"ok {r['seconds']:.1f}s"
    if status.startswith("typed "):
        return status[len("typed "):]
    if status.startswith("untyped "):
        return f"**untyped** {status[len('untyped '):]}"
    if status == "WRONG":
        return "**WRONG**"
    if status == "n/a":
        return "n/a"
    return status


def _versions() -> str:
    import torch

    parts = [f"torch {torch.__version__}"]
    for mod in ("transformers", "onnxruntime"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001
            parts.append(f"{mod} missing")
    try:
        from thirdparty.torchvision_shim import import_torchvision, shim_active

        tv = import_torchvision()
        parts.append(f"torchvision {tv.__version__}" + (" (C++ ops shimmed)" if shim_active() else ""))
    except Exception as exc:  # noqa: BLE001
        parts.append(f"torchvision unavailable ({type(exc).__name__})")
    return ", ".join(parts)


def render(results: dict[str, dict[str, dict]], meta: dict) -> str:
    steps = list(STEPS)
    names = [n for n in tp_models.names() if n in results]
    lines = [
        "# Model coverage",
        "",
        "What fxwormhole does with model code its users did not write (issue 16). Generated by",
        f"`{meta['command']}` on {meta['date']} ({meta['versions']}; {meta['machine']};",
        f"load before the run: {meta['load']}). Do not edit by hand: re-run the command.",
        "",
        "Models are built from tiny configs with random weights (nothing downloaded) by",
        "`tests/thirdparty/models.py`; the steps are `tests/thirdparty/steps.py`, shared with",
        "`tests/test_thirdparty.py`. A cell is `ok` with the step's time, the name of a typed",
        "`FxWormholeError`, **untyped** and the exception type, **WRONG** (ran, wrong numbers),",
        "`timeout`, or `blocked` (a step it needs failed). Messages are listed below the table.",
        "Cells may come from partial re-runs (`--models`, `--steps`); a full run re-measures all.",
        "",
        "| step | what is checked |",
        "|---|---|",
        "| capture | `fxwormhole.capture(model, inputs)`; outputs equal the original's (rel. " + f"{RTOL:g}) |",
        "| transform | `fxwormhole.transform(model, inputs)` with the default config (`wormholes=\"auto\"`) |",
        f"| = original | transformed model (gates closed) equals the original at init (rel. {RTOL:g}) |",
        f"| train step | train mode, `{OPEN_GATES}`: each fixed-point body is deterministic (two evaluations at "
        "its last point agree), forward and adjoint solves converge in more than one iteration, finite gradients "
        "reach every wormhole parameter, outputs stay finite after an SGD step |",
        f"| instrument | `fxwormhole.instrument(model, inputs)`; outputs equal the original's (rel. {RTOL:g}) |",
        f"| compile | `fxwormhole.compile` of the open-gate model (default Anderson solver) in eval mode, `no_grad`, "
        f"vs eager (rel. {RTOL_COMPILED:g}) |",
        "| compile+grad | the same with gradients (eval mode, so dropout and BatchNorm are deterministic): "
        "outputs and parameter gradients vs eager (rel. 1e-3 of each gradient, floored at 1e-2 of the largest) |",
        f"| pt2, ONNX | `fxwormhole.export` of the open-gate model, loaded with `fxwormhole.export.load` (onnxruntime) vs eager (rel. {RTOL_COMPILED:g}) |",
        f"| other size | transformed at the example size, called at another spatial size / sequence length the original accepts (rel. {RTOL:g}) |",
        "",
        "| model | family | " + " | ".join(STEP_TITLES[s] for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for name in names:
        spec = tp_models.MODELS[name]
        row = [f"`{name}`", spec.family] + [_cell(results[name].get(s)) for s in steps]
        lines.append("| " + " | ".join(row) + " |")
    counts: dict[str, int] = {}
    for name in names:
        for s in steps:
            r = results[name].get(s)
            if r is not None:
                key = r["status"].split()[0]
                counts[key] = counts.get(key, 0) + 1
    lines += ["", "Totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + ".", ""]
    lines += ["## Models", ""]
    lines += [f"- `{n}` ({tp_models.MODELS[n].family}): {tp_models.MODELS[n].what}" for n in names]
    lines += ["", "## Messages", ""]
    for name in names:
        bad = [(s, results[name][s]) for s in steps if s in results[name] and results[name][s]["status"] not in ("ok", "n/a")]
        if not bad:
            continue
        lines.append(f"**{name}**")
        lines.append("")
        for s, r in bad:
            detail = r["detail"].replace("|", "\\|")
            lines.append(f"- {STEP_TITLES[s]}: {r['status']}: {detail}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names (default: all)")
    ap.add_argument("--steps", help="comma-separated steps (default: all)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per step")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    ap.add_argument("--render", action="store_true", help="only rewrite the page from the stored results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--failed", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = args.steps.split(",") if args.steps else list(STEPS)
    if args.child:
        child(args.child, steps, args.log, set(filter(None, args.failed.split(","))))
        return
    unknown = [s for s in steps if s not in STEPS]
    names = args.models.split(",") if args.models else tp_models.names()
    unknown += [n for n in names if n not in tp_models.MODELS]
    if unknown:
        sys.exit(f"unknown model or step names {unknown}; models: {tp_models.names()}; steps: {list(STEPS)}")
    raw = args.out.with_suffix(".json")
    stored = json.loads(raw.read_text()) if raw.exists() else {"results": {}}
    results: dict[str, dict] = stored["results"]
    if args.render:
        _write_atomic(args.out, render(results, stored["meta"]))
        return
    meta = {
        "command": "python bench/model_coverage.py",
        "date": datetime.date.today().isoformat(),
        "versions": _versions(),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, nice 19, 1 thread, step timeout {args.timeout:.0f} s",
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    for name in names:
        todo = [s for s in steps if s != "other_size" or tp_models.MODELS[name].other_size is not None]
        t0 = time.perf_counter()
        got = run_model(name, todo, args.timeout)
        if "other_size" in steps and "other_size" not in todo:
            got["other_size"] = {"status": "n/a", "detail": "no second size", "seconds": None}
        results.setdefault(name, {}).update(got)
        print(f"{name:24s} {time.perf_counter() - t0:7.1f}s  " + "  ".join(f"{s}={got[s]['status'].split()[-1]}" for s in steps if s in got),
              flush=True)
        _write_atomic(raw, json.dumps({"results": results, "meta": meta}, indent=1, sort_keys=True) + "\n")
        _write_atomic(args.out, render(results, meta))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
