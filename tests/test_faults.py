"""Fault injection on every file fxwormhole writes (issue 13, rows 3-4 and items 2-4).

Writers: ``fxwormhole.export`` (pt2, ONNX) and the CLI's ``rewrite --out``, ``export --out`` and
``inspect --picture``. Faults: a full disk or an exception in the middle of writing (the writer has
already written part of the file), a full disk at fsync, permission denied when the file is created
or renamed into place, Ctrl-C in the middle of writing, a directory that does not exist, a target
that is a directory. Each case checks:

* a typed :class:`FxWormholeError` subclass (``ExportError`` from ``fxwormhole.export``, a
  ``SaveError`` or ``ExportError`` from a CLI command) whose message names the path, the cause and
  what to do (Ctrl-C stays a KeyboardInterrupt);
* the file that was at the path is byte-for-byte unchanged and no temporary file is left;
* through ``fxwormhole.cli.main``: one stderr line and exit code 2 (130 for Ctrl-C).

Then damaged and modified artifacts: ``load`` refuses each with an ExportError that names the file,
the record that differs and what to do, where ``torch.export.load`` alone would load them.

Tracing and ONNX conversion take seconds and do not touch the disk, so the exported program and the
ONNX model are computed once (real ``torch.export`` / ``torch.onnx``) and handed to the writers.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import io
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

import fxwormhole
from fxwormhole import WormholeConfig, zoo
from fxwormhole._atomic import atomic_files, atomic_write, temp_name_pattern
from fxwormhole.cli import build_parser, main
from fxwormhole.errors import ExportError, FxWormholeError, PlacementError, SaveError

pytestmark = pytest.mark.usefixtures("one_thread")

EXPORT = importlib.import_module("fxwormhole.export")  # the module (fxwormhole.export is the function)
OPEN = WormholeConfig(wormholes=[("layers.2", "layers.0")], gate_init=0.0, proj_init="normal", proj_std=0.3,
                      tol=1e-6, max_iter=60)
MLP_ARGS = ["fxwormhole.zoo:MLP", "--kwargs", '{"hidden": 6}', "-i", "2x8", "-w", "layers.2:layers.0"]
OLD = b"the user's previous file: it must survive every failed write\n" * 8


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A transformed MLP with an open wormhole, its ExportedProgram and ONNX model, and a saved copy."""
    torch.manual_seed(0)
    base = zoo.MLP(hidden=6)
    x = base.example_inputs(2)
    net = fxwormhole.transform(base, x, OPEN)
    ep = EXPORT.export_program(net, x)
    proto = EXPORT._onnx_proto(ep, x) if _has("onnx", "onnxscript", "onnxruntime") else None
    saved = tmp_path_factory.mktemp("saved") / "net.pt"
    torch.save(net, saved)
    net.eval()
    with torch.no_grad():
        want = net(*x)  # what every intact artifact computes
    net.train()
    return SimpleNamespace(net=net, x=x, ep=ep, proto=proto, saved=saved, want=want)


@pytest.fixture
def traced_once(art, monkeypatch):
    """Writers get the program traced once by ``art`` instead of tracing the same model again."""
    monkeypatch.setattr(EXPORT, "export_program", lambda *a, **k: art.ep)
    if art.proto is not None:
        monkeypatch.setattr(EXPORT, "_onnx_proto", lambda *a, **k: type(art.proto).FromString(art.proto.SerializeToString()))


# ------------------------------------------------------------------------------------------ writers
def _command(argv: list[str]) -> None:
    """A CLI command without main's error printing, so the test sees the exception's type."""
    args = build_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        args.func(args)


@dataclass
class Writer:
    name: str
    suffix: str
    write: Callable[[Path, SimpleNamespace], None]
    error: type[FxWormholeError]
    writes_with: tuple  # (object, attribute): the library call that writes the bytes
    needs: tuple = ()


def _writes_with_torch_export():
    return (torch.export, "save")


def _onnx_save():
    import onnx

    return (onnx, "save_model")


def _savefig():
    import matplotlib.figure

    return (matplotlib.figure.Figure, "savefig")


