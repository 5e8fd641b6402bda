"""Shared by every tier: figures that tests measure, printed in the session's summary."""

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_umask():
    """The command line makes its process's files owner-only (os.umask); a test that runs it
    in this process gets the umask of before back."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


@pytest.fixture
def measured(request):
    """Record a measured figure (what, value) for the session's summary (`make test` prints
    it): tests that measure scaling or switching times report them there. Kept in the test's
    report (user_properties), so figures from pytest-xdist's workers reach the summary too."""
    return lambda what, value: request.node.user_properties.append(("measured", (what, value)))


def pytest_terminal_summary(terminalreporter):
    figures = [
        value
        for key in ("passed", "failed")
        for report in terminalreporter.stats.get(key, [])
        if report.when == "call"
        for name, value in report.user_properties
        if name == "measured"
    ]
    if figures:
        terminalreporter.section("measured")
        for what, value in figures:
            terminalreporter.write_line(f"{what}: {value}")


# The modules that take longest (seconds in a serial `make test`, rounded), run first: `make test`
# spreads whole modules over pytest-xdist's two workers in this order (--no-loadscope-reorder:
# xdist would otherwise hand out the modules with most tests first, and these long ones, with
# one to four tests each, came last). Modules not named keep their order after these.
LONGEST = {
    "e2e/test_cluster_local.py": 290,
    "integration/test_serve.py": 250,
    "e2e/test_pipeline.py": 180,
    "integration/test_train_faults.py": 175,
    "e2e/test_elastic_training.py": 160,
    "integration/test_stages.py": 175,
    "e2e/test_notebook.py": 140,
    "integration/test_serve_elastic.py": 135,
    "integration/test_serve_haproxy.py": 145,
    "integration/test_batch_generation.py": 105,
    "integration/test_images.py": 105,
    "integration/test_serve_privacy.py": 100,
    "integration/test_monitoring.py": 80,
    "e2e/test_lm_eval.py": 70,
    "integration/test_vllm_start.py": 55,
    "e2e/test_https.py": 40,
}


def pytest_collection_modifyitems(items):
    def weight(item) -> int:
        path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        return LONGEST.get(path, 0)

    items.sort(key=lambda item: -weight(item))  # stable: each module's tests keep their order
