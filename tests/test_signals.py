"""Stops from outside: SIGTERM (``kill``, a job scheduler) and SIGINT (Ctrl-C) while cspify
writes its files end the command with 130 or 143, one error line and a hint, and leave no
file behind, not even a hidden temporary one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cspify.cli import main
from cspify.cli.exits import Interrupted, stop_on_signals
from cspify.files import Outputs

# The model file makes the last file cspify writes (the JSON report) slow: it writes the
# report, touches a marker file and sleeps, so the test knows every other target (-o,
# --export-dir, --onnx) sits staged beside its target when the signal comes.
SLOW_WRITER = textwrap.dedent("""\
    import json, os, pathlib, time
    import torch
    import torch.nn as nn

    _dump = json.dump


    def _slow_dump(obj, f, *args, **kwargs):
        _dump(obj, f, *args, **kwargs)
        pathlib.Path(os.environ["CSPIFY_TEST_MARKER"]).write_text("writing")
        time.sleep(120)


    json.dump = _slow_dump


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.f(x))


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.layer = nn.Sequential(Block(8), Block(8))

        def forward(self, x):
            return self.layer(self.stem(x))


    def example_inputs():
        return torch.randn(1, 3, 16, 16)
""")


def _default_signals() -> None:
    """A child started from a shell's background job would ignore SIGINT: not this one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_sigterm_and_sigint_while_writing_leave_nothing_and_exit_143_and_130(tmp_path):
    model = tmp_path / "slow.py"
    model.write_text(SLOW_WRITER)
    runs = {}
    onnx = ["--onnx", "m.onnx"] if _can_export_onnx() else []
    for signum, extra in ((signal.SIGTERM, onnx), (signal.SIGINT, [])):  # both at once: half the wall time
        work = tmp_path / signum.name
        work.mkdir()
        marker = tmp_path / f"{signum.name}.marker"
        env = {**os.environ, "CSPIFY_TEST_MARKER": str(marker), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cspify", "convert", str(model), "-o", "m.pt", "--export-dir", "csp", *extra,
             "--json", "r.json", "-q"],
            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_default_signals,
        )
        runs[signum] = (proc, work, marker, extra)
    try:
        for signum, (proc, work, marker, extra) in runs.items():
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert proc.poll() is None, f"{signum.name} run ended early: {proc.communicate()}"
                assert time.monotonic() < deadline, "the slow write never started"
                time.sleep(0.05)
            staged = sorted(p.name for p in work.iterdir())
            assert len(staged) == 3 + bool(extra) and all(n.startswith(".cspify-") for n in staged), staged
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 128 + signum, f"{signum.name}: rc {proc.returncode}\n{err}"
            assert sorted(os.listdir(work)) == [], f"{signum.name} left {os.listdir(work)}"
            lines = err.splitlines()
            assert len(lines) == 2 and lines[0].startswith("error: interrupted by ") and signum.name in lines[0], err
            assert lines[1].startswith("hint: ") and "Traceback" not in err and "Aborted" not in err
            assert out == "", "no report after a stop"
    finally:
        for proc, *_ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _can_export_onnx() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- the pieces, in this process


def test_an_interrupt_while_loading_is_one_error_line_and_130(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text("raise KeyboardInterrupt\n")
    result = CliRunner().invoke(main, ["convert", "m.py", "-o", "m.pt", "-q"])
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[0] == "error: interrupted by Ctrl-C (SIGINT)."
    assert result.stderr.splitlines()[1].startswith("hint: ") and sorted(os.listdir(tmp_path)) == ["m.py"]


def test_stop_on_signals_raises_interrupted_and_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as info:
        with stop_on_signals():
            signal.raise_signal(signal.SIGTERM)
            time.sleep(5)  # the handler interrupts the sleep
    assert info.value.exit_code == 143 and isinstance(info.value, KeyboardInterrupt)
    assert {s: signal.getsignal(s) for s in before} == before


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_during_the_renames_waits_until_every_target_is_in_place(tmp_path, monkeypatch):
    """Outputs holds SIGINT/SIGTERM while it moves targets into place: all land, then the stop."""
    import cspify.files as files

    move = files._move_into_place

    def move_and_signal(tmp, target):
        move(tmp, target)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(files, "_move_into_place", move_and_signal)
    with pytest.raises(Interrupted):
        with stop_on_signals():
            with Outputs() as out:
                out.file(str(tmp_path / "a.txt"), lambda f: f.write("a"))
                out.folder(str(tmp_path / "d"), lambda d: Path(d, "x").write_text("x"))
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "d"]
