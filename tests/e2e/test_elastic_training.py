"""Live elastic training on a real multi-node Ray (two `ray start` nodes on this machine): a run
with train.min_workers=1, num_workers=2 starts with the one worker that fits, grows to two when a
second node joins, shrinks back to one when that node leaves, and keeps what elasticity must
keep: every epoch consumed whole and exactly once, steps and learning rate going on without a
gap across each resize, and the optimizer's state carried through every restart.

The cluster runs with Ray's TLS on, as cluster.yaml starts it: the node certificate signed by
the cluster's CA (aigc_ray.tls: what `aigc-ray tls make` and `tls node` write), every gRPC
connection between Ray processes encrypted and mutually authenticated; the GCS port answers no
plain-text client and no TLS client without the CA."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ports import free_port
from raynodes import actor_pids
from tiny import stdlib_texts
from waiting import wait_until

from aigc_ray.cluster import start_ray_node, stop_tree
from aigc_ray.tls import make_certs, make_node_cert, node_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BATCH, SEQ = 4, 64
# The run must still be going through the join, the resize, the node's loss and the restart
# (1-2 min of Ray Train's own latencies, during which no step runs): a step delay paces it.
# A small corpus (about 250 rows of 64 tokens), so that the run goes through several epochs.
STEPS, DELAY, CKPT = 300, 0.2, 10
# Workers reserve a "trainer" resource: one per node, so the world size follows the nodes.
COMMON = [
    "data.vocab_size=512",
    "data.seq_len=64",
    "train.seq_len=64",
    "data.near_dedup=false",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_position_embeddings=128",
    f"train.batch_size={BATCH}",
    f"train.max_steps={STEPS}",
    f"train.checkpoint_every={CKPT}",  # = the logging interval: each resize starts a new row
    f"train.eval_every={STEPS}",
    "train.eval_batches=1",
    "train.warmup_steps=5",
    f"train.step_delay_s={DELAY}",
    "train.ledger=true",
    "train.cpus_per_worker=0.5",
    "train.worker_resources={trainer: 1}",
]


def _tls_env(tmp: Path) -> dict:
    """Ray's TLS variables for this test's cluster: the node certificate `aigc-ray tls node`
    made from the CA in tmp/tls (all nodes run on this machine: one certificate serves)."""
    from aigc_ray.tls import ray_tls_env

    d = tmp / "tls"
    return ray_tls_env(d / "node.crt", d / "node.key", d / "ca.crt")


def _env(tmp: Path, gcs_port: int | None = None) -> dict:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env |= _tls_env(tmp)
    env.pop("RAY_ADDRESS", None)
    if gcs_port:
        env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    return env


def _ray_start(tmp: Path, name: str, *args: str) -> int:
    """`ray start --block` of one node of this test (its processes all under the pid returned)."""
    # A worker group that cannot start (its node just left) gives up after 30 s, not 60 s, and
    # the run restarts at the size that fits.
    env = {**_env(tmp), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}
    args = [f"--temp-dir={tmp / name}", "--disable-usage-stats", *args]
    return start_ray_node(args, env, tmp / f"{name}.log")


@pytest.fixture
def cluster():
    """(temp dir, GCS port, node pids) of a one-node Ray head; the test adds and removes a
    worker node (its pid added to the list)."""
    tmp = Path(tempfile.mkdtemp(prefix="aigc_el_", dir="/tmp"))
    port = free_port()
    nodes: list[int] = []
    # the CA, then the node's own certificate (what `aigc-ray tls make` and `aigc-ray tls node`
    # do: tests/unit/test_tls.py runs the commands; here in-process, 10 s of imports less)
    make_certs(tmp / "tls", ["127.0.0.1"])
    make_node_cert(tmp / "tls", node_hosts())
    try:
        nodes.append(
            _ray_start(
                tmp,
                "h",
                "--head",
                f"--port={port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                '--resources={"trainer": 1}',
            )
        )
        yield tmp, port, nodes
    finally:
        for pid in reversed(nodes):
            stop_tree(pid)
        shutil.rmtree(tmp, ignore_errors=True)


def _aigc(port: int, tmp: Path, command: str, *overrides: str) -> subprocess.Popen:
    """`aigc-ray <command>` against this test's cluster, its output in tmp/<command>.log."""
    out = open(tmp / f"{command}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [str(BIN / "aigc-ray"), command, "--config", "configs/tiny.yaml", *COMMON]
        + [f"data.output_dir={tmp / 'data'}", *overrides],
        env=_env(tmp, port),
        cwd=ROOT,
        text=True,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def _workers(tmp: Path) -> list[int]:
    """Pids of the Ray Train workers on this test's own nodes (their sessions' logs)."""
    return actor_pids(tmp, "RayTrainWorker")


def _latest(run_dir: Path) -> dict:
    """Metrics of the run's latest committed checkpoint (Ray Train's snapshot: a directory
    written by a group that then failed is not committed), or {}."""
    snapshot = run_dir / "ray" / run_dir.name / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or being written
        return {}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _sizes(rows: list[dict]) -> list[int]:
    """The run's worker counts in order, repeats collapsed (e.g. [1, 2, 1])."""
    out: list[int] = []
    for r in rows[1:]:
        if not out or out[-1] != r["workers"]:
            out.append(r["workers"])
    return out


def check_steps_and_schedule(rows: list[dict], cfg: dict) -> list[str]:
    """What a resize must not change in metrics.jsonl, which holds the committed history (rows of
    a group that then failed are not in it): every logged step once and in order; the lr at
    each the schedule's value there; the optimizer's own step count equal to the step (its state
    restored at every resize); each interval's tokens those of its steps at its world size."""
    from aigc_ray.train import lr_factor

    c, problems = cfg, []
    every = (10, c["checkpoint_every"], c["eval_every"])
    logged = [s for s in range(1, c["max_steps"] + 1) if any(s % n == 0 for n in every)]
    if [r["step"] for r in rows] != [0, *logged]:
        problems.append(f"logged steps {[r['step'] for r in rows]} are not 0, {logged}")
    prev = {"step": 0, "tokens": 0}
    for r in rows[1:]:
        want = c["lr"] * lr_factor(
            r["step"], c["warmup_steps"], c["max_steps"], c["min_lr_ratio"], c["schedule"]
        )
        if not math.isclose(r["lr"], want, rel_tol=1e-9):
            problems.append(f"step {r['step']}: lr {r['lr']} off the schedule's {want}")
        if r["optimizer_step"] != r["step"]:
            problems.append(f"step {r['step']}: the optimizer counts {r['optimizer_step']} steps")
        steps = r["step"] - prev["step"]
        if r["tokens"] - prev["tokens"] != steps * BATCH * r["workers"] * SEQ:
            problems.append(f"step {r['step']}: tokens {r['tokens']} after {prev['tokens']}")
        prev = r
    return problems


def check_epochs(ledger: list, rows: list[dict], epoch_rows: int) -> list[str]:
    """Every epoch but the last consumed whole and exactly once: positions 0..L-1 once each,
    where L leaves out only the epoch's partial last global batch (drop-last: fewer than
    batch x workers rows of the `epoch_rows` in the data, at the world size that ended the
    epoch); the last epoch a prefix of its order. Every position consumed is in the ledger."""
    problems = []
    if len(ledger) != len(set(ledger)):
        problems.append("a sample was consumed twice")
    if len(ledger) * SEQ != rows[-1]["tokens"]:
        problems.append(f"{len(ledger)} positions in the ledger, {rows[-1]['tokens']} tokens")
    epochs = sorted({e for e, _ in ledger})
    if epochs != list(range(len(epochs))) or len(epochs) < 2:
        problems.append(f"epochs {epochs}: not several in a row")
    consumed = 0
    for epoch in epochs:
        got = sorted(p for e, p in ledger if e == epoch)
        if got != list(range(len(got))):
            problems.append(f"epoch {epoch}: positions skipped")
        consumed += len(got)
        if epoch == epochs[-1]:
            break
        # the world size of the steps that ended the epoch: the first row at or past its end
        world = next(r["workers"] for r in rows[1:] if r["tokens"] >= consumed * SEQ)
        if not 0 <= epoch_rows - len(got) < BATCH * world:
            problems.append(
                f"epoch {epoch}: {len(got)} of {epoch_rows} positions at {world} workers"
            )
    return problems


def _assert_tls_only(port: int, ca: Path) -> None:
    """The GCS port (every node and driver talks to it) accepts TLS with our CA only."""
    import socket
    import ssl

    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(24))  # gRPC in clear text
        assert plain.recv(100) == b"", "the GCS answered a plain-text client"
    system_cas = ssl.create_default_context()  # not ours
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
    ):
        system_cas.wrap_socket(raw, server_hostname="127.0.0.1")
    ours = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ours.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_elastic_run_grows_and_shrinks_with_the_nodes_exactly_once(cluster, measured):
    tmp, port, nodes = cluster
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(stdlib_texts(files=24, chars=2000)):
        (corpus / f"{i}.txt").write_text(text)
    prep = _aigc(port, tmp, "preprocess", f"data.inputs=[{corpus}]")
    assert prep.wait(timeout=300) == 0, (tmp / "preprocess.log").read_text()[-3000:]
    manifest = json.loads((tmp / "data" / "manifest.json").read_text())
    epoch_rows = manifest["splits"]["train"]["blocks"]
    run_dir = tmp / "elastic"
    run = _aigc(
        port,
        tmp,
        "train",
        f"train.run_dir={run_dir}",
        "train.name=elastic",
        "train.min_workers=1",
        "train.num_workers=2",
        "train.elastic_resize_interval_s=5",
        "train.max_failures=4",
    )

    def going(cond):  # a wait fails at once, not after its timeout, once the run has ended
        def check() -> bool:
            tail = "" if run.poll() is None else (tmp / "train.log").read_text()[-3000:]
            assert not tail, f"the run ended before the resizes were seen:\n{tail}"
            return cond()

        return check

    try:
        wait_until(
            going(lambda: len(_workers(tmp)) == 1 and _latest(run_dir).get("workers") == 1),
            240,
            "one worker training with a checkpoint",
        )
        worker = _ray_start(
            tmp, "w", f"--address=127.0.0.1:{port}", "--num-cpus=1", '--resources={"trainer": 1}'
        )
        nodes.append(worker)
        grow = wait_until(
            going(lambda: len(_workers(tmp)) == 2), 180, "grown to two workers (node joined)"
        )
        wait_until(
            going(lambda: _latest(run_dir).get("workers") == 2), 300, "a checkpoint of two workers"
        )
        stop_tree(worker)  # the node leaves: every process of it stopped
        at_kill = _latest(run_dir)["step"]

        def one_worker_steps() -> bool:  # a checkpoint after the kill, its steps at one worker
            now = _latest(run_dir)
            return now.get("step", 0) > at_kill and now["workers"] == 1

        shrink = wait_until(
            going(one_worker_steps), 300, "training on with one worker after the node left"
        )
        assert len(_workers(tmp)) <= 1
        left = STEPS - _latest(run_dir)["step"]
        assert run.wait(timeout=600) == 0, (tmp / "train.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    _assert_tls_only(port, tmp / "tls" / "ca.crt")
    rows = _rows(run_dir)
    ledger = [tuple(x) for x in json.loads((run_dir / "ledger.json").read_text())]
    sizes = _sizes(rows)
    cfg = json.loads((run_dir / "train_config.resolved.json").read_text())
    problems = check_steps_and_schedule(rows, cfg) + check_epochs(ledger, rows, epoch_rows)
    if not any(sizes[i : i + 3] == [1, 2, 1] for i in range(len(sizes))):
        problems.append(f"worker counts {sizes}: never 1 -> 2 -> 1")
    assert not problems, "\n".join(problems)
    measured(
        "elastic training 1 -> 2 -> 1 workers",
        f"grew {grow:.0f} s after the node joined, went on with one worker "
        f"{shrink:.0f} s after it left ({left} of {STEPS} steps still to go); "
        f"{len(ledger)} positions once each over {len({e for e, _ in ledger})} epochs of "
        f"{epoch_rows}",
    )
