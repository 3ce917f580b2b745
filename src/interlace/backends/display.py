"""`JobStatusDisplay`: the one-line job status shown while a remote job runs.

In a terminal the line is rewritten in place (`\\r` + clear-line) with a spinner for active
states and the time spent in the current state (the whole job's time once it ends). LOG lines
(the job's print output) and final states stay on screen. With `verbose=True` each state gets
its own line. When the output is not a terminal (a log file, CI) each change is printed once,
without control codes or spinner frames. In a notebook the line is HTML, updated in place
through a display handle. Nothing is printed when disabled (`CONFIG.APP.REMOTE_LOGGING=False`).
"""

from __future__ import annotations

import html
import os
import re
import sys
import time
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator

from ..contract.http import TERMINAL, JobStatus

__all__ = ["JobStatusDisplay", "ansi_to_html", "format_elapsed", "in_notebook", "supports_color"]

RESET, BOLD, DIM = "\x1b[0m", "\x1b[1m", "\x1b[2m"
COLOR_CODES = {"red": "\x1b[31m", "green": "\x1b[32m", "yellow": "\x1b[33m", "blue": "\x1b[34m",
               "magenta": "\x1b[35m", "cyan": "\x1b[36m", "white": "\x1b[37m"}
# status -> (icon, colour), for every status the server sends (`contract.http.JobStatus`)
STYLES = {
    JobStatus.RECEIVED.value: ("◉", "cyan"),
    JobStatus.QUEUED.value: ("◎", "yellow"),
    JobStatus.RUNNING.value: ("●", "blue"),
    JobStatus.COMPLETED.value: ("✓", "green"),
    JobStatus.ERROR.value: ("✗", "red"),
    JobStatus.CANCELLED.value: ("✗", "yellow"),
    JobStatus.EXPIRED.value: ("✗", "yellow"),
    JobStatus.LOG.value: ("ℹ", "dim"),
    JobStatus.STREAM.value: ("⇅", "magenta"),  # waiting for this client's local block
}
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
# States a job waits in: shown with a spinner.
ACTIVE = frozenset({JobStatus.QUEUED.value, JobStatus.RUNNING.value})
HTML_COLORS = {"red": "#e74c3c", "green": "#2ecc71", "yellow": "#f39c12", "blue": "#3498db",
               "magenta": "#9b59b6", "cyan": "#00bcd4", "white": "#ecf0f1"}
CLEAR = "\r\x1b[K"


def supports_color(stream: IO[str], notebook: bool = False) -> bool:
    """NO_COLOR wins, then FORCE_COLOR, then notebooks, then whether `stream` is a terminal."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    if notebook:
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def in_notebook() -> bool:
    """True inside a Jupyter/Colab kernel (not a terminal IPython)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and type(shell).__name__ in {"ZMQInteractiveShell", "Shell"}


def format_elapsed(seconds: float, precise: bool = False) -> str:
    if seconds < 60:
        return f"{seconds:.3f}s" if precise else f"{seconds:.1f}s"
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{int(minutes)}m {rest:.1f}s" if rest < 10 else f"{int(minutes)}m {int(rest):02d}s"
    hours, rest = divmod(seconds, 3600)
    return f"{int(hours)}h {int(rest // 60)}m"


_ANSI = re.compile(r"\x1b\[(\d+)m")


def ansi_to_html(text: str) -> str:
    """Escape `text` and turn our ANSI styles into spans, for notebook output."""
    names = {v: k for k, v in COLOR_CODES.items()}
    out: list[str] = []
    open_spans = 0
    pos = 0
    for match in _ANSI.finditer(text):
        out.append(html.escape(text[pos:match.start()]))
        pos = match.end()
        code = match.group(0)
        if code == RESET:
            out.append("</span>" * open_spans)
            open_spans = 0
            continue
        if code == BOLD:
            style = "font-weight:bold"
        elif code == DIM:
            style = "opacity:0.7"
        else:
            style = f"color:{HTML_COLORS.get(names.get(code, ''), 'inherit')}"
        out.append(f'<span style="{style}">')
        open_spans += 1
    out.append(html.escape(text[pos:]))
    out.append("</span>" * open_spans)
    body = "".join(out).replace(CLEAR.replace("\r", ""), "").replace("\r", "")
    return f'<pre style="margin:0;font-family:monospace;background:transparent;">{body}</pre>'


