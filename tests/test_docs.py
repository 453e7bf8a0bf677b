"""Every ```python block of README.md and docs/*.md runs, so a page cannot go stale.

The blocks of one page run in order in one namespace (a page is a session: later blocks use the
names earlier ones defined), in a temporary working directory. A marker on the line before a block
changes what is done with it:

* ``<!-- signatures -->``: a listing of call signatures, not a program. Every line ``name(params)``
  whose ``name`` resolves (after the block's own import lines, with fxwormhole's public names in
  scope) is compared with ``inspect.signature`` of the real object: the same parameters, kinds and
  defaults. At least one line per block must be checked.
* ``<!-- no-test: why -->``: not run; the reason is required (use sparingly).

Pages whose blocks take long (compile, export, training loops) are marked slow in ``SLOW``.
"""
from __future__ import annotations

import ast
import inspect
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SLOW = {"docs/pipeline.md": "compiles and exports a model (about a minute)"}

_BLOCK = re.compile(r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: str) -> list[tuple[int, str, str]]:
    """``(line, marker, code)`` of every ```python block of ``page`` (marker "" when none)."""
    text = (ROOT / page).read_text()
    return [(text[:m.start("code")].count("\n"), (m.group("marker") or "").strip(), m.group("code"))
            for m in _BLOCK.finditer(text)]


def test_every_marker_is_known_and_justified():
    for page in PAGES:
        for line, marker, _ in blocks(page):
            if marker.startswith("no-test"):
                assert len(marker.split(":", 1)[-1].strip()) > 10, f"{page}:{line}: say why the block is not run"
            else:
                assert marker in ("", "signatures"), f"{page}:{line}: unknown marker {marker!r}"


def test_no_page_is_to_be_written():
    for page in PAGES:
        assert "to be written" not in (ROOT / page).read_text().lower(), page


# --- running blocks -------------------------------------------------------------------------------
RUNNABLE = [p for p in PAGES if any(marker == "" for _, marker, _ in blocks(p))]


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW else p for p in RUNNABLE])
def test_page_blocks_run(page, tmp_path, monkeypatch):
    runnable = [(line, code) for line, marker, code in blocks(page) if marker == ""]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    before = torch.get_num_threads()
    torch.manual_seed(0)
    try:
        for line, code in runnable:
            try:
                exec(compile(code, f"{page}:{line + 1}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{page}, block at line {line + 1} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_num_threads(before)


# --- signature listings ---------------------------------------------------------------------------
def _statements(code: str) -> list[str]:
    """The block's lines joined into statements (continuation lines of open brackets), comments off."""
    out, current, depth = [], "", 0
    for raw in code.splitlines():
        line = re.sub(r"\s+#.*$", "", raw).rstrip()
        if not line.strip():
            continue
        current = f"{current} {line.strip()}" if current else line.strip()
        depth += line.count("(") + line.count("[") - line.count(")") - line.count("]")
        if depth <= 0:
            out.append(current)
            current, depth = "", 0
    return out


def _documented(params: str, namespace: dict) -> inspect.Signature:
    """The signature a documented parameter list describes (defaults evaluated in ``namespace``)."""
    source = f"def _documented({params}):\n    pass\n"
    ast.parse(source)
    scope = dict(namespace)
    exec(source, scope)
    return inspect.signature(scope["_documented"])


def _same(documented: inspect.Signature, real: inspect.Signature) -> str | None:
    doc, got = list(documented.parameters.values()), list(real.parameters.values())
    if got and got[0].name == "self":
        got = got[1:]
    if [(p.name, p.kind) for p in doc] != [(p.name, p.kind) for p in got]:
        return f"parameters {[(p.name, p.kind.name) for p in doc]} != {[(p.name, p.kind.name) for p in got]}"
    for d, g in zip(doc, got):
        if (d.default is inspect.Parameter.empty) != (g.default is inspect.Parameter.empty):
            return f"{d.name}: default {d.default!r} != {g.default!r}"
        if d.default is not inspect.Parameter.empty and d.default != g.default:
            return f"{d.name}: default {d.default!r} != {g.default!r}"
    return None


_NAME = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)\(")


def _call(statement: str) -> tuple[str, str] | None:
    """``("fxwormhole.transform", "model, example_inputs, ...")`` of a ``name(params) -> ...`` line."""
    match = _NAME.match(statement)
    if not match:
        return None
    depth = 0
    for i in range(match.end() - 1, len(statement)):
        depth += {"(": 1, ")": -1}.get(statement[i], 0)
        if depth == 0:
            rest = statement[i + 1:].strip()
            return (match.group("name"), statement[match.end():i]) if not rest or rest.startswith("->") else None
    return None


def _signature_blocks():
    for page in PAGES:
        for line, marker, code in blocks(page):
            if marker == "signatures":
                yield pytest.param(page, line, code, id=f"{page}:{line + 1}")


@pytest.mark.parametrize("page, line, code", list(_signature_blocks()))
def test_signature_listings_match_the_code(page, line, code):
    import fxwormhole

    namespace = {"fxwormhole": fxwormhole, "torch": torch}
    namespace.update({name: getattr(fxwormhole, name) for name in fxwormhole.__all__})
    checked = 0
    for statement in _statements(code):
        if statement.startswith(("from ", "import ")):
            exec(statement, namespace)
            continue
        call = _call(statement)
        if call is None:
            continue
        name, params = call
        try:
            target = eval(name, namespace)
        except (NameError, AttributeError):
            continue  # a method on an instance (node.prepare(...)): described, not checkable
        real = inspect.signature(target)
        problem = _same(_documented(params, namespace), real)
        assert problem is None, f"{page}:{line + 1}: {name}: {problem}; the code says {real}"
        checked += 1
    assert checked, f"{page}:{line + 1}: no signature in this block could be checked"
