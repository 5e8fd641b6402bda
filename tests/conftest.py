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
