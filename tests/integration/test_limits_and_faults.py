"""Limits under parallel load, and the stack surviving its parts failing (issue 4)."""

from __future__ import annotations

import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import figures
import pytest

from dce_client import extension_body, post_like_extension

CAP = 20  # DCE_MAX_CONCURRENT in the test stack (the default)


def test_three_times_the_concurrency_cap_admits_exactly_the_cap(stack):
    url = f"{stack.base}/k/{stack.other_key}/api/dce/proxy"
    body = extension_body("Go on.", max_tokens=512, ignore_eos=True)
    gate = threading.Barrier(3 * CAP, timeout=60)

    def fire(_):
        with stack.session() as session:
            session.get(f"{stack.base}/healthz", timeout=30)  # TLS handshake done before the race
            gate.wait()
            return post_like_extension(session, url, body)

    with ThreadPoolExecutor(3 * CAP) as pool:
        results = list(pool.map(fire, range(3 * CAP)))
    statuses = sorted(result.status for result in results)
    assert statuses.count(200) == CAP, statuses
    assert statuses.count(429) == 2 * CAP, statuses
    assert all(result.finish_reason == "length" for result in results if result.status == 200)


def _started_at(stack, service):
    container = stack.container(service)
    container.reload()
    return container.attrs["State"]["StartedAt"]


def _wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def _ready(stack) -> bool:
    with stack.session() as session:
        try:
            return session.get(f"{stack.base}/readyz", timeout=5).status_code == 200
        except OSError:
            return False


@pytest.mark.disruptive
def test_vllm_killed_mid_stream_ends_streams_then_recovers_without_proxy_restart(stack, session):
    proxy_started = _started_at(stack, "proxy")
    url = f"{stack.base}/k/{stack.key}/api/dce/proxy"
    body = extension_body("Keep going.", max_tokens=4096, ignore_eos=True)
    streaming = threading.Barrier(4, timeout=120)

    def run(_):
        seen = False

        def on_chunk(result):
            nonlocal seen
            if not seen and result.chunks:
                seen = True
                streaming.wait()

        with stack.session() as own:
            started = time.monotonic()
            return post_like_extension(own, url, body, on_chunk=on_chunk), started

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run, i) for i in range(3)]
        streaming.wait()
        stack.container("vllm").kill()
        killed_at = time.monotonic()
        results = [future.result(timeout=30)[0] for future in futures]
        ended_within = time.monotonic() - killed_at

    assert ended_within < 10
    for result in results:
        assert result.status == 200 and result.saw_done
        assert result.finish_reason == "error"  # the extension shows the message and closes the tab
        assert result.errors and "vLLM" in result.errors[0]["message"]

    down = session.post(f"{stack.base}/api/dce/generate", headers={"X-API-Key": stack.key},
                        json={"prompt": "hi", "n": 1, "max_tokens": 4}, timeout=30)
    assert down.status_code == 503 and int(down.headers["Retry-After"]) > 0
    assert down.json()["error"]["code"] == "upstream_unavailable"

    vllm = stack.container("vllm")
    vllm.reload()
    if vllm.status != "running":
        vllm.start()  # Docker's restart policy does not bring back a container killed through the API
    _wait_until(lambda: _ready(stack), 300, "vLLM to serve again")
    again = session.post(f"{stack.base}/api/dce/generate", headers={"X-API-Key": stack.key},
                         json={"prompt": "hi", "n": 2, "max_tokens": 4}, timeout=60)
    assert again.status_code == 200, again.text
    assert _started_at(stack, "proxy") == proxy_started  # recovered without restarting the proxy
    figures.add("faults_survived", 1)


@pytest.mark.disruptive
def test_killed_proxy_worker_is_replaced(stack, session):
    find_and_kill_worker = (
        "import os, signal, pathlib\n"
        "workers = [int(p.name) for p in pathlib.Path('/proc').iterdir() if p.name.isdigit()\n"
        "           and (p / 'stat').read_text().split(')')[1].split()[1] == '1']\n"
        "os.kill(workers[0], signal.SIGKILL); print(workers[0])\n")
    code, out = stack.exec_python("proxy", find_and_kill_worker)
    assert code == 0, out
    _wait_until(lambda: _ready(stack), 30, "a new proxy worker")
    response = session.get(f"{stack.base}/v1/models", headers={"X-API-Key": stack.key}, timeout=10)
    assert response.status_code == 200
    figures.add("faults_survived", 1)


@pytest.mark.disruptive
def test_caddy_restart_keeps_its_certificates(stack):
    def certificate():
        return ssl.get_server_certificate(("localhost", stack.https_port))

    before = certificate()
    caddy = stack.container("caddy")
    caddy.restart(timeout=10)
    caddy.reload()
    # A restarted container may get another random loopback port.
    stack.https_port = int(caddy.attrs["NetworkSettings"]["Ports"]["443/tcp"][0]["HostPort"])
    _wait_until(lambda: _ready(stack), 60, "Caddy to serve again")
    assert certificate() == before
    figures.add("faults_survived", 1)


@pytest.mark.disruptive
def test_revoked_key_stays_revoked_and_config_survives_a_whole_stack_restart(stack):
    keys_file = stack.keys_file
    keys_file.write_text("".join(line + "\n" for line in keys_file.read_text().splitlines()
                                 if not line.startswith("other:")))
    certificate_before = ssl.get_server_certificate(("localhost", stack.https_port))
    subprocess.run(stack.compose.compose_command_property + ["restart"], check=True, cwd=stack.compose.context)
    caddy = stack.container("caddy")
    caddy.reload()
    stack.https_port = int(caddy.attrs["NetworkSettings"]["Ports"]["443/tcp"][0]["HostPort"])
    _wait_until(lambda: _ready(stack), 300, "the stack to serve again")
    with stack.session() as session:
        def models(key):
            return session.get(f"{stack.base}/v1/models", headers={"X-API-Key": key}, timeout=10).status_code

        assert models(stack.other_key) == 401  # revoked by editing the key file and restarting
        assert models(stack.key) == 200
    assert ssl.get_server_certificate(("localhost", stack.https_port)) == certificate_before
    figures.add("faults_survived", 1)
