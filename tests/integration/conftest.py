"""Fixtures of the integration suite: one real stack (stack.py) for the whole session."""

from __future__ import annotations

import ssl

import figures
import openai
import pytest

from machine import Watch
from stack import REPO, Stack, remove_stack, start_stack
from wire import wait_until

LOG_FILE = REPO / ".test-stack.log"


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    stack = start_stack(tmp_path_factory.mktemp("stack"))
    yield stack
    # Kept for reading after a failure: the stack and its logs are gone once it stops.
    stdout, stderr = stack.compose.get_logs()
    LOG_FILE.write_text(stdout + stderr)
    remove_stack(stack.compose)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_sep("-", "hardening figures (unit + integration)")
    terminalreporter.write_line(figures.line())


def pytest_collection_modifyitems(items):
    # Tests that kill or restart services run last, so the others see a calm stack.
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


@pytest.fixture(autouse=True)
def _stack_serving(request):
    """Each test that uses the stack starts from a stack that serves: a test before it that
    restarted a service need not wait for it to come back (the last one then never waits)."""
    if "stack" in request.fixturenames:
        stack = request.getfixturevalue("stack")
        wait_until(stack.ready, 300, "the stack to serve again after an earlier test restarted part of it",
                   interval=1)


@pytest.fixture()
def session(stack: Stack):
    with stack.session() as session:
        yield session


@pytest.fixture()
def sdk(stack: Stack) -> openai.OpenAI:
    """The official OpenAI SDK, pointed at the stack's /v1 (it trusts the stack's CA, never retries)."""
    with openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=stack.ca_file)) as http_client:
        yield openai.OpenAI(base_url=f"{stack.base}/v1", api_key=stack.key, http_client=http_client, max_retries=0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    item.machine_watch = Watch()
    yield
    item.machine_watch.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    watch = getattr(item, "machine_watch", None)
    if report.when != "call" or not report.failed or watch is None:
        return
    # With the failure: whether the machine was working meanwhile (machine.py).
    stack = item.funcargs.get("stack")
    proxy_log = ""
    if stack is not None:
        try:
            proxy_log = stack.container("proxy").logs(since=watch.started_at).decode(errors="replace")
        except Exception as exc:  # a report that cannot read the log still says the rest
            proxy_log = f"(proxy log unreadable: {exc})"
    report.sections.append(("machine during the test", watch.summary(proxy_log)))
