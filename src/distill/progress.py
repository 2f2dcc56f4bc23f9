"""Progress of the long stages (generate, train, eval): a live bar on a terminal, periodic lines in a log file.

Why: written to a file, rich's bar printed nothing for 75 minutes of generation and tqdm's carriage-return
redraws grew a training log to 113 KB. So when the output is not a terminal, a stage prints one plain line
on its first update, then every `interval` seconds, then a last one when it ends:

    [generate] 2,560/10,000 rows (26%) | 3,412 tok/s | 1m05s elapsed | ETA 3m09s

The interval is DISTILL_PROGRESS_INTERVAL seconds (default 30); 0 prints every update.

Run as: `with Progress("generate", total=len(rows)) as p: ... p.update(tokens=n)`; a Trainer gets
`trainer_callback("train student")`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as Bar

from distill.errors import ConfigError

INTERVAL_ENV = "DISTILL_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def default_interval() -> float:
    """Seconds between log lines: DISTILL_PROGRESS_INTERVAL, else 30 (a bad value is a clear error)."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or raw == "":
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(f"{INTERVAL_ENV}={raw!r}: expected seconds >= 0 between progress lines, e.g. 30")
    return value


def is_live(console: Console | None = None) -> bool:
    """True when progress goes to a terminal (a redrawn bar), False for a file or pipe (periodic lines)."""
    return (console or Console(stderr=True)).is_terminal


def quiet_library_bars(console: Console | None = None) -> None:
    """Turn off transformers' and huggingface_hub's own tqdm bars ("Loading weights") when output is a log:
    each is a carriage-return redraw, and the stage's progress lines say where it is."""
    if is_live(console):
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    logging.disable_progress_bar()
    disable_progress_bars()


def duration(seconds: float) -> str:
    """'45.0s', '3m09s', '1h02m': short enough for a log line."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """Done/total of one stage with its rate and ETA.

    `update(advance, tokens=, **fields)` counts `advance` units (rows, steps) and `tokens` (for tokens/s);
    `fields` (e.g. loss=0.41) are shown as they are. `start` is where a resumed stage begins: the rate and ETA
    count only the units done in this run.
    """

    def __init__(self, label: str, total: int | None, unit: str = "rows", *, start: int = 0,
                 interval: float | None = None, console: Console | None = None, live: bool | None = None,
                 transient: bool = False, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit, self.start = label, total, unit, start
        self.done, self.tokens, self.fields = start, 0, {}
        self.interval = default_interval() if interval is None else interval
        self.console = console or Console(stderr=True)
        self.live = is_live(self.console) if live is None else live
        self.clock = clock
        self.began = clock()
        self.last_line: float | None = None
        self.last_printed: int | None = None
        self.closed = False
        self.bar: Bar | None = None
        if self.live:
            self.bar = Bar(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                           TextColumn("{task.fields[rate]}", style="cyan"), TextColumn("{task.fields[extra]}"),
                           TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                           console=self.console, transient=transient)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=start, rate="", extra="")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, advance: int = 1, *, done: int | None = None, tokens: int = 0, **fields: Any) -> None:
        """Count `advance` more units (or set `done`), `tokens` more tokens; print when a line is due."""
        self.done = done if done is not None else self.done + advance
        self.tokens += tokens
        self.fields.update(fields)
        if self.bar is not None:
            extra = " ".join(f"{k} {_value(v)}" for k, v in self.fields.items())
            self.bar.update(self.task, completed=self.done, rate=self._rate(), extra=extra)
        elif self.last_line is None or self.clock() - self.last_line >= self.interval:
            self._print()

    def close(self) -> None:
        """The last line (a log always ends with where the stage got to), or stop the bar."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.stop()
        elif self.last_line is None or self.last_printed != self.done:
            self._print()

    def _rate(self) -> str:
        elapsed = self.clock() - self.began
        if not self.tokens or elapsed <= 0:
            return ""
        return f"{self.tokens / elapsed:,.0f} tok/s"

    def line(self) -> str:
        """`[label] done/total unit (pct) | tok/s | fields | elapsed | ETA`."""
        elapsed = self.clock() - self.began
        head = f"[{self.label}] {self.done:,}"
        if self.total:
            head += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            head += f" {self.unit}"
        parts = [head]
        if self._rate():
            parts.append(self._rate())
        parts += [f"{k} {_value(v)}" for k, v in self.fields.items()]
        parts.append(f"{duration(elapsed)} elapsed")
        ran = self.done - self.start
        if self.total and 0 < ran and self.done < self.total:
            parts.append(f"ETA {duration(elapsed / ran * (self.total - self.done))}")
        return " | ".join(parts)

    def _print(self) -> None:
        self.console.print(self.line(), highlight=False, soft_wrap=True, markup=False)
        self.last_line, self.last_printed = self.clock(), self.done


def trainer_callback(label: str, interval: float | None = None, console: Console | None = None):
    """A transformers TrainerCallback printing `[label] step/total | loss | elapsed | ETA` lines (main process
    only); for logs, where tqdm is turned off (see distill.training.train)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self):
            self.progress: Progress | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.progress = Progress(label, state.max_steps, "steps", start=state.global_step,
                                         interval=interval, console=console, live=False)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress is not None and logs and "loss" in logs:
                self.progress.fields["loss"] = float(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(done=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    return ProgressCallback()
