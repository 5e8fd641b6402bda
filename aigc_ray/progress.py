"""Progress on the driver for work that runs elsewhere (Ray Train workers, Ray Data tasks).

A stage that runs in other processes posts its rows (a dict per logged step or batch) to a
small Ray actor, the board; a thread on the driver takes them every second and shows them:
a live tqdm bar on a terminal, plain lines about every `interval` seconds otherwise (a log
file or `ray job logs` stays readable): a row is printed once `interval` has passed, or earlier
when waiting for the next row would leave more than `interval` without a line (rows that come
every 8 s are all printed with a 10 s interval, not every other one, 16 s apart). Each
line says where the work is, its rate, the time spent and the time left:

    train   120/300 steps (40%)  loss 5.123  tokens/s 2,607  elapsed 0:12  left 0:18

The board is a zero-CPU actor, so it never takes a core from the work it reports on; posting
is fire-and-forget (a worker never waits for the driver).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable

INTERVAL_ENV = "AIGC_RAY_PROGRESS_INTERVAL_S"  # seconds between plain lines (default 10)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _value(name: str, v) -> str:
    if isinstance(v, float) and not v.is_integer() and abs(v) < 100:
        return f"{name} {v:.3f}"
    return f"{name} {v:,.0f}" if isinstance(v, (int, float)) else f"{name} {v}"


class Progress:
    """One stage's progress: ``update(done, fields)`` with the units done so far and what to
    show beside them ({"loss": 5.1, "tokens/s": 2600}); ``close()`` prints the last state."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "steps",
        stream=None,
        live: bool | None = None,
        interval: float | None = None,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        if interval is None:
            interval = float(os.environ.get(INTERVAL_ENV, "10"))
        self.interval = interval
        self.started = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, done) of the first update
        self.done, self.fields = 0, {}
        self.updated_at: float | None = None  # time of the last update (the rows' spacing)
        self.printed_at, self.printed_done = -math.inf, None
        self.bar = None
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=f" {unit}", file=self.stream)

    def left(self, now: float) -> float | None:
        """Seconds left at the rate since the first update (startup excluded), if known."""
        if not self.total or self.first is None or self.done <= self.first[1]:
            return None
        rate = (self.done - self.first[1]) / max(now - self.first[0], 1e-9)
        return max(self.total - self.done, 0) / rate

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        done = f"{self.done:,}/{self.total:,}" if self.total else f"{self.done:,}"
        parts = [f"{self.label:<7} {done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done // self.total}%)"
        parts += [_value(k, v) for k, v in self.fields.items() if v is not None]
        parts.append(f"elapsed {_clock(now - self.started)}")
        left = self.left(now)
        if left is not None:
            parts.append(f"left {_clock(left)}")
        return "  ".join(parts)

    def update(self, done: int, fields: dict | None = None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.first is None or done < self.done:  # first row, or a restart from a checkpoint
            self.first = (now, done)
        self.done, self.fields = done, {**self.fields, **(fields or {})}
        spacing = 0.0 if self.updated_at is None else now - self.updated_at
        self.updated_at = now
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix({k: v for k, v in self.fields.items() if v is not None})
            return
        since = now - self.printed_at
        if since >= self.interval or since + spacing > self.interval:
            self._print(now)

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self.printed_at, self.printed_done = now, self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
        elif self.first is not None and self.printed_done != self.done:
            self._print(time.monotonic())


class ProgressBoard:
    """The Ray actor rows are posted to (``post``) and the driver takes them from (``take``)."""

    def __init__(self):
        self.rows: list[dict] = []

    def post(self, row: dict) -> None:
        self.rows.append(row)

    def take(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows


class Watch:
    """Driver side: the board actor and the thread that shows its rows.

    with Watch(Progress("train", 300), lambda p, row: p.update(row["step"], {...})) as w:
        trainer = TorchTrainer(..., train_loop_config={..., "progress": w.board})
    """

    def __init__(self, progress: Progress, show: Callable[[Progress, dict], None]):
        self.progress, self.show = progress, show
        self.board = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watch:
        import ray

        self.board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
        self._thread = threading.Thread(target=self._run, name="aigc-ray-progress", daemon=True)
        self._thread.start()
        return self

    def _drain(self) -> None:
        import ray

        for row in ray.get(self.board.take.remote(), timeout=30):
            self.show(self.progress, row)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._drain()
            except Exception:  # a slow or restarting cluster: try again at the next tick
                continue

    def __exit__(self, *exc) -> None:
        import contextlib

        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=35)
        with contextlib.suppress(Exception):
            self._drain()  # rows posted after the last tick
        self.progress.close()
        with contextlib.suppress(Exception):
            ray.kill(self.board)


def post(board, row: dict) -> None:
    """Worker side: send one row to the driver's board, without waiting (None: no board)."""
    if board is not None:
        board.post.remote(row)
