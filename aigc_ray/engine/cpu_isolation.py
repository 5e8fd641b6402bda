"""Keep a node's Ray runtime off the CPU cores vLLM's CPU worker binds itself to.

vLLM's CPU build binds its worker's OpenMP threads to cores of their own and leaves the rest
(``reserved``) to everything else: its scheduler process and the HTTP frontend. In vLLM's own
server that is two processes. In a Ray Serve replica, "everything else" is also Ray's runtime on
the node (GCS, the dashboard and its agents, the log monitor), Serve's controller and proxies,
HAProxy and the replica itself. The kernel wakes them onto any core. Each wake on a worker core
stalls the forward pass; OpenMP threads wait for each other, so one stalled thread stalls them
all. Measured here at 32 streams on 2 cores: vLLM's worker had 89-90% of its core and the
replica served 672 tok/s; with this isolation 99% and 760-769 tok/s (docs/serving.md).

``CpuIsolation.apply()`` runs in the process that started vLLM, once vLLM's worker has bound
itself. It reads the worker's cores from its threads. If another engine's worker is bound on
this node too (several vLLM replicas: vLLM's automatic binding gives them the same cores), it
does nothing. Otherwise it moves to the reserved cores the threads now on every core of:
- this process and its other descendants (vLLM's scheduler process);
- Ray's and Serve's own processes of this node's session, by name: raylet's children that are
  Serve's controller, its proxies (HAProxy's manager and HAProxy under it) or Ray's agents, and
  the raylet's siblings named by the session directory (GCS, the dashboard, the log monitor, the
  autoscaler's monitor).
Never: the raylet (workers it starts later get every core), other workers (other replicas, Ray
Data tasks, idle workers, a job's driver), threads someone else bound, anything outside the
session. ``restore()`` gives the moved threads the node's cores back when the engine closes
(and those of processes started under the moved ones since). A replica killed outright cannot
restore: its Ray processes stay on the reserved cores until they restart. Linux only
(``sched_setaffinity``); elsewhere a no-op.

Never imports Ray: it reads the process tree (psutil) and /proc.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

_SESSION = re.compile(r"(/\S*?/session_[^/\s]+)")
# raylet's children that are the runtime itself (Serve's, Ray's), by their process title
RUNTIME = (
    "ray::ServeController",
    "ray::ProxyActor",
    "ray::HAProxyManager",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
)


def thread_ids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def affinity(tid: int) -> set[int] | None:
    try:
        return set(os.sched_getaffinity(tid))
    except OSError:
        return None


def set_threads(pid: int, cpus: set[int], only_if: set[int]) -> int:
    """Give ``cpus`` to every thread of ``pid`` now on exactly ``only_if``; returns how many
    were moved. Threads that exit meanwhile or are not ours to move are skipped."""
    moved = 0
    for tid in thread_ids(pid):
        try:
            if set(os.sched_getaffinity(tid)) != only_if:
                continue
            os.sched_setaffinity(tid, cpus)
            moved += 1
        except OSError:
            continue
    return moved


def bound_cores(pid: int, node: set[int]) -> set[int]:
    """The cores of ``pid``'s threads that are bound to fewer than ``node``'s (empty: none)."""
    out: set[int] = set()
    for tid in thread_ids(pid):
        cpus = affinity(tid)
        if cpus and cpus < node:
            out |= cpus
    return out


def _raylet(me):
    """This process's raylet (Ray workers are its descendants), or None outside Ray."""
    return next((p for p in me.parents() if p.name() == "raylet"), None)


def _title(p) -> str:
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - psutil.Error: gone, or not ours to read
        return ""
    return cmd[0] if cmd else ""


