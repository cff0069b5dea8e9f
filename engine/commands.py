"""The engine thread's mailbox: work the event loop hands it, run between
two steps, and what becomes of that work if the engine dies.

Once the engine died no command is queued any more, and every command still
queued gets its `on_dead` instead of running: whoever waits on a command
always hears back, from the command or from the engine's death."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass


class EngineDeadError(RuntimeError):
    """The engine thread died; nothing more will run on it."""


def _ignore(message: str) -> None:
    pass


@dataclass(slots=True)
class Command:
    run: Callable[[], None]  # on the engine thread, between steps
    on_dead: Callable[[str], None]  # instead of run, if the engine died first


class Mailbox:
    def __init__(self) -> None:
        self.error: str | None = None  # set when the engine died
        self.wake = threading.Event()  # set by every command (the thread may sleep on it)
        self._queue: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._death = threading.Lock()  # orders submit against the death

    def submit(self, run: Callable[[], None], on_dead: Callable[[str], None] = _ignore) -> None:
        """Queue `run` for the engine thread; if the engine is dead, or dies
        before running it, `on_dead(error)` runs instead."""
        with self._death:
            if self.error is None:
                self._queue.put(Command(run, on_dead))
                self.wake.set()
                return
        on_dead(self.error)

    def run_all(self) -> None:
        """On the engine thread: every command queued so far."""
        while True:
            try:
                command = self._queue.get_nowait()
            except queue.Empty:
                return
            command.run()

    def die(self, message: str) -> None:
        """The engine is dead: refuse new commands, and end the queued ones."""
        with self._death:
            self.error = message
        while True:
            try:
                command = self._queue.get_nowait()
            except queue.Empty:
                return
            command.on_dead(message)
