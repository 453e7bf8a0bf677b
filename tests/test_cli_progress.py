"""Progress bars (fxwormhole.cli.progress): one line on a terminal, with warnings above it; nothing
on a pipe or a log file.

Reference: a small terminal emulator replays what a real pseudo-terminal received (carriage
returns, erase-line, cursor-up) into the screen a user would see.
"""
from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

from fxwormhole.cli.progress import progress

pytest.importorskip("tqdm")
ROOT = Path(__file__).resolve().parents[1]


def _screen(raw: str) -> list[str]:
    """The lines on screen after ``raw`` (enough of a VT100 for tqdm's bar)."""
    lines, row, col = [""], 0, 0
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\x1b":
            m = re.match(r"\x1b\[(\d*)([A-Za-z])", raw[i:])
            code, n = m.group(2), int(m.group(1) or 1)
            if code == "K":
                lines[row] = lines[row][:col]
            elif code == "A":
                row = max(0, row - n)
            i += len(m.group(0))
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            col = 0
            if row == len(lines):
                lines.append("")
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1:]
            col += 1
        i += 1
    return [line.rstrip() for line in lines]


SCRIPT = """
import time, warnings
from fxwormhole.cli.progress import progress
for i in progress(range(30), total=30, desc="train"):
    time.sleep(0.02)
    if i in (5, 20):
        warnings.warn(f"step {i}: the fixed point did not converge", RuntimeWarning)
    if i == 12:
        print(f"step {i}: a print")
print("done")
"""


def _run_on_a_terminal(tmp_path: Path) -> str:
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(SCRIPT))
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # rows, columns
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, str(script)], stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(main)
    assert proc.returncode == 0
    return b"".join(chunks).decode()


def test_the_bar_stays_on_one_line_with_warnings_and_prints_above_it(tmp_path):
    raw = _run_on_a_terminal(tmp_path)
    assert "%|" in raw  # a tqdm bar was drawn
    screen = [line for line in _screen(raw) if line]
    assert not any("%|" in line for line in screen), screen  # erased at the end
    warned = [line for line in screen if "RuntimeWarning: " in line]
    assert [re.sub(r".*RuntimeWarning: ", "", line) for line in warned] == [
        "step 5: the fixed point did not converge", "step 20: the fixed point did not converge"]
    assert all(line.startswith(str(tmp_path)) for line in warned), warned  # nothing before them
    assert "step 12: a print" in screen and screen[-1] == "done"
    assert len(screen) == 6, screen  # two warnings with their source lines, the print, done


def test_a_pipe_gets_no_bar(capsys):
    assert list(progress(range(50), total=50, desc="train")) == list(range(50))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert list(progress(iter(range(3)), desc="x", enabled=False)) == [0, 1, 2]