def runtime_processes(me) -> list:
    """This process and its descendants, plus Ray's and Serve's own processes of this node's
    session (see the module's docstring), found by walking the process tree from this
    process's raylet, never by searching the machine."""
    import psutil

    procs = {me.pid: me}
    for p in me.children(recursive=True):
        procs[p.pid] = p
    try:
        raylet = _raylet(me)
        if raylet is None:
            return list(procs.values())
        runtime = [p for p in raylet.children() if _title(p).startswith(RUNTIME)]
        for p in runtime:
            procs.setdefault(p.pid, p)
            for child in p.children(recursive=True):  # HAProxy under its manager
                procs.setdefault(child.pid, child)
        found = _SESSION.search(" ".join(raylet.cmdline()))
        siblings = raylet.parent().children() if found and raylet.parent() else []
    except psutil.Error:
        return list(procs.values())
    for p in siblings:
        try:
            # its logs dir or sockets under it: "session_1/" is not a prefix of "session_12/"
            if p.pid != raylet.pid and found.group(1) + "/" in " ".join(p.cmdline()):
                procs.setdefault(p.pid, p)
        except psutil.Error:
            continue
    return list(procs.values())


def bound_elsewhere(me, node: set[int]) -> list[int]:
    """Processes under this process's raylet, outside this process's tree, with a thread bound
    to fewer cores than ``node``: another vLLM engine's worker on this node."""
    import psutil

    try:
        raylet = _raylet(me)
        if raylet is None:
            return []
        mine = {me.pid} | {p.pid for p in me.children(recursive=True)}
        others = [p.pid for p in raylet.children(recursive=True) if p.pid not in mine]
    except psutil.Error:
        return []
    return [pid for pid in others if bound_cores(pid, node)]


class CpuIsolation:
    """Processes this engine moved off its worker's cores, to give back (``restore``)."""

    def __init__(
        self, node: set[int], engine: set[int], moved: dict[int, float], seen: dict[int, float]
    ):
        self.node = node  # the cores this process had: the node's, as Ray gave them
        self.engine = engine  # the cores vLLM's worker bound itself to
        self.reserved = node - engine
        self.moved = moved  # pid -> create time (a recycled pid is not ours)
        self.seen = seen  # every process considered at apply() time, pid -> create time

    @classmethod
    def apply(cls) -> CpuIsolation | None:
        """Move this node's Ray runtime to the cores vLLM's worker left free; None (and a log
        line) when there is nothing to do: not Linux, no bound worker, no core left."""
        import psutil

        if not hasattr(os, "sched_setaffinity"):
            return None
        me = psutil.Process()
        node = affinity(0)
        engine: set[int] = set()  # every thread: OpenMP binds each its own
        for child in me.children(recursive=True) if node else ():
            engine |= bound_cores(child.pid, node)
        if not node or not engine:
            logger.info("cpu isolation: vLLM's worker is not bound to cores; nothing to do")
            return None
        if not node - engine:
            logger.info("cpu isolation: vLLM's worker has every core (%s); none left", sorted(node))
            return None
        others = bound_elsewhere(me, node)
        if others:  # vLLM's automatic binding gave them the same cores: nothing to isolate
            logger.info(
                "cpu isolation: another vLLM engine's worker is bound on this node (pids %s); "
                "isolating needs one per node (set VLLM_CPU_OMP_THREADS_BIND per replica)",
                others,
            )
            return None
        out = cls(node, engine, {}, {})
        for p in runtime_processes(me):
            try:
                out.seen[p.pid] = created = p.create_time()
            except psutil.Error:
                continue
            if set_threads(p.pid, out.reserved, only_if=node):
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
        processes moved and in the runtime's processes started since (they inherited the
        reserved cores); never in one that was there before and not moved, nor in a process
        that took a moved one's pid. Returns how many threads."""
        import psutil

        try:
            procs = {p.pid: p for p in runtime_processes(psutil.Process())}
        except psutil.Error:
            procs = {}
        done = 0
        for pid in procs.keys() | self.moved.keys():
            try:
                created = (procs.get(pid) or psutil.Process(pid)).create_time()
            except psutil.Error:
                continue
            moved = self.moved.get(pid) == created
            new = pid in procs and self.seen.get(pid) != created
            if moved or new:
                done += set_threads(pid, self.node, only_if=self.reserved)
        return done

    def describe(self) -> dict:
        return {
            "engine_cpus": sorted(self.engine),
            "reserved_cpus": sorted(self.reserved),
            "moved_processes": len(self.moved),
        }
