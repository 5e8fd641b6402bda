"""CpuIsolation (aigc_ray.engine.cpu_isolation): a process tree like a vLLM replica's, without
vLLM or Ray. The serving test on a real Ray node is
tests/integration/test_serve_privacy.py::test_vllm_worker_has_its_cores_to_itself."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from aigc_ray.engine.cpu_isolation import _SESSION

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and at least 2 usable cores",
)

SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from aigc_ray.engine.cpu_isolation import CpuIsolation

    cores = sorted(os.sched_getaffinity(0))
    first = cores[0]
    def spawn(code):
        return subprocess.Popen([sys.executable, "-c", code])
    # "vLLM's worker": one thread binds itself to the first core (as an OpenMP thread of
    # vLLM's CPU worker does); its main thread stays on every core
    worker = spawn(
        "import os, threading, time; "
        f"threading.Thread(target=lambda: (os.sched_setaffinity(0, {{{first}}}), "
        "time.sleep(60)), daemon=True).start(); time.sleep(60)"
    )
    # "vLLM's scheduler": unbound, with a second thread
    sched = spawn("import threading, time; "
                  "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
                  "time.sleep(60)")
    deadline = time.monotonic() + 30
    def ready():
        bound = [os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{worker.pid}/task")]
        return {first} in bound and len(os.listdir(f"/proc/{sched.pid}/task")) == 2
    while not ready():
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def masks(pid):
        return sorted({tuple(sorted(os.sched_getaffinity(int(t))))
                       for t in os.listdir(f"/proc/{pid}/task")})

    iso = CpuIsolation.apply()
    applied = {"me": masks(os.getpid()), "worker": masks(worker.pid), "sched": masks(sched.pid)}
    later = spawn("import time; time.sleep(60)")  # started meanwhile: inherits the reserved cores
    time.sleep(0.3)
    inherited = masks(later.pid)
    iso.restore()
    restored = {"me": masks(os.getpid()), "worker": masks(worker.pid), "sched": masks(sched.pid),
                "later": masks(later.pid)}
    for p in (worker, sched, later):
        p.kill()
    print(json.dumps({"cores": cores, "desc": iso.describe(), "applied": applied,
                      "inherited": inherited, "restored": restored}))
    """
)


def test_the_workers_cores_are_left_to_it_and_given_back():
    before = sorted(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    cores, first = r["cores"], r["cores"][0]
    rest = [c for c in cores if c != first]
    assert r["desc"] == {"engine_cpus": [first], "reserved_cpus": rest, "moved_processes": 3}
    # every thread on every core moved (this process's, the scheduler's, the worker's main
    # one); the worker's bound thread left alone
    assert r["applied"] == {"me": [rest], "worker": sorted([[first], rest]), "sched": [rest]}
    assert r["inherited"] == [rest]
    # given back: the moved threads and the process started since; the bound thread keeps
    # its own binding
    assert r["restored"] == {
        "me": [cores],
        "worker": sorted([[first], cores]),
        "sched": [cores],
        "later": [cores],
    }
    # the process that started it (not in its tree, not in a Ray session) was never touched
    assert sorted(os.sched_getaffinity(0)) == before


def test_nothing_to_do_when_no_child_is_bound():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from aigc_ray.engine.cpu_isolation import CpuIsolation; "
            "print(CpuIsolation.apply(), sorted(os.sched_getaffinity(0)))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split()[0] == "None"
    assert out.stdout.split(None, 1)[1].strip() == str(sorted(os.sched_getaffinity(0)))


def test_the_session_directory_is_read_from_the_raylets_command_line():
    cmd = (
        "/x/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name="
        "/tmp/ray/session_2026-12-05_01-25-12_233632_26160/sockets/raylet --node_ip_address=1"
    )
    assert _SESSION.search(cmd).group(1) == "/tmp/ray/session_2026-12-05_01-25-12_233632_26160"


class _Proc:
    """A process of a fake tree, with the psutil methods runtime_processes reads."""

    def __init__(self, pid, title, children=(), name=None):
        self.pid, self.title, self.kids, self.up = pid, title, list(children), None
        self._name = name or title.split()[0].rsplit("/", 1)[-1]
        for c in self.kids:
            c.up = self

    def cmdline(self):
        return self.title.split()

    def name(self):
        return self._name

    def children(self, recursive=False):
        out = []
        for c in self.kids:
            out += [c, *(c.children(True) if recursive else [])]
        return out

    def parent(self):
        return self.up

    def parents(self):
        out, p = [], self.up
        while p:
            out, p = [*out, p], p.up
        return out


def test_only_the_runtime_of_its_own_session_is_taken():
    """Serve's and Ray's own processes of the session and the replica's tree; not the raylet,
    other workers (another replica, an idle worker, a job's driver), another session's GCS,
    the driver or the user's programs."""
    from aigc_ray.engine.cpu_isolation import runtime_processes

    me = _Proc(10, "ray::ServeReplica:aigc:model-a", [_Proc(11, "VLLM::EngineCore")])
    raylet = _Proc(
        4,
        "/x/raylet --raylet_socket_name=/tmp/ray/session_X/sockets/raylet",
        [
            _Proc(5, "ray::ServeController"),
            _Proc(6, "ray::HAProxyManager", [_Proc(7, "haproxy -f /tmp/h.cfg")]),
            _Proc(15, "ray::DashboardAgent"),
            _Proc(8, "ray::IDLE"),
            _Proc(9, "ray::ServeReplica:aigc:model-b"),
            me,
            _Proc(12, "ray::JobSupervisor", [_Proc(13, "python job.py")]),
        ],
    )
    _Proc(
        1,
        "python bench.py",
        [
            _Proc(2, "/x/gcs_server --log_dir=/tmp/ray/session_X/logs"),
            _Proc(3, "/x/gcs_server --log_dir=/tmp/ray/session_Y/logs"),
            raylet,
            _Proc(14, "python mine.py"),
        ],
    )
    assert sorted(p.pid for p in runtime_processes(me)) == [2, 5, 6, 7, 10, 11, 15]


def test_no_isolation_beside_another_engines_bound_worker(monkeypatch):
    """Several vLLM replicas on one node (vLLM binds each worker to the same cores): apply()
    leaves everything where it is."""
    from aigc_ray.engine import cpu_isolation

    me = _Proc(10, "ray::ServeReplica:aigc:model-a", [_Proc(11, "VLLM::Worker")])
    other = _Proc(21, "VLLM::Worker")
    raylet = _Proc(
        4,
        "/x/raylet --raylet_socket_name=/tmp/ray/session_X/sockets/raylet",
        [_Proc(5, "ray::ServeController"), _Proc(20, "ray::ServeReplica:b", [other]), me],
    )
    masks = {11: {0}, 21: {0}, 5: {0, 1}, 20: {0, 1}, 10: {0, 1}}
    monkeypatch.setattr(cpu_isolation, "thread_ids", lambda pid: [pid])
    monkeypatch.setattr(cpu_isolation, "affinity", lambda tid: masks.get(tid))
    assert cpu_isolation.bound_elsewhere(me, {0, 1}) == [21]
    masks[21] = {0, 1}  # the other replica's engine not bound (builtin, or not started yet)
    assert cpu_isolation.bound_elsewhere(me, {0, 1}) == []
    assert raylet.children()  # (the tree is the raylet's)
