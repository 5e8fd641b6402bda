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
    # "vLLM's worker": binds itself to the first core, as vLLM's CPU worker does
    worker = spawn(f"import os, time; os.sched_setaffinity(0, {{{first}}}); time.sleep(60)")
    # "vLLM's scheduler": unbound, with a second thread
    sched = spawn("import threading, time; "
                  "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
                  "time.sleep(60)")
    deadline = time.monotonic() + 30
    def ready():
        return (os.sched_getaffinity(worker.pid) == {first}
                and len(os.listdir(f"/proc/{sched.pid}/task")) == 2)
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
    assert r["desc"] == {"engine_cpus": [first], "reserved_cpus": rest, "moved_processes": 2}
    # every thread of this process and of the scheduler moved; the bound worker left alone
    assert r["applied"] == {"me": [rest], "worker": [[first]], "sched": [rest]}
    assert r["inherited"] == [rest]
    # given back: the moved ones and the one started since; the worker keeps its own binding
    assert r["restored"] == {
        "me": [cores],
        "worker": [[first]],
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
