"""Training progress as Prometheus series through Ray's metrics API (`ray.util.metrics`),
exported by every node's metrics agent with Ray's `ray_` prefix, beside the serving metrics
(aigc_ray/serve/metrics.py) and Ray Train's own `ray_train_*` series.

Rank 0 records each logged row after its all-reduce, so the values are the run's (the mean loss
over every rank, the whole worker group's throughput), labelled by the run's name:

    ray_aigc_ray_train_loss{run}           mean training loss over the last logged window
    ray_aigc_ray_train_eval_loss{run}      last validation loss
    ray_aigc_ray_train_throughput{run, unit}   tokens/s (text runs) or images/s (image runs)
    ray_aigc_ray_train_step_seconds{run}   mean wall time per optimizer step in the window
    ray_aigc_ray_train_step{run}           optimizer steps done
    ray_aigc_ray_train_last_checkpoint_timestamp_seconds{run}
                                           unix time of the last checkpoint (the dashboards
                                           show its age: time() - this)

Gauges live as long as the worker process: Ray stops exporting a dead worker's gauges after a
few seconds, so a finished run leaves its history in Prometheus, not in the scrape.
"""

from __future__ import annotations

import math
import time

PREFIX = "aigc_ray_train_"
GAUGES = {
    "loss": "Mean training loss over the last logged window (all ranks).",
    "eval_loss": "Validation loss at the last evaluation.",
    "throughput": "Tokens/s (unit=tokens) or images/s (unit=images) of the whole worker group.",
    "step_seconds": "Mean wall time per optimizer step over the last logged window.",
    "step": "Optimizer steps done.",
    "last_checkpoint_timestamp_seconds": "Unix time of the last checkpoint (or of the start "
    "of a run that has none yet).",
}


def row_values(row: dict, step_seconds: float) -> list[tuple[str, float, dict]]:
    """(gauge, value, extra tags) for one logged metrics row; missing or non-finite values are
    left out (a gauge keeps its last value rather than showing NaN)."""
    out = [
        ("step", row.get("step")),
        ("loss", row.get("loss")),
        ("eval_loss", row.get("val_loss")),
        ("step_seconds", step_seconds),
    ]
    values = [(name, float(v), {}) for name, v in out if _finite(v)]
    for unit in ("tokens", "images"):
        if _finite(row.get(f"{unit}_per_s")):
            values.append(("throughput", float(row[f"{unit}_per_s"]), {"unit": unit}))
    return values


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


class _Recorder:
    """The gauges of one run in this worker process (rank 0 only; other ranks get None)."""

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {
            name: Gauge(
                PREFIX + name,
                description=description,
                tag_keys=("run", "unit") if name == "throughput" else ("run",),
            )
            for name, description in GAUGES.items()
        }

    def set(self, name: str, value: float, extra: dict | None = None) -> None:
        self.gauges[name].set(value, {**self.tags, **(extra or {})})


_recorders: dict[str, _Recorder | None] = {}


def _recorder(run: str) -> _Recorder | None:
    if run not in _recorders:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        _recorders[run] = _Recorder(run) if rank == 0 else None
    return _recorders[run]


def start(run: str, history: list[dict]) -> None:
    """Call once per worker after restoring: a resumed run's last checkpoint is the restored one
    (the time of its last metrics row); a fresh run counts its checkpoint age from now."""
    rec = _recorder(run)
    if rec is None:
        return
    times = [r["time"] for r in history if _finite(r.get("time"))]
    rec.set("last_checkpoint_timestamp_seconds", times[-1] if times else time.time())
    for name, value, extra in row_values(history[-1] if history else {}, math.nan):
        rec.set(name, value, extra)


def record(run: str, row: dict, step_seconds: float) -> None:
    """Export one logged row (the loop's metrics.jsonl row, after the all-reduce)."""
    rec = _recorder(run)
    if rec is not None:
        for name, value, extra in row_values(row, step_seconds):
            rec.set(name, value, extra)


def checkpointed(run: str) -> None:
    """Call after a checkpoint was reported (persisted by Ray Train)."""
    rec = _recorder(run)
    if rec is not None:
        rec.set("last_checkpoint_timestamp_seconds", time.time())
