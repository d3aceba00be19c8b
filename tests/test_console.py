"""The console: log lines and warnings never share a terminal line with the progress bar.

The end-to-end check runs ``igniter`` with the bar in a real terminal (a detached tmux
pane of 100 and 160 columns) and reads the screen back with ``tmux capture-pane``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
from conftest import igniter_env
from tqdm.std import tqdm

from igniter.console import TqdmConsoleHandler, route_warnings

# Pieces of Ignite's bar ("Epoch [1/2]: [3/16]  19%|##   | loss=2.3 [00:00<00:01]") or tqdm's default ("it/s]").
BAR = re.compile(r"%\||it/s\]|Epoch \[\d+/\d+\]")

# A handler that, mid-epoch with the bar drawn, warns and logs as a third-party library (Ignite) would.
PROBE = """
import logging
import warnings

from igniter.registry import event_handler_registry


@event_handler_registry("console_probe")
def console_probe():
    def handler(engine):
        warnings.warn("console probe warning", UserWarning)
        logging.getLogger("ignite.console_probe").warning("console probe foreign line")

    return handler
"""


def _live_bar(stream: io.StringIO) -> tqdm:
    bar = tqdm(total=10, file=stream, ncols=60, mininterval=0)
    bar.update(3)
    return bar


def test_log_line_clears_the_bar_then_redraws_it():
    out = io.StringIO()
    handler = TqdmConsoleHandler(out)
    handler.setFormatter(logging.Formatter("[igniter] %(message)s"))
    bar = _live_bar(out)
    try:
        handler.emit(logging.makeLogRecord({"msg": "epoch 1 validation: accuracy=0.5", "levelno": logging.INFO}))
        before, after = out.getvalue().split("[igniter] epoch 1 validation: accuracy=0.5\n")
        assert BAR.search(before) and before.endswith("\r"), repr(before)  # the bar was drawn, then its line cleared
        assert BAR.search(after), repr(after)  # and drawn again below the line
    finally:
        bar.close()


def test_without_a_bar_the_handler_is_a_plain_stream_handler():
    out = io.StringIO()
    handler = TqdmConsoleHandler(out)
    handler.emit(logging.makeLogRecord({"msg": "hello", "levelno": logging.INFO}))
    assert out.getvalue() == "hello\n"


def test_warnings_clear_the_bar_and_keep_their_display():
    err = io.StringIO()
    shown: list[str] = []

    def display(message, category, filename, lineno, file=None, line=None):
        shown.append(str(message))
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():  # restores warnings.showwarning afterwards
        warnings.simplefilter("always")
        warnings.showwarning = display
        route_warnings()
        route_warnings()  # once only: not wrapped twice
        bar = _live_bar(err)
        orig_stderr, sys.stderr = sys.stderr, err  # the display's default stream is stderr
        try:
            warnings.warn("probe warning", UserWarning)  # noqa: B028  (the test file is the location)
        finally:
            sys.stderr = orig_stderr
            bar.close()
    assert shown == ["probe warning"]
    before, after = err.getvalue().split("UserWarning: probe warning", 1)
    line_start = before.rsplit("\r", 1)[-1]  # what was written after the bar's line was cleared
    assert re.fullmatch(r"\S+test_console\.py:\d+: ", line_start), repr(before)
    assert BAR.search(after), repr(after)


class _Tmux:
    """A private tmux server (its own socket, no user config) holding one detached session."""

    def __init__(self, workdir: Path) -> None:
        self.socket = f"igniter-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.name = "run"
        conf = workdir / "tmux.conf"
        # remain-on-exit: the pane (and its screen) stays after the command exits.
        conf.write_text("set -g remain-on-exit on\nset -g history-limit 50000\nset -g status off\n")
        self.base = ["tmux", "-L", self.socket, "-f", str(conf)]

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=30, env=env)
        assert proc.returncode == 0, f"tmux {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def pane(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", self.name, fmt).strip()

    def screen(self) -> str:
        """The pane's history and screen, wrapped lines joined (``-J``): one string per printed line."""
        return self("capture-pane", "-p", "-J", "-S", "-", "-t", self.name)

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
@pytest.mark.parametrize(
    "columns, probe",
    [(100, False), (160, False), (100, True)],
    ids=["100-columns", "160-columns", "100-columns-mid-epoch-warnings"],
)
def test_progress_bar_in_a_real_terminal(tmp_path, columns, probe):
    """The bar of each epoch is cleared and every line printed while it is drawn starts a line
    of its own: the epoch's validation line (logged before the bar closes) and, with ``probe``,
    a Python warning, a foreign logger's warning and a handler's log line printed mid-epoch.
    (The probe run is separate: a line glued mid-epoch leaves the cursor on a fresh line, which
    would hide the validation line's glue.)"""
    run = tmp_path / "run"
    args = [
        "trainer.max_epochs=2",
        "logging.progress_bar=true",
        "data.train.subset=512",
        "logging.loggers=[]",
        f"output_dir={run}",
    ]
    if probe:  # the bar is drawn from iteration 1 of epoch 1 (16 iterations) until the epoch's end
        (tmp_path / "console_probe.py").write_text(PROBE)
        args += [
            "imports=[console_probe]",
            "handlers=[{name:console_probe,event:'ITERATION_COMPLETED(once=3)'},"
            "{name:log_state,event:'ITERATION_COMPLETED(once=5)',params:{message:probe}}]",
        ]
    env = igniter_env()
    env.pop("TMUX", None)  # a test run inside tmux: start our own server, not a nested client
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    tmux = _Tmux(tmp_path)
    try:
        # The shell records the exit status itself: tmux's #{pane_dead_status} was seen to stay empty.
        status_file = tmp_path / "exit_status"
        command = f"{shlex.join([sys.executable, '-m', 'igniter', *args])}; echo $? > {shlex.quote(str(status_file))}"
        tmux(
            "new-session", "-d", "-x", str(columns), "-y", "40", "-s", tmux.name, "-c", str(tmp_path), command, env=env
        )
        assert tmux.pane("#{window_width}") == str(columns)
        deadline = time.monotonic() + 300
        # Dead pane: the shell has exited and tmux has read all it printed (end of file).
        while tmux.pane("#{pane_dead}") != "1":
            assert time.monotonic() < deadline, f"igniter still running after 300 s:\n{tmux.screen()}"
            time.sleep(0.2)
        screen = tmux.screen()
    finally:
        tmux.kill()
    status = status_file.read_text().strip() if status_file.is_file() else "none"
    assert status == "0", f"exit status {status}:\n{screen}"
    lines = [ln.rstrip() for ln in screen.splitlines()]  # a cleared bar leaves blanks after a shorter line
    glued = [ln for ln in lines if "[igniter]" in ln and not ln.startswith("[igniter]")]
    bars = [ln for ln in lines if BAR.search(ln)]  # every bar is cleared: none is left in the history
    assert not glued and not bars, "lines glued to the bar:\n" + "\n".join(glued) + "\nbars left:\n" + "\n".join(bars)
    for epoch in (1, 2):
        own = [ln for ln in lines if f"epoch {epoch} validation" in ln]
        assert len(own) == 1 and own[0].startswith(f"[igniter] epoch {epoch} validation: accuracy="), screen
    assert any(ln.startswith("[igniter] summary:") for ln in lines), screen
    if not probe:
        return
    # Printed mid-epoch, with the bar drawn: a warning, a foreign logger's warning, a handler's log line.
    assert any(re.fullmatch(r"\S+console_probe\.py:\d+: UserWarning: console probe warning", ln) for ln in lines), (
        screen
    )
    assert "[igniter] console probe foreign line" in lines, screen
    assert any(ln.startswith("[igniter] probe epoch 1 iteration 5 ") for ln in lines), screen
