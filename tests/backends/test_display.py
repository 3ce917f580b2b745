"""JobStatusDisplay output in terminals, plain streams and notebooks."""

from __future__ import annotations

import io

import pytest

from interlace.backends.display import JobStatusDisplay, ansi_to_html, format_elapsed, supports_color


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_terminal_line_is_rewritten_in_place():
    out = Tty()
    display = JobStatusDisplay(stream=out, color=False)
    display.update("j1", "RECEIVED", "ok")
    display.update("j1", "QUEUED", "Next in the queue.")
    display.update()
    display.update("j1", "RUNNING")
    display.update("j1", "LOG", "hello")
    display.update()
    display.update("j1", "COMPLETED")
    text = out.getvalue()
    frames = text.split("\r\x1b[K")[1:]
    assert frames[0].startswith("◉ [j1] RECEIVED   (") and frames[0].endswith(") ok")
    assert frames[1][0] in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" and frames[1][0] != frames[2][0]  # spinner advances
    assert frames[4] == "ℹ [j1] LOG        hello\n"  # LOG stays, no elapsed time
    assert "RUNNING" in frames[5]  # a refresh after LOG shows the state again
    assert frames[6].startswith("✓ [j1] COMPLETED  (") and frames[6].endswith("\n")
    assert text.count("\n") == 2  # only LOG and the final line end lines


def test_verbose_keeps_each_state_on_its_own_line():
    out = Tty()
    display = JobStatusDisplay(stream=out, verbose=True, color=False)
    for status in ("RECEIVED", "QUEUED", "RUNNING", "COMPLETED"):
        display.update("j", status)
    lines = [line.split("\r\x1b[K")[-1] for line in out.getvalue().split("\n") if line]
    assert [line.split()[2] for line in lines] == ["RECEIVED", "QUEUED", "RUNNING", "COMPLETED"]
    assert "s)" in lines[0] and "." in lines[0].split("(")[1]  # precise time in verbose mode


def test_plain_stream_prints_each_change_once_without_control_codes():
    out = io.StringIO()
    display = JobStatusDisplay(stream=out)
    display.update("j", "QUEUED", "Position 2 in the queue.")
    display.update()
    display.update("j", "QUEUED", "Next in the queue.")
    display.update("j", "ERROR")
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert text.splitlines()[0].startswith("◎ [j] QUEUED")
    assert len(text.splitlines()) == 3


def test_disabled_is_silent():
    out = Tty()
    display = JobStatusDisplay(enabled=False, stream=out)
    display.update("j", "RUNNING")
    display.update()
    with display.download(10) as advance:
        advance(10)
    assert out.getvalue() == ""


def test_colours_follow_environment(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    assert supports_color(Tty()) and not supports_color(io.StringIO())
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert supports_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not supports_color(Tty())
    monkeypatch.delenv("NO_COLOR")
    out = Tty()
    JobStatusDisplay(stream=out).update("j", "ERROR")
    assert "\x1b[31m" in out.getvalue()  # red


@pytest.mark.parametrize("seconds, precise, text", [
    (1.234, False, "1.2s"), (1.234, True, "1.234s"), (65.5, False, "1m 5.5s"), (125, False, "2m 5.0s"), (135, False, "2m 15s"),
    (3 * 3600 + 120, False, "3h 2m"),
])
def test_elapsed_format(seconds, precise, text):
    assert format_elapsed(seconds, precise) == text


def test_notebook_html_updates_one_display():
    shown = []

    class Handle:
        def update(self, content):
            shown.append(("update", content))

    def display_fn(content, display_id):
        assert display_id is True
        shown.append(("display", content))
        return Handle()

    display = JobStatusDisplay(notebook=True, html_display=display_fn)
    display.update("j", "QUEUED", "<b>")
    display.update()
    display.update("j", "RUNNING")
    display.update("j", "COMPLETED")
    kinds = [kind for kind, _ in shown]
    assert kinds == ["display", "update", "update", "display"]
    first = str(getattr(shown[0][1], "data", shown[0][1]))
    assert "&lt;b&gt;" in first and "<pre" in first and "\x1b" not in first


def test_ansi_to_html():
    markup = ansi_to_html("\x1b[32m\x1b[1mOK\x1b[0m <x>")
    assert "#2ecc71" in markup and "font-weight:bold" in markup and "&lt;x&gt;" in markup


def test_styles_cover_exactly_the_states_the_server_sends():
    """One list of states (`contract.http.JobStatus`): the display knows no state the server
    never sends (nnsight's DISPATCHED, STREAM) and misses none it does."""
    from interlace.backends import display as display_module
    from interlace.contract.http import PENDING, TERMINAL, JobStatus

    assert set(display_module.STYLES) == {s.value for s in JobStatus}
    assert display_module.ACTIVE <= PENDING and not display_module.ACTIVE & TERMINAL
    out = io.StringIO()
    JobStatusDisplay(stream=out, color=False).update("j", "EXPIRED", "gone")
    assert out.getvalue().startswith("✗ [j] EXPIRED")
