"""`moemesh up`'s terminal: children's lines arrive whole (fake children write partial lines, several at once),
and log lines never land inside the demo's streamed text."""

from __future__ import annotations

import io
import subprocess
import sys
import threading

from moemesh.console import Console, pump_lines

# Writes each line in pieces, flushing between them, with pauses: another child's output arrives meanwhile.
FAKE_CHILD = r"""
import sys, time
name = sys.argv[1]
for i in range(6):
    for piece in (f"{name} line {i} ", "in ", "three pieces"):
        sys.stdout.write(piece); sys.stdout.flush(); time.sleep(0.01)
    sys.stdout.write("\n"); sys.stdout.flush()
sys.stdout.write(f"{name} last line without newline"); sys.stdout.flush()
"""


class _Locked(io.StringIO):
    """A terminal stand-in that records each write() separately."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _run_children(console: Console, names: list[str]) -> None:
    children = [subprocess.Popen([sys.executable, "-c", FAKE_CHILD, name], stdout=subprocess.PIPE, text=True,
                                 bufsize=1) for name in names]  # fmt: skip
    pumps = [threading.Thread(target=pump_lines, args=(c.stdout, f"[{n}] ", console)) for c, n in zip(children, names, strict=True)]  # fmt: skip
    for thread in pumps:
        thread.start()
    for thread in pumps:
        thread.join(timeout=60)
    for child in children:
        assert child.wait(timeout=60) == 0


def test_children_lines_arrive_whole():
    out, err = _Locked(), _Locked()
    console = Console(out, err)
    names = ["prefill-0", "decode-0", "decode-1"]
    _run_children(console, names)
    lines = err.getvalue().splitlines()
    expected = {f"[{n}] {n} line {i} in three pieces" for n in names for i in range(6)}
    expected |= {f"[{n}] {n} last line without newline" for n in names}
    assert sorted(lines) == sorted(expected)  # no torn line, none lost, none merged
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in err.writes)  # one write per line


def test_log_lines_wait_until_the_streamed_text_ends():
    out, err = _Locked(), _Locked()
    term = _Locked()  # what a user sees: stdout and stderr on one terminal
    out.write = err.write = term.write  # type: ignore[method-assign]
    console = Console(out, err)
    text = ["To Sherlock", " Holmes", " she is", " always", " the woman"]
    streaming, children_done = threading.Event(), threading.Event()

    def demo() -> None:
        with console.stream() as write:
            write("--- demo:\n")
            streaming.set()
            for piece in text:
                write(piece)
                threading.Event().wait(0.02)
            children_done.wait(60)  # every child line below is logged while the text streams

    thread = threading.Thread(target=demo)
    thread.start()
    streaming.wait(10)
    _run_children(console, ["prefill-0"])
    children_done.set()
    thread.join(10)
    shown = term.getvalue()
    assert shown.startswith(
        "--- demo:\nTo Sherlock Holmes she is always the woman\n"
    )  # the text in one piece
    after = shown.splitlines()[2:]
    assert len(after) == 7 and all(line.startswith("[prefill-0] prefill-0 ") for line in after)
    console.line("after")  # once the stream ended, lines go straight out
    assert term.getvalue().endswith("after\n")
