"""The live line a running grid shows: units finished / running / waiting, failures, and which units run now."""

from __future__ import annotations

import time

from rich.console import Console


class GridProgress:
    """Prints one status line whenever a unit starts or ends (plain lines: readable in CI logs and `ray job logs`)."""

    def __init__(self, console: Console, total_todo: int):
        self.console, self.total, self.started = console, total_todo, time.monotonic()
        self.last = ""

    def __call__(self, run, running: list[str]) -> None:
        done = len(run.ran)
        minutes = (time.monotonic() - self.started) / 60
        waiting = self.total - done - len(run.failed) - len(run.blocked) - len(running)
        line = (f"[{minutes:5.1f} min] {done}/{self.total} units done, {len(running)} running, {waiting} waiting"
                + (f", [red]{len(run.failed)} failed[/]" if run.failed else "")
                + (f", {len(run.blocked)} blocked" if run.blocked else ""))
        if running:
            line += f"; running: {', '.join(running[:3])}" + (" …" if len(running) > 3 else "")
        if line != self.last:
            self.console.print(line, highlight=False)
            self.last = line