class JobStatusDisplay:
    """Shows a remote job's status; call `update(job_id, status, description)` on each status
    and `update()` with no arguments to animate the spinner and refresh the time."""

    def __init__(
        self,
        enabled: bool = True,
        verbose: bool = False,
        *,
        stream: IO[str] | None = None,
        color: bool | None = None,
        notebook: bool | None = None,
        inplace: bool | None = None,
        html_display: Callable[..., Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.verbose = verbose
        self.stream = stream if stream is not None else sys.stdout
        self.notebook = in_notebook() if notebook is None else notebook
        self.color = supports_color(self.stream, self.notebook) if color is None else color
        isatty = getattr(self.stream, "isatty", None)
        self.inplace = bool(isatty and isatty()) if inplace is None else inplace
        self._html_display = html_display
        self.job_start_time: float | None = None
        self.status_start_time: float | None = None
        self.spinner_idx = 0
        self.last_response: tuple[str, str, str] | None = None
        self._line_open = False  # an in-place line is on screen without its newline
        self._handle: Any = None  # notebook display handle

    # -- public ---------------------------------------------------------------------------

    def update(self, job_id: str = "", status_name: str = "", description: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not status_name:  # refresh: animate the spinner, advance the clock
            if self.last_response is None or self.last_response[1] in TERMINAL:
                return
            job_id, status_name, description = self.last_response
            new_state = new_text = False
        elif status_name == JobStatus.LOG:
            # LOG neither resets the timer nor becomes the last status: a refresh shows the
            # state the job is in again.
            self._emit(self._render(job_id, JobStatus.LOG.value, description, now), final=True, new_state=True, new_text=True)
            return
        else:
            last = self.last_response
            new_state = last is None or last[1] != status_name
            new_text = new_state or last is None or last[2] != description
            if self.job_start_time is None:
                self.job_start_time = now
            if new_state:
                self.status_start_time = now
            self.last_response = (job_id, status_name, description)
        self._emit(self._render(job_id, status_name, description, now), final=status_name in TERMINAL,
                   new_state=new_state, new_text=new_text)

    def finish(self) -> None:
        """End an open in-place line (call when waiting stops for another reason)."""
        if self.enabled and self._line_open and not self.notebook:
            self.stream.write("\n")
            self.stream.flush()
        self._line_open = False

    @contextmanager
    def download(self, total: int) -> Iterator[Callable[[int], None]]:
        """Progress bar for a result download; yields `advance(nbytes)`."""
        if not self.enabled:
            yield lambda n: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.finish()
        console = Console(file=self.stream, force_terminal=self.inplace or None,
                          no_color=not self.color, force_jupyter=self.notebook or None)
        columns = (TextColumn("⬇ Downloading result"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("download", total=total or None)
            yield lambda n: progress.advance(task, n)

    # -- rendering ------------------------------------------------------------------------

    def _style(self, code: str) -> str:
        return code if self.color else ""

    def _render(self, job_id: str, status: str, description: str, now: float) -> str:
        icon, color_name = STYLES.get(status, ("•", "white"))
        dim, bold, reset = self._style(DIM), self._style(BOLD), self._style(RESET)
        color = self._style(DIM if color_name == "dim" else COLOR_CODES.get(color_name, ""))
        if status in ACTIVE and (self.inplace or self.notebook):
            prefix = f"{dim}{SPINNER[self.spinner_idx % len(SPINNER)]}{reset}"
            self.spinner_idx += 1
        else:
            prefix = f"{color}{icon}{reset}"
        parts = [f"{prefix} {dim}[{job_id}]{reset} {color}{bold}{status.ljust(10)}{reset}"]
        if status == JobStatus.LOG:
            if description:
                parts.append(f" {description}")
            return "".join(parts)
        start = self.job_start_time if status in TERMINAL else self.status_start_time
        elapsed = format_elapsed(now - (start if start is not None else now), precise=self.verbose)
        parts.append(f" {dim}({elapsed}){reset}")
        if description:
            parts.append(f" {dim}{description}{reset}")
        return "".join(parts)

    def _emit(self, text: str, *, final: bool, new_state: bool, new_text: bool) -> None:
        if self.notebook:
            return self._emit_html(text, final=final, new_state=new_state)
        out = self.stream
        if not self.inplace:
            # Plain output (a file, CI): one line per change, no control codes or spinner frames.
            if new_text:
                out.write(_strip_ansi(text) + "\n")
                out.flush()
            return
        if self.verbose and new_state and self._line_open:
            out.write("\n")  # keep the previous state on its own line
        out.write(CLEAR + text + ("\n" if final else ""))
        out.flush()
        self._line_open = not final

    def _emit_html(self, text: str, *, final: bool, new_state: bool) -> None:
        show = self._html_display or _ipython_display()
        if show is None:
            return
        content = _html_object(ansi_to_html(text))
        if self._handle is None or final or (self.verbose and new_state):
            handle = show(content, display_id=True)
            self._handle = None if final else handle
        else:
            self._handle.update(content)


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _ipython_display() -> Callable[..., Any] | None:
    try:
        from IPython.display import display
    except ImportError:
        return None
    return display


def _html_object(markup: str) -> Any:
    try:
        from IPython.display import HTML
    except ImportError:
        return markup
    return HTML(markup)
