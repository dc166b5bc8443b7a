"""A stop on its way (`make down`, issue 14): new requests get a JSON 503 with a reason and
Retry-After while running streams finish (stopping.py); `python3 -m dce_proxy.stop announce`
waits for them, in a real gunicorn (stop.py); an announcement never outlives its time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests

from dce_proxy import report, stop, stopping

from unit_helpers import ALICE_KEY, Tab, assert_error, bearer
from wire import wait_until


@pytest.fixture()
def announcement(monkeypatch, tmp_path) -> Path:
    """Where this test's proxy looks for the announcement (beside its metrics files)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return tmp_path / "stopping"


def test_a_stop_on_its_way_answers_every_new_request_with_the_reason(client, announcement):
    assert client.get("/v1/models", headers=bearer()).status_code == 200
    stopping.announce(time.time() + 600)
    for method, path, headers in [("GET", "/v1/models", bearer()), ("GET", "/v1/models", {}),
                                  ("POST", "/api/dce/proxy", bearer()), ("GET", "/readyz", {})]:
        response = client.open(path, method=method, headers=headers, json={"messages": []} if method == "POST" else None)
        error = assert_error(response, 503, "server_error")
        assert error["code"] == "stack_stopping" and "stopping" in error["message"]
        assert response.headers["Retry-After"] == str(stopping.RETRY_AFTER_SECONDS)
    assert client.get("/healthz").status_code == 200  # Docker's healthcheck: still alive
    assert stop.main(["cancel"]) == 0  # make down given up
    assert client.get("/v1/models", headers=bearer()).status_code == 200


def test_an_announcement_left_behind_lapses_by_itself(client, announcement):
    stopping.announce(time.time() - 1)  # a make down cut short, long ago
    assert client.get("/v1/models", headers=bearer()).status_code == 200
    announcement.write_text("half written")
    assert client.get("/v1/models", headers=bearer()).status_code == 200


def test_the_announcement_waits_for_the_running_stream_and_refuses_new_ones(proxy_server, fake_vllm, monkeypatch):
    server = proxy_server(DCE_HEARTBEAT_SECONDS="0.2")
    # As `docker compose exec proxy python3 -m dce_proxy.stop` runs: beside that gunicorn.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(server.metrics_dir))
    monkeypatch.setenv("DCE_METRICS_PORT", server.metrics_url.rsplit(":", 1)[1].split("/")[0])
    fake_vllm.fault, fake_vllm.hold_stream = "stall", threading.Event()
    running = Tab(f"{server.url}/k/{ALICE_KEY}/api/dce/proxy", "A")
    wait_until(lambda: running.progress.content, 5, "the tab's first token")

    assert stop.announce_and_wait(0) == 1  # the grace is over: one stream still runs
    refused = requests.get(f"{server.url}/v1/models", headers=bearer(), timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "stack_stopping"

    polls, waited = [], []

    def counted_read() -> str:
        polls.append(1)
        return report.read_metrics()

    monkeypatch.setattr(stop, "read_metrics", counted_read)
    waiter = threading.Thread(target=lambda: waited.append(stop.announce_and_wait(60, poll_seconds=0.05)))
    waiter.start()
    wait_until(lambda: len(polls) >= 3, 10, "the announcement to look at the streams a few times")
    assert not waited  # still waiting: the stream runs
    fake_vllm.hold_stream.set()
    assert running.join().finish_reason == "stop"  # the running stream was never cut
    waiter.join(10)
    assert waited == [0]


def test_the_command_says_how_to_use_it():
    assert stop.main(["announce", "600"]) == 2
