"""Fixtures of the integration suite: one real stack (stack.py) for the whole session."""

from __future__ import annotations

import figures
import pytest

from stack import REPO, Stack, start_stack

LOG_FILE = REPO / ".test-stack.log"


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    stack = start_stack(tmp_path_factory.mktemp("stack"))
    yield stack
    # Kept for reading after a failure: the stack and its logs are gone once it stops.
    stdout, stderr = stack.compose.get_logs()
    LOG_FILE.write_text(stdout + stderr)
    stack.compose.stop()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_sep("-", "hardening figures (unit + integration)")
    terminalreporter.write_line(figures.line())


def pytest_collection_modifyitems(items):
    # Tests that kill or restart services run last, so the others see a calm stack.
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


@pytest.fixture()
def session(stack: Stack):
    with stack.session() as session:
        yield session
