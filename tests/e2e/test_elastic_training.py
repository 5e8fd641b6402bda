"""Live elastic training on a real multi-node Ray (two `ray start` nodes on this machine): a run
with train.min_workers=1, num_workers=2 starts with the one worker that fits, grows to two when a
second node joins, shrinks back to one when that node leaves, and still consumes every
(epoch, position) exactly once, ending no worse than 2% above a fixed-size run's loss."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from ports import free_port
from test_cluster_jobs import _stop_nodes_under
from waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GCS_PORT = free_port()
# The run must still be going through the join, the resize, the node's loss and the restart
# (1-2 min of Ray Train's own latencies): a checkpoint every 2 steps paces a step at ~0.25 s
# however fast the tiny model's own step is (0.02 s on a quiet machine). Several epochs.
STEPS = 400
# Workers reserve a "trainer" resource: one per node, so the world size follows the nodes.
COMMON = [
    "data.vocab_size=512",
    "data.seq_len=64",
    "train.seq_len=64",
    "data.near_dedup=false",
    "data.max_docs=150",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_position_embeddings=128",
    "train.batch_size=4",
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=2",
    "train.eval_every=300",
    "train.eval_batches=1",
    "train.warmup_steps=5",
    "train.ledger=true",
    "train.cpus_per_worker=0.5",
    "train.worker_resources={trainer: 1}",
]


def _env() -> dict:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_start(tmp: Path, name: str, *args: str) -> None:
    # A worker group that cannot start (its node just left) gives up after 30 s, not 60 s, and
    # the run restarts at the size that fits.
    env = {**_env(), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}
    out = subprocess.run(
        [str(BIN / "ray"), "start", f"--temp-dir={tmp / name}", "--disable-usage-stats", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]


def _workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def _aigc(*args: str, **kw) -> subprocess.Popen:
    env = {**_env(), "RAY_ADDRESS": f"127.0.0.1:{GCS_PORT}"}
    return subprocess.Popen([str(BIN / "aigc-ray"), *args], env=env, cwd=ROOT, text=True, **kw)


@pytest.fixture
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="aigc_el_", dir="/tmp"))
    try:
        _ray_start(
            tmp,
            "h",
            "--head",
            f"--port={GCS_PORT}",
            "--num-cpus=2",
            "--include-dashboard=false",
            '--resources={"trainer": 1}',
        )
        yield tmp
    finally:
        _stop_nodes_under(tmp)


def _train(tmp: Path, name: str, *extra: str) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return _aigc(
        "train",
        "--config",
        "configs/tiny.yaml",
        *COMMON,
        f"data.output_dir={tmp / 'data'}",
        f"train.run_dir={tmp / name}",
        f"train.name={name}",
        *extra,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _latest(run_dir: Path) -> dict:
    """Metrics of the run's latest committed checkpoint (Ray Train's snapshot: a directory
    written by a group that then failed is not committed), or {}."""
    snapshot = run_dir / "ray" / run_dir.name / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or being written
        return {}


def _steps_at_two(run_dir: Path) -> bool:
    """The latest checkpoint holds steps of two workers: more tokens than one worker's 4 x 64
    a step."""
    latest = _latest(run_dir)
    return bool(latest) and latest.get("tokens", 0) > latest["step"] * 4 * 64


def _ledger(run_dir: Path) -> list:
    return [tuple(x) for x in json.loads((run_dir / "ledger.json").read_text())]


def _last_loss(run_dir: Path) -> float:
    """The final evaluation's loss (the same validation rows for both runs; a training row's
    loss averages however many steps its logging window held)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if r.get("val_loss") is not None][-1]


def test_elastic_run_grows_and_shrinks_with_the_nodes_exactly_once(cluster, measured):
    tmp = cluster
    prep = _aigc(
        "preprocess", "--config", "configs/tiny.yaml", *COMMON, f"data.output_dir={tmp / 'data'}"
    )
    assert prep.wait(timeout=300) == 0
    run = _train(
        tmp,
        "elastic",
        "train.min_workers=1",
        "train.num_workers=2",
        "train.elastic_resize_interval_s=5",
        "train.max_failures=4",
    )
    try:
        wait_until(
            lambda: (
                len(_workers()) == 1
                and list((tmp / "elastic" / "ray" / "elastic").glob("checkpoint_*"))
            ),
            240,
            "one worker training with a checkpoint",
        )
        _ray_start(
            tmp,
            "w",
            f"--address=127.0.0.1:{GCS_PORT}",
            "--num-cpus=1",
            '--resources={"trainer": 1}',
        )
        grow = wait_until(
            lambda: len(_workers()) == 2, 180, "grown to two workers after the node joined"
        )
        wait_until(
            lambda: _steps_at_two(tmp / "elastic"), 300, "a checkpoint with steps at two workers"
        )
        _stop_nodes_under(tmp / "w")
        at_kill = _latest(tmp / "elastic")

        def one_worker_steps() -> bool:  # a checkpoint after the kill, its steps at one worker
            now = _latest(tmp / "elastic")
            steps = now.get("step", 0) - at_kill["step"]
            return steps > 0 and now["tokens"] - at_kill["tokens"] == steps * 4 * 64

        shrink = wait_until(
            one_worker_steps, 300, "training on with one worker after the node left"
        )
        assert len(_workers()) <= 1
        assert run.wait(timeout=600) == 0, (tmp / "elastic.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    ledger = _ledger(tmp / "elastic")
    assert len(ledger) == len(set(ledger)), "a sample was consumed twice"
    for epoch in {e for e, _ in ledger}:  # each epoch: a prefix of its order, no gap
        got = sorted(p for e, p in ledger if e == epoch)
        assert got == list(range(len(got))), f"a sample of epoch {epoch} was skipped"
    assert STEPS * 4 < len(ledger) < STEPS * 8, "the run never changed size"
    # checkpoints only pace the elastic run: they change no state (same data order, same RNG)
    fixed = _train(tmp, "fixed", "train.num_workers=1", f"train.checkpoint_every={STEPS}")
    assert fixed.wait(timeout=600) == 0, (tmp / "fixed.log").read_text()[-3000:]
    elastic_loss, fixed_loss = _last_loss(tmp / "elastic"), _last_loss(tmp / "fixed")
    # One-sided: the elastic run's steps at two workers hold twice the rows, so it ends lower
    # (CI measured 4.411 vs 4.511); a lost optimizer state or a repeated batch ends higher.
    assert elastic_loss <= 1.02 * fixed_loss, (elastic_loss, fixed_loss)
    measured(
        "elastic training 1 -> 2 -> 1 workers",
        f"grew {grow:.0f} s after the node joined, went on with one worker "
        f"{shrink:.0f} s after it left; "
        f"{len(ledger)} positions once each; loss {elastic_loss:.3f} vs fixed {fixed_loss:.3f}",
    )
