"""The `moemesh up` terminal: many threads (one per child's output, the supervisor, the demo request) write to
it, and what each writes arrives whole.

* `line(text)` writes one whole line (stderr: the children's logs) in one write under a lock, so two children's
  lines never tear into one;
* `say(text)` the same on stdout (the supervisor's own messages);
* `stream()` opens a block of streamed text (the demo's tokens, written as they come, without newlines):
  lines logged meanwhile wait and follow once the block ends, so none lands inside the text.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, TextIO

MAX_HELD_LINES = 10_000  # log lines kept while a stream is open; beyond, the oldest are dropped (and counted)


class Console:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._lock = threading.Lock()
        self._streaming = False
        self._held: list[tuple[TextIO, str]] = []
        self._dropped = 0

    def line(self, text: str) -> None:
        """One log line (a trailing newline is added; newlines inside stay)."""
        self._line(self.err, text)

    def say(self, text: str) -> None:
        self._line(self.out, text)

    def _line(self, stream: TextIO, text: str) -> None:
        with self._lock:
            if not self._streaming:
                self._write(stream, text + "\n")
                return
            if len(self._held) >= MAX_HELD_LINES:
                self._held.pop(0)
                self._dropped += 1
            self._held.append((stream, text))

    @contextlib.contextmanager
    def stream(self) -> Iterator[Callable[[str], None]]:
        """`with console.stream() as write: write("some "); write("text")` — the block ends with a newline,
        then the lines held meanwhile follow."""
        with self._lock:
            self._streaming = True

        def write(text: str) -> None:
            with self._lock:
                self._write(self.out, text)

        try:
            yield write
        finally:
            with self._lock:
                self._write(self.out, "\n")
                held, self._held, self._streaming = self._held, [], False
                if self._dropped:
                    self._write(self.err, f"({self._dropped} log lines dropped while the text streamed)\n")
                    self._dropped = 0
                for stream, text in held:
                    self._write(stream, text + "\n")

    @staticmethod
    def _write(stream: TextIO, text: str) -> None:
        stream.write(text)
        stream.flush()


def pump_lines(
    source: IO[str], prefix: str, console: Console, keep: Callable[[str], None] | None = None
) -> None:
    """Copies `source` (a child's output, text mode) to `console` line by line, each as `prefix + line`; a
    last line without its newline still arrives whole. `keep(line)` sees every line (error messages)."""
    for raw in source:
        text = raw.rstrip("\r\n")
        if keep is not None:
            keep(text)
        console.line(prefix + text)