WRITERS = [
    Writer("export pt2", ".pt2", lambda p, a: fxwormhole.export(a.net, a.x, p), ExportError, _writes_with_torch_export),
    Writer("export onnx", ".onnx", lambda p, a: fxwormhole.export(a.net, a.x, p, format="onnx"), ExportError,
           _onnx_save, needs=("onnx", "onnxscript", "onnxruntime")),
    Writer("cli rewrite --out", ".pt", lambda p, a: _command(["rewrite", *MLP_ARGS, "--out", str(p)]), SaveError,
           lambda: (torch, "save")),
    Writer("cli export --out", ".pt2", lambda p, a: _command(["export", str(a.saved), "-i", "2x8", "--out", str(p)]),
           ExportError, _writes_with_torch_export),
    Writer("cli inspect --picture", ".png",
           lambda p, a: _command(["inspect", "fxwormhole.zoo:MLP", "-i", "2x8", "--picture", str(p)]), SaveError,
           _savefig, needs=("matplotlib",)),
]


def _cli_argv(writer: Writer, path: Path, art) -> list[str]:
    return {"cli rewrite --out": ["rewrite", *MLP_ARGS, "--out", str(path)],
            "cli export --out": ["export", str(art.saved), "-i", "2x8", "--out", str(path)],
            "cli inspect --picture": ["inspect", "fxwormhole.zoo:MLP", "-i", "2x8", "--picture", str(path)]}[writer.name]


# ------------------------------------------------------------------------------------------- faults
def _write_part_then(exc: BaseException):
    """A stand-in for a library writer that gets part of the file out and then fails."""
    def write(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"PARTIAL")
            f.flush()
        else:
            Path(f).write_bytes(b"PARTIAL")
        raise exc
    return write


def _deny_create_in(directory: Path, monkeypatch) -> None:
    real = os.open

    def denied(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).parent == directory:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# torch's C++ zip writer reports a full disk this way
TORCH_WRITE_FAILED = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                                  "file data/0: file write failed")

# id -> (inject(writer, target, monkeypatch), phrases the message must hold)
FAULTS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "disk full while writing": (
        lambda w, t, mp: mp.setattr(*w.writes_with(), _write_part_then(ENOSPC)),
        ("No space left on device", "is unchanged", "free space")),
    "writer raises while writing": (
        lambda w, t, mp: mp.setattr(*w.writes_with(), _write_part_then(TORCH_WRITE_FAILED)),
        ("RuntimeError", "file write failed", "is unchanged", "disk space")),
    "disk full at fsync": (
        lambda w, t, mp: mp.setattr(os, "fsync", _raise(ENOSPC)),
        ("No space left on device", "is unchanged", "free space")),
    "permission denied creating the file": (
        lambda w, t, mp: _deny_create_in(t.parent, mp),
        ("Permission denied", "is unchanged", "permissions")),
    "permission denied renaming into place": (
        lambda w, t, mp: mp.setattr(os, "replace", _raise(PermissionError(errno.EACCES, os.strerror(errno.EACCES)))),
        ("Permission denied", "is unchanged", "permissions")),
}


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None) for p in directory.rglob("*")}


def _params(with_cli_only: bool = False):
    for w in WRITERS:
        if with_cli_only and w.name.split()[0] != "cli":
            continue
        marks = [pytest.mark.skipif(not _has(*w.needs), reason=f"needs {', '.join(w.needs)}")] if w.needs else []
        yield pytest.param(w, id=w.name, marks=marks)


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
@pytest.mark.parametrize("writer", list(_params()))
def test_a_failed_write_keeps_the_old_file_and_raises_a_typed_error(writer, fault, art, traced_once, tmp_path,
                                                                   monkeypatch):
    target = tmp_path / f"model{writer.suffix}"
    target.write_bytes(OLD)
    before = _snapshot(tmp_path)
    inject, phrases = FAULTS[fault]
    inject(writer, target, monkeypatch)
    with pytest.raises(FxWormholeError) as info:
        writer.write(target, art)
    monkeypatch.undo()
    assert type(info.value) is writer.error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert str(target) in message, message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert _snapshot(tmp_path) == before, "the old file changed or a temporary file was left behind"


