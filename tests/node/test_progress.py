"""The progress display: a tqdm bar on a terminal, plain lines anywhere else."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st

from node.progress import PlainProgress, TerminalProgress, progress_display


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_pipe_gets_plain_lines_and_a_terminal_a_bar():
    pipe = io.StringIO()
    display = progress_display(4, desc="fedbus", unit="round", stream=pipe)
    assert isinstance(display, PlainProgress)
    terminal = Terminal()
    bar = progress_display(4, desc="fedbus", unit="round", stream=terminal)
    assert isinstance(bar, TerminalProgress)
    bar.set_status("round 1 training, 5 online")
    bar.message("round 1/4: 5 envoys, secure")
    bar.update(1)
    bar.close()
    out = terminal.getvalue()
    assert "\r" in out and "1/4" in out and "round 1 training, 5 online" in out
    assert "round 1/4: 5 envoys, secure\n" in out
    # --quiet on a terminal: no bar, the messages only.
    quiet = Terminal()
    display = progress_display(4, desc="fedbus", quiet=True, stream=quiet)
    assert isinstance(display, PlainProgress)
    display.update(4)
    display.message("done")
    assert lines(quiet) == ["done"]


def test_one_message_per_round_and_no_percentages_besides():
    out = io.StringIO()
    display = progress_display(20, desc="fedbus", unit="round", stream=out)
    for r in range(1, 21):
        display.message(f"round {r}/20")
        display.update(1)
    assert lines(out) == [f"round {r}/20" for r in range(1, 21)]


def test_work_without_messages_reports_every_tenth_with_its_status():
    out = io.StringIO()
    display = progress_display(100, desc="ig vs cvb", stream=out)
    for i in range(100):
        display.set_status(f"loss={1 / (i + 1):.3f}")
        display.update(1)
    got = lines(out)
    assert len(got) == 10
    assert got[0] == "ig vs cvb:  10% (10/100 it), loss=0.100"
    assert got[-1].startswith("ig vs cvb: 100% (100/100 it)")


def test_quiet_keeps_messages_only():
    out = io.StringIO()
    display = progress_display(10, desc="x", quiet=True, stream=out)
    display.update(5)
    display.message("half way")
    display.update(5)
    assert lines(out) == ["half way"]


@given(steps=st.lists(st.integers(1, 30), min_size=1, max_size=40))
def test_plain_lines_are_few_ordered_and_end_at_the_total(steps):
    total = sum(steps)
    out = io.StringIO()
    display = PlainProgress(total, "job", "it", out, quiet=False)
    for n in steps:
        display.update(n)
    got = lines(out)
    assert 1 <= len(got) <= 10  # at most one line per tenth, however the work arrives
    done = [int(line.split("(")[1].split("/")[0]) for line in got]
    assert done == sorted(done) and done[-1] == total
    assert got[-1].startswith("job: 100%")
