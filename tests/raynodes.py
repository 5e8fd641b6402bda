"""Ray nodes a test starts itself with `ray start --temp-dir=...`, and the processes they run.

Everything is found from the test's own temp dir (the roots' command lines hold it) and the
process tree under those roots: never by name across the machine, where another run's Ray may be
running."""

import contextlib

import psutil


def _roots(temp_dir) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
                found.append(p)
    return found


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def processes_under(temp_dir) -> list[psutil.Process]:
    """The Ray processes started with a --temp-dir under `temp_dir` (GCS, raylets, dashboard,
    log monitors) and every process they started (workers, drivers)."""
    return list({p.pid: p for r in _roots(temp_dir) for p in _tree(r)}.values())


def actor_pids(logs_dir, class_name: str) -> list[int]:
    """Pids of the live actors of `class_name` that a Ray session started, read from that
    session's own worker logs under `logs_dir` (a session's logs dir, or a --temp-dir holding
    sessions): each actor's worker writes `:actor_name:<Class>` at the top of its
    `worker-<id>-<job>-<pid>.out`. No process table is searched."""
    from pathlib import Path

    pids = set()
    for out in Path(logs_dir).rglob("worker-*.out"):
        try:
            head = out.read_text(errors="replace")[:2000]
        except OSError:
            continue
        names = [
            x[len(":actor_name:") :] for x in head.splitlines() if x.startswith(":actor_name:")
        ]
        if names and names[-1].startswith(class_name):
            pid = int(out.stem.rsplit("-", 1)[1])
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    pids.add(pid)
    return sorted(pids)


def stop_nodes_under(temp_dir) -> None:
    """Terminate (then kill) every process of the nodes under `temp_dir`: `ray stop` would stop
    every Ray on the machine."""
    procs = processes_under(temp_dir)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
