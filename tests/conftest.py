"""Shared by every tier: figures that tests measure, printed in the session's summary."""

import pytest

_REPORTS: list[tuple[str, str]] = []


@pytest.fixture
def measured():
    """Record a measured figure (what, value) for the session's summary (`make test` prints
    it): tests that measure scaling or switching times report them there."""
    return lambda what, value: _REPORTS.append((what, value))


def pytest_terminal_summary(terminalreporter):
    if _REPORTS:
        terminalreporter.section("measured")
        for what, value in _REPORTS:
            terminalreporter.write_line(f"{what}: {value}")