@pytest.mark.parametrize("writer", list(_params()))
def test_ctrl_c_while_writing_keeps_the_old_file(writer, art, traced_once, tmp_path, monkeypatch):
    target = tmp_path / f"model{writer.suffix}"
    target.write_bytes(OLD)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(*writer.writes_with(), _write_part_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        writer.write(target, art)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("writer", list(_params()))
def test_a_missing_directory_or_a_directory_target_fail_before_any_work(writer, art, tmp_path, monkeypatch):
    # Neither case may trace, transform or draw anything: the path is checked first.
    monkeypatch.setattr(EXPORT, "export_program", _raise(AssertionError("traced before checking the path")))
    monkeypatch.setattr("fxwormhole.api.transform", _raise(AssertionError("transformed before checking the path")))
    monkeypatch.setattr("fxwormhole.cli.inspect_cmd.inspect_model", _raise(AssertionError("captured before checking")))
    (tmp_path / f"folder{writer.suffix}").mkdir()
    (tmp_path / f"folder{writer.suffix}" / "keep.txt").write_bytes(OLD)
    before = _snapshot(tmp_path)
    cases = {tmp_path / "missing" / f"model{writer.suffix}": ("does not exist", "mkdir -p"),
             tmp_path / f"folder{writer.suffix}": ("is a directory", "pass the path of a file")}
    for target, phrases in cases.items():
        with pytest.raises(FxWormholeError) as info:
            writer.write(target, art)
        assert type(info.value) is writer.error
        message = str(info.value)
        assert str(target) in message and all(p in message for p in phrases), message
    assert _snapshot(tmp_path) == before, "a folder was created or a file changed"


@pytest.mark.parametrize("writer", list(_params(with_cli_only=True)))
def test_cli_faults_are_one_line_and_exit_2(writer, art, traced_once, tmp_path, monkeypatch, capsys):
    target = tmp_path / f"model{writer.suffix}"
    target.write_bytes(OLD)
    monkeypatch.setattr(*writer.writes_with(), _write_part_then(ENOSPC))
    code = main(_cli_argv(writer, target, art))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fxwormhole: error: writing ") and "No space left" in err, err
    monkeypatch.setattr(*writer.writes_with(), _write_part_then(KeyboardInterrupt()))
    assert main(_cli_argv(writer, target, art)) == 130
    assert capsys.readouterr().err == "fxwormhole: interrupted\n"
    assert target.read_bytes() == OLD
    assert not list(tmp_path.glob(temp_name_pattern(target)))


def test_a_write_that_did_not_exist_before_leaves_nothing(art, traced_once, tmp_path, monkeypatch):
    target = tmp_path / "new.pt2"
    monkeypatch.setattr(torch.export, "save", _write_part_then(ENOSPC))
    with pytest.raises(ExportError, match="nothing was written to"):
        fxwormhole.export(art.net, art.x, target)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_replaces_its_file_only_after_the_artifact_loaded(art, traced_once, tmp_path, monkeypatch, capsys):
    target = tmp_path / "model.pt2"
    target.write_bytes(OLD)
    monkeypatch.setattr(EXPORT, "load", _raise(ExportError("the artifact does not load")))
    assert main(["export", str(art.saved), "-i", "2x8", "--out", str(target)]) == 2
    assert "the artifact does not load" in capsys.readouterr().err
    assert _snapshot(tmp_path) == {"model.pt2": OLD}


def test_inspect_after_that_fails_leaves_no_picture(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr("fxwormhole.api.transform", _raise(PlacementError("no place for a wormhole")))
    code = main(["inspect", "fxwormhole.zoo:MLP", "-i", "2x8", "--picture", str(tmp_path / "g.png"), "--after"])
    assert code == 2 and "no place for a wormhole" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- fxwormhole.save (a folder)
#: the three files of a save: (module, attribute) of the call that writes it, the argument that is the path
SAVE_FILES = {"weights": ("safetensors.torch", "save_file", 1), "optimizer state": ("torch", "save", 1),
              "model configuration": ("pathlib", "Path.write_text", 0)}


@pytest.fixture
def earlier_save(tmp_path):
    """A folder holding a save (with optimizer state) and what the model it holds computes; then the
    model changed, so a second save into the folder would replace every file."""
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    net = fxwormhole.transform(zoo.MLP(hidden=6), (torch.randn(4, 8),), OPEN)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.randn(4, 8)
    net(x).square().sum().backward()
    opt.step()
    folder = tmp_path / "ckpt"
    fxwormhole.save(net, folder, optimizer=opt)
    with torch.no_grad():
        want = fxwormhole.load(folder, zoo.MLP(hidden=6)).eval()(x)
        next(net.parameters()).add_(1.0)
    return SimpleNamespace(net=net, opt=opt, x=x, folder=folder, want=want)


def _fail_writing(name: str, exc: BaseException, monkeypatch) -> None:
    """The call that writes save file ``name`` gets part of it out, then raises ``exc``."""
    module, attribute, path_arg = SAVE_FILES[name]
    *owners, leaf = attribute.split(".")
    owner = importlib.import_module(module)
    for part in owners:
        owner = getattr(owner, part)

    def write_part_then_fail(*args, **kwargs):
        Path(args[path_arg]).write_bytes(b"PARTIAL")
        raise exc

    monkeypatch.setattr(owner, leaf, write_part_then_fail)


WRITING_FAULTS = {"disk full while writing": ENOSPC, "writer raises while writing": TORCH_WRITE_FAILED,
                  "ctrl-c while writing": KeyboardInterrupt()}
#: (file, fault): every writing fault on every file; a fault of the file system hits the first file
SAVE_CASES = [(f, fault) for f in SAVE_FILES for fault in WRITING_FAULTS] + [
    ("weights", fault) for fault in ("disk full at fsync", "permission denied creating the file",
                                     "permission denied renaming into place")]


@pytest.mark.parametrize("file, fault", SAVE_CASES, ids=[f"{f}: {fault}" for f, fault in SAVE_CASES])
def test_a_failed_save_keeps_the_earlier_save_loadable(file, fault, earlier_save, monkeypatch):
    """A save replaces its files together: a fault while writing any of them (the weights, the
    optimizer state or the config, written in that order) leaves the earlier save in the folder
    byte-for-byte, and it still loads and computes what it did. Before, each file was replaced on its
    own: a full disk while writing the config left new weights next to the old config, a save that
    load refused (checksum mismatch) while the error said the config 'is unchanged'."""
    folder = earlier_save.folder
    before = _snapshot(folder)
    if fault in WRITING_FAULTS:
        _fail_writing(file, WRITING_FAULTS[fault], monkeypatch)
    else:
        FAULTS[fault][0](None, folder / "model.safetensors", monkeypatch)
    expected = KeyboardInterrupt if fault == "ctrl-c while writing" else SaveError
    with pytest.raises(expected) as info:
        fxwormhole.save(earlier_save.net, folder, optimizer=earlier_save.opt)
    monkeypatch.undo()
    if expected is SaveError:
        message = str(info.value)
        assert str(folder) in message and all(p in message for p in FAULTS[fault][1]), message
    assert _snapshot(folder) == before, "a file of the earlier save changed, or a temporary file was left"
    with torch.no_grad():
        torch.testing.assert_close(fxwormhole.load(folder, zoo.MLP(hidden=6)).eval()(earlier_save.x),
                                   earlier_save.want, rtol=0, atol=0)


def test_a_save_that_succeeds_replaces_every_file_and_loads(earlier_save):
    """The other side: the same save without a fault replaces the earlier one (weights and optimizer)."""
    fxwormhole.save(earlier_save.net, earlier_save.folder, optimizer=earlier_save.opt)
    with torch.no_grad():
        got = fxwormhole.load(earlier_save.folder, zoo.MLP(hidden=6)).eval()(earlier_save.x)
        torch.testing.assert_close(got, earlier_save.net.eval()(earlier_save.x), rtol=0, atol=0)
    assert not torch.equal(got, earlier_save.want)
    assert sorted(p.name for p in earlier_save.folder.iterdir()) == ["fxwormhole_config.json", "model.safetensors",
                                                                     "optimizer.pt"]


def test_atomic_files_renames_nothing_until_every_file_is_written(tmp_path, monkeypatch):
    a, b = tmp_path / "a.bin", tmp_path / "b.json"
    a.write_bytes(OLD)
    b.write_bytes(OLD)
    with pytest.raises(SaveError, match=r"writing the manifest to .*b\.json failed .*b\.json is unchanged; a\.bin "
                                        r"unchanged too"):
        with atomic_files() as files:
            with files.stage(a, what="the data") as tmp:
                tmp.write_bytes(b"new data")
            assert a.read_bytes() == OLD, "renamed before the set was complete"
            with files.stage(b, what="the manifest") as tmp:
                raise ENOSPC
    assert _snapshot(tmp_path) == {"a.bin": OLD, "b.json": OLD}
    # a rename that fails after an earlier one succeeded says which files were already replaced
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: real(s, d) if Path(d).name == "a.bin" else _raise(
        PermissionError(errno.EACCES, os.strerror(errno.EACCES)))())
    with pytest.raises(SaveError, match=r"b\.json is unchanged; already replaced: a\.bin"):
        with atomic_files() as files:
            for target in (a, b):
                with files.stage(target) as tmp:
                    tmp.write_bytes(b"new")
    monkeypatch.undo()
    assert _snapshot(tmp_path) == {"a.bin": b"new", "b.json": OLD}


# ----------------------------------------------------------------------------------- the helper
def test_atomic_write_flushes_before_it_renames_and_keeps_the_mode(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(OLD)
    target.chmod(0o640)
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and tmp.suffix == ".bin"
        tmp.write_bytes(b"new")
        assert target.read_bytes() == OLD, "the target must not change before the block ends"
    assert target.read_bytes() == b"new"
    assert calls[:2] == ["fsync", "replace"], calls  # the data is on disk before the rename
    assert calls.count("fsync") == 2, "the directory is flushed too (the rename itself)"
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_new_files_get_the_umask_mode_and_symlinks_are_kept(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_write(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    real = tmp_path / "real.bin"
    real.write_bytes(OLD)
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    with atomic_write(link) as tmp:
        tmp.write_bytes(b"through the link")
    assert link.is_symlink() and real.read_bytes() == b"through the link"


def test_atomic_write_passes_typed_errors_through_and_cleans_up(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(OLD)
    with pytest.raises(ExportError, match="raised by the writer itself"):
        with atomic_write(target, error=ExportError) as tmp:
            tmp.write_bytes(b"half")
            raise ExportError("raised by the writer itself")
    assert target.read_bytes() == OLD and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert issubclass(SaveError, OSError), "code that catches OSError around a save keeps working"


# ------------------------------------------------------------------------ damaged and modified .pt2
@pytest.fixture(scope="module")
def pt2(art, tmp_path_factory):
    path = tmp_path_factory.mktemp("archives") / "net.pt2"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(EXPORT, "export_program", lambda *a, **k: art.ep)
    try:
        fxwormhole.export(art.net, art.x, path)
    finally:
        monkeypatch.undo()
    return path


def _rewrite_archive(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None], add: dict | None = None) -> None:
    """Copy a zip record by record; ``edit(name, data)`` returns new data, or None to drop the record.
    Still a valid zip: CRCs are computed afresh, as a tool that swaps a blob would."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        top = zin.namelist()[0].partition("/")[0]
        for info in zin.infolist():
            data = edit(info.filename.partition("/")[2], zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(f"{top}/{name}", data)


def _flip_one_weight(data: bytes) -> bytes:
    values = torch.frombuffer(bytearray(data), dtype=torch.float32).clone()
    values[0] += 0.5
    return values.numpy().tobytes()


def _outputs_of(path: Path, x: tuple) -> torch.Tensor:
    with torch.no_grad():
        return torch.export.load(str(path)).module()(*x)


def test_an_unmodified_copy_loads_so_the_rewriter_is_not_the_fault(art, pt2, tmp_path):
    copy = tmp_path / "copy.pt2"
    _rewrite_archive(pt2, copy, lambda name, data: data)
    runner = fxwormhole.export.load(copy)
    with torch.no_grad():
        torch.testing.assert_close(runner(*art.x), art.want, atol=1e-5, rtol=1e-5)
    assert set(runner.meta["sha256"]) >= {"models/model.json", "data/weights/weight_0"}


def test_a_replaced_weight_blob_is_refused(art, pt2, tmp_path):
    bad = tmp_path / "bad.pt2"
    _rewrite_archive(pt2, bad, lambda n, d: _flip_one_weight(d) if n == "data/weights/weight_0" else d)
    # torch.export.load alone takes it and computes other numbers: the silent failure of row 4
    assert not torch.allclose(_outputs_of(bad, art.x), art.want, atol=1e-3)
    with pytest.raises(ExportError) as info:
        fxwormhole.export.load(bad)
    message = str(info.value)
    assert str(bad) in message and "data/weights/weight_0 (a weight) does not match its checksum" in message
    assert "re-export it with fxwormhole.export" in message


def test_a_modified_program_is_refused(pt2, tmp_path):
    bad = tmp_path / "bad.pt2"
    _rewrite_archive(pt2, bad, lambda n, d: d.replace(b'"tanh"', b'"relu"') if n == "models/model.json" else d)
    assert torch.export.load(str(bad)) is not None, "the edit must keep the archive loadable by torch"
    with pytest.raises(ExportError, match=r"models/model.json \(the program\) does not match its checksum"):
        fxwormhole.export.load(bad)


@pytest.mark.parametrize("case, edit, add, phrase", [
    ("corrupt fxwormhole.json", lambda n, d: b"{not json" if n == "extra/fxwormhole.json" else d, None,
     "its fxwormhole.json is not valid JSON"),
    ("fxwormhole.json not an object", lambda n, d: b"[1, 2]" if n == "extra/fxwormhole.json" else d, None,
     "holds a JSON list, not an object"),
    ("a record removed", lambda n, d: None if n == "data/weights/weight_1" else d, None,
     "data/weights/weight_1 (a weight) is missing"),
    ("a record added", lambda n, d: d, {"data/weights/weight_99": b"\0" * 16},
     "it holds data/weights/weight_99, which fxwormhole.export did not write"),
    ("two records of one name", lambda n, d: d, {"data/weights/weight_0": b"\0" * 16},
     "two records named 'data/weights/weight_0'"),
])
def test_damaged_archives_are_refused(pt2, tmp_path, case, edit, add, phrase):
    bad = tmp_path / "bad.pt2"
    with _quiet_duplicate_warning():
        _rewrite_archive(pt2, bad, edit, add)
    with pytest.raises(ExportError) as info:
        fxwormhole.export.load(bad)
    message = str(info.value)
    assert str(bad) in message and phrase in message and "re-export it" in message, message


def test_truncated_archive_is_refused(pt2, tmp_path):
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(pt2.read_bytes()[: pt2.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"cut.pt2: not a readable torch.export archive .*re-export it"):
        fxwormhole.export.load(bad)


def test_a_bit_flip_that_breaks_the_zip_crc_is_refused(pt2, tmp_path):
    data = bytearray(pt2.read_bytes())
    with zipfile.ZipFile(pt2) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/weights/weight_0"))
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's own
    data[info.header_offset + 30 + name_len + extra_len] ^= 0xFF  # first byte of the weight
    bad = tmp_path / "flipped.pt2"
    bad.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="flipped.pt2: not a readable torch.export archive"):
        fxwormhole.export.load(bad)


@pytest.mark.parametrize("suffix", [".pt2", pytest.param(".onnx", marks=pytest.mark.skipif(
    not _has("onnx", "onnxruntime"), reason="needs the onnx extra"))])
def test_a_file_that_cannot_be_read_is_a_typed_error(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"net{suffix}"
    path.write_bytes(b"PK")
    real = io.open

    def denied(file, *args, **kwargs):  # zipfile and Path.read_bytes open files through io.open
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", denied)
    with pytest.raises(ExportError, match=r"net\.(pt2|onnx): cannot read it \(Permission denied\); check that the"):
        fxwormhole.export.load(path)


def test_archives_without_a_checksum_still_load_with_a_warning(art, pt2, tmp_path):
    older = tmp_path / "older.pt2"  # an fxwormhole.json from before checksums
    _rewrite_archive(pt2, older, lambda n, d: json.dumps({k: v for k, v in json.loads(d).items() if k != "sha256"}).encode()
                     if n == "extra/fxwormhole.json" else d)
    plain = tmp_path / "plain.pt2"  # plain torch.export.save: no fxwormhole.json at all
    torch.export.save(art.ep, str(plain))
    for path, why in ((older, "carries no checksum"), (plain, "no fxwormhole.json")):
        with pytest.warns(UserWarning, match=f"{path.name}: .*{why}.*re-export it with fxwormhole.export"):
            runner = fxwormhole.export.load(path)
        with torch.no_grad():
            torch.testing.assert_close(runner(*art.x), art.want, atol=1e-5, rtol=1e-5)


@contextlib.contextmanager
def _quiet_duplicate_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Duplicate name", category=UserWarning)
        yield


# ----------------------------------------------------------------------- damaged and modified .onnx
needs_onnx = pytest.mark.skipif(not _has("onnx", "onnxscript", "onnxruntime"), reason="needs the onnx extra")


@pytest.fixture(scope="module")
def onnx_file(art, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    EXPORT._write_onnx(type(art.proto).FromString(art.proto.SerializeToString()), path)
    return path


def _edit_onnx(src: Path, dst: Path, edit: Callable) -> None:
    import onnx

    model = onnx.load(str(src))
    edit(model)
    dst.write_bytes(model.SerializeToString())


def _onnx_outputs(path: Path, x: tuple):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x[0].numpy()})[0]


@needs_onnx
def test_onnx_round_trip_verifies(art, onnx_file):
    runner = fxwormhole.export.load(onnx_file)
    with torch.no_grad():
        torch.testing.assert_close(runner(*art.x), art.want, atol=1e-5, rtol=1e-5)


def _bump_initializer(model):
    import onnx.numpy_helper as nh

    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = nh.to_array(big).copy()
    values.flat[0] += 0.5
    big.CopyFrom(nh.from_array(values, big.name))


def _nodes(graph):
    """Every node of an ONNX graph, those in Loop / If bodies included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _nodes(attr.g)


def _tanh_to_relu(model):
    tanh = [n for n in _nodes(model.graph) if n.op_type == "Tanh"]
    assert tanh, "the MLP's activations should be Tanh nodes"
    for node in tanh:
        node.op_type = "Relu"


def _rename_checksum_key(model):
    for p in model.metadata_props:
        p.key = "something.else"


def _garble_checksum(model):
    for p in model.metadata_props:
        p.value = "{not json"


@needs_onnx
@pytest.mark.parametrize("case, edit, phrase", [
    ("a weight changed", _bump_initializer, "the weights (initializers) do not match the checksum"),
    ("the program changed", _tanh_to_relu, "the program (graph) do not match the checksum"),
    ("checksum entry is not JSON", _garble_checksum, "its checksum entry is not valid JSON"),
])
def test_modified_onnx_models_are_refused(art, onnx_file, tmp_path, case, edit, phrase):
    bad = tmp_path / "bad.onnx"
    _edit_onnx(onnx_file, bad, edit)
    if case != "checksum entry is not JSON":  # onnxruntime alone runs it and computes other numbers
        assert not torch.allclose(torch.from_numpy(_onnx_outputs(bad, art.x)), art.want, atol=1e-3)
    with pytest.raises(ExportError) as info:
        fxwormhole.export.load(bad)
    message = str(info.value)
    assert str(bad) in message and phrase in message and "re-export it" in message, message


@needs_onnx
def test_damaged_or_unchecked_onnx_files(art, onnx_file, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(ExportError, match=r"cut.onnx: not a readable ONNX model .*re-export it"):
        fxwormhole.export.load(cut)
    plain = tmp_path / "plain.onnx"
    _edit_onnx(onnx_file, plain, _rename_checksum_key)
    with pytest.warns(UserWarning, match="plain.onnx: it carries no checksum"):
        runner = fxwormhole.export.load(plain)
    with torch.no_grad():
        torch.testing.assert_close(runner(*art.x), art.want, atol=1e-5, rtol=1e-5)
