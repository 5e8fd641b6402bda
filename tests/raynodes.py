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


def actor_pids_under(temp_dir, class_name: str) -> list[int]:
    """Pids of live actors of `class_name` running on the nodes under `temp_dir` (Ray names an
    actor's worker process `ray::ClassName...`)."""
    pids = []
    for p in processes_under(temp_dir):
        with contextlib.suppress(psutil.Error):
            if p.name().startswith(f"ray::{class_name}") or " ".join(p.cmdline()).startswith(
                f"ray::{class_name}"
            ):
                pids.append(p.pid)
    return pids


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
