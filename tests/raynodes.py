"""The actors' processes of a Ray session a test started, read from that session's own logs.

Nodes a test starts itself are `aigc_ray.cluster.start_ray_node` processes: everything of a node
is under its pid (`process_tree`, `stop_tree`). Nothing is ever found by name across the
machine, where another run's Ray may be running."""

import contextlib

import psutil


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
