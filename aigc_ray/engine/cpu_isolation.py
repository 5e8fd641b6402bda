"""Keep a node's other processes off the CPU cores vLLM's CPU worker binds itself to.

vLLM's CPU build binds its worker's OpenMP threads to cores of their own and leaves the rest
(``reserved``) to everything else: its scheduler process and the HTTP frontend. In vLLM's own
server that is two processes. In a Ray Serve replica, "everything else" is also Ray's runtime on
the node (raylet's workers, GCS, the dashboard agent, the log monitor), Serve's controller and
proxies, HAProxy and the replica itself. The scheduler wakes them at will, onto any core. Each
wake on a worker core stalls the forward pass; OpenMP threads wait for each other, so one stalled
thread stalls them all. Measured here at 32 streams on 2 cores: vLLM's worker had 89-90% of its
core and the replica served 672 tok/s; with the rest kept off its core, 99% and 715-724 tok/s
(docs/serving.md).

``CpuIsolation.apply()`` runs in the process that started vLLM, once vLLM's worker has bound
itself: it reads the worker's cores from its processes, and moves to the reserved cores every
thread of this process, of its other descendants (vLLM's scheduler process) and of this Ray
node's session (raylet's descendants, its sibling daemons named by the session directory), as
far as the operating system lets it. It never moves a process someone else has bound to fewer
cores, nor the raylet itself (workers it starts later keep the node's cores), nor any process
outside the session (a driver, the user's own programs). ``restore()`` gives the moved
processes the node's cores back when the engine closes. Linux only (``sched_setaffinity``);
elsewhere a no-op.

Never imports Ray: it reads the process tree (psutil) and /proc.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

_SESSION = re.compile(r"(/\S*?/session_[^/\s]+)")


def thread_ids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def affinity(pid: int) -> set[int] | None:
    try:
        return set(os.sched_getaffinity(pid))
    except OSError:
        return None


def set_threads(pid: int, cpus: set[int], only_if: set[int] | None = None) -> int:
    """Give every thread of ``pid`` (those now on exactly ``only_if``, if given) ``cpus``;
    returns how many threads were moved. Threads that exit meanwhile or are not ours to move
    are skipped."""
    moved = 0
    for tid in thread_ids(pid):
        try:
            if only_if is not None and set(os.sched_getaffinity(tid)) != only_if:
                continue
            os.sched_setaffinity(tid, cpus)
            moved += 1
        except OSError:
            continue
    return moved


def session_processes(me) -> list:
    """This process and its descendants, plus this Ray node's session: raylet's descendants and
    the raylet's siblings whose command line names its session directory (GCS, the dashboard,
    the log monitor, the autoscaler's monitor). Not the raylet itself; found by walking the
    process tree, never by searching the machine."""
    import psutil

    procs = {me.pid: me}
    for p in me.children(recursive=True):
        procs[p.pid] = p
    try:
        raylet = next((p for p in me.parents() if p.name() == "raylet"), None)
        if raylet is None:
            return list(procs.values())
        for p in raylet.children(recursive=True):
            procs.setdefault(p.pid, p)
        found = _SESSION.search(" ".join(raylet.cmdline()))
        siblings = raylet.parent().children() if found and raylet.parent() else []
    except psutil.Error:
        return list(procs.values())
    for p in siblings:
        try:
            if p.pid != raylet.pid and found.group(1) in " ".join(p.cmdline()):
                procs.setdefault(p.pid, p)
        except psutil.Error:
            continue
    return list(procs.values())


class CpuIsolation:
    """Processes this engine moved off its worker's cores, to give back (``restore``)."""

    def __init__(
        self, node: set[int], engine: set[int], moved: dict[int, float], seen: dict[int, float]
    ):
        self.node = node  # the cores this process had: the node's, as Ray gave them
        self.engine = engine  # the cores vLLM's worker bound itself to
        self.reserved = node - engine
        self.moved = moved  # pid -> create time (a recycled pid is not ours)
        self.seen = seen  # every session process at apply() time, pid -> create time

    @classmethod
    def apply(cls) -> CpuIsolation | None:
        """Move this node's other processes to the cores vLLM's worker left free; None (and a
        log line) when there is nothing to do: not Linux, no bound worker, no core left."""
        import psutil

        if not hasattr(os, "sched_setaffinity"):
            return None
        me = psutil.Process()
        node = affinity(0)
        engine: set[int] = set()
        for child in me.children(recursive=True):
            cpus = affinity(child.pid)
            if cpus and node and cpus < node:
                engine |= cpus
        if not node or not engine:
            logger.info("cpu isolation: vLLM's worker is not bound to cores; nothing to do")
            return None
        if not node - engine:
            logger.info("cpu isolation: vLLM's worker has every core (%s); none left", sorted(node))
            return None
        out = cls(node, engine, {}, {})
        for p in session_processes(me):
            try:
                out.seen[p.pid] = created = p.create_time()
            except psutil.Error:
                continue
            cpus = affinity(p.pid)
            # the node's cores: move it; the reserved ones already: left there by an engine
            # that could not give them back (its replica was killed), ours to give back now;
            # any other set: bound by someone else (vLLM's worker), left alone
            if cpus == out.reserved or (cpus == node and set_threads(p.pid, out.reserved)):
                out.moved[p.pid] = created
        logger.info(
            "cpu isolation: vLLM's worker on cores %s; %d processes of this node moved to %s",
            sorted(engine),
            len(out.moved),
            sorted(out.reserved),
        )
        return out

    def restore(self) -> int:
        """The node's cores back to the threads now on exactly the reserved cores, in the
        processes moved and in the session's processes started since (they inherited the
        reserved cores); never in one that was there before and not moved. Returns how many
        threads."""
        import psutil

        try:
            procs = {p.pid: p for p in session_processes(psutil.Process())}
        except psutil.Error:
            procs = {}
        done = 0
        for pid in procs.keys() | self.moved.keys():
            try:
                created = (procs.get(pid) or psutil.Process(pid)).create_time()
            except psutil.Error:
                continue
            ours = self.moved.get(pid) == created or self.seen.get(pid) != created
            if ours:
                done += set_threads(pid, self.node, only_if=self.reserved)
        return done

    def describe(self) -> dict:
        return {
            "engine_cpus": sorted(self.engine),
            "reserved_cpus": sorted(self.reserved),
            "moved_processes": len(self.moved),
        }
