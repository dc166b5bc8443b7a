"""Who gets in, and what is reachable from outside: auth forms, TLS redirect, network isolation."""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import ssl
import time
from pathlib import Path

import figures
import pytest
import requests

PROMPT_MARKER = "PROMPT-MARKER-7f3a"
GUNICORN_CONF = Path(__file__).resolve().parents[2] / "proxy" / "gunicorn.conf.py"


def _models(stack, session, path="/v1/models", **headers):
    return session.get(f"{stack.base}{path}", headers=headers, timeout=30)


@pytest.mark.parametrize("form", ["bearer", "x-api-key", "path", "basic"])
def test_each_key_form_is_accepted(stack, session, form):
    key = stack.key
    if form == "bearer":
        response = _models(stack, session, Authorization=f"Bearer {key}")
    elif form == "x-api-key":
        response = _models(stack, session, **{"X-API-Key": key})
    elif form == "path":
        response = _models(stack, session, path=f"/k/{key}/v1/models")
    else:
        # What node-fetch 2 sends for https://dce:KEY@HOST/...
        token = base64.b64encode(f"dce:{key}".encode()).decode()
        response = _models(stack, session, Authorization=f"Basic {token}")
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789abcdef"}])
def test_missing_or_wrong_key_is_refused(stack, session, headers):
    response = _models(stack, session, **headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_wrong_key_in_path_is_refused(stack, session):
    assert _models(stack, session, path="/k/not-the-key-0123456789/v1/models").status_code == 401


def test_http_redirects_to_https(stack):
    response = requests.get(f"http://localhost:{stack.http_port}/v1/models", allow_redirects=False, timeout=10)
    assert response.status_code in (301, 308)
    assert response.headers["Location"].startswith("https://localhost")


def test_security_headers(stack, session):
    response = _models(stack, session, Authorization=f"Bearer {stack.key}")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    # localhost is no public name: HSTS would pin HTTPS on every local service for a year (issue 12).
    assert "Strict-Transport-Security" not in response.headers


def test_caddy_drops_idle_connections_to_the_proxy_before_gunicorn_does(stack):
    # Otherwise Caddy may reuse a connection gunicorn has just closed (issue 12).
    adapted = stack.container("caddy").exec_run(["caddy", "adapt", "--config", "/etc/caddy/Caddyfile"])
    assert adapted.exit_code == 0, adapted.output
    config = json.loads(adapted.output)
    (proxy_route,) = [handler for handler in _handlers(config) if handler.get("handler") == "reverse_proxy"]
    idle_ns = proxy_route["transport"]["keep_alive"]["idle_timeout"]
    gunicorn_keepalive = int(re.search(r"^keepalive = (\d+)$", GUNICORN_CONF.read_text(), re.M).group(1))
    assert idle_ns / 1e9 < gunicorn_keepalive


def _handlers(node):
    """Every handler object in an adapted Caddy config, however deeply its routes nest."""
    if isinstance(node, dict):
        if "handler" in node:
            yield node
        for value in node.values():
            yield from _handlers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _handlers(value)


@pytest.mark.parametrize("path", ["/metrics", "/tokenize", "/health", "/version", "/v1/load_lora_adapter"])
def test_vllm_own_endpoints_are_not_reachable_through_caddy(stack, session, path):
    response = session.get(f"{stack.base}/k/{stack.key}{path}", timeout=10)
    assert response.status_code in (404, 405)
    assert "error" in response.json()


def test_only_caddy_publishes_ports(stack):
    for service in ("caddy", "proxy", "vllm"):
        ports = stack.container(service).attrs["HostConfig"]["PortBindings"] or {}
        if service == "caddy":
            assert set(ports) == {"80/tcp", "443/tcp"}
        else:
            assert ports == {}, f"{service} publishes {ports}"


def test_vllm_is_only_on_the_backend_network(stack):
    networks = set(stack.container("vllm").attrs["NetworkSettings"]["Networks"])
    assert networks == {"dce-test_backend"}
    assert "dce-test_backend" not in stack.container("caddy").attrs["NetworkSettings"]["Networks"]


# Runs in the proxy container: vLLM's answer to a /v1 request without its key, then with it.
_VLLM_WITH_AND_WITHOUT_KEY = """
import urllib.error, urllib.request
def status(headers):
    try:
        return urllib.request.urlopen(urllib.request.Request("http://vllm:8000/v1/models", headers=headers)).status
    except urllib.error.HTTPError as error:
        return error.code
key = open("/run/secrets/vllm_api_key").read().strip()
print(status({}), status({"Authorization": "Bearer " + key}))
"""


def test_vllm_answers_only_the_proxys_key(stack):
    # Anything else that reaches the backend network (or the host's bridge) cannot use the GPU (issue 12).
    code, out = stack.exec_python("proxy", _VLLM_WITH_AND_WITHOUT_KEY)
    assert code == 0 and out.split() == ["401", "200"], out


def test_proxy_reaches_vllm_but_caddy_cannot_even_resolve_it(stack):
    code, out = stack.exec_python("proxy", "import urllib.request; print(urllib.request.urlopen('http://vllm:8000/health').status)")
    assert code == 0 and out.strip() == "200", out
    caddy = stack.container("caddy")
    assert caddy.exec_run(["nslookup", "proxy"]).exit_code == 0  # the lookup itself works...
    lookup = caddy.exec_run(["nslookup", "vllm"])
    assert lookup.exit_code != 0 and b"can't find vllm" in lookup.output  # ...but vllm is unknown there
    vllm_ip = stack.container("vllm").attrs["NetworkSettings"]["Networks"]["dce-test_backend"]["IPAddress"]
    direct = caddy.exec_run(["wget", "-q", "-T", "3", "-O", "-", f"http://{vllm_ip}:8000/health"])
    assert direct.exit_code != 0, "Caddy reached vLLM by its address"


def _post_raw(stack, target: str, body: dict) -> int:
    """POSTs with the request target exactly as given (requests would normalise it)."""
    context = ssl.create_default_context(cafile=stack.ca_file)
    connection = http.client.HTTPSConnection("localhost", stack.https_port, context=context, timeout=60)
    try:
        connection.request("POST", target, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_logs_hold_no_key_and_no_prompt(stack, session):
    generate = {"prompt": PROMPT_MARKER, "n": 1, "max_tokens": 8}
    path_response = session.post(f"{stack.base}/k/{stack.key}/api/dce/generate", json=generate, timeout=60)
    header_response = session.post(f"{stack.base}/v1/completions", headers={"Authorization": f"Bearer {stack.other_key}"},
                                   json={"prompt": PROMPT_MARKER, "max_tokens": 8}, timeout=60)
    # The other headers the proxy takes a key from: X-API-Key, and Basic credentials' password.
    other_headers = {stack.load_keys[5]: {"X-API-Key": stack.load_keys[5]},
                     stack.load_keys[6]: {"Authorization": "Basic " + base64.b64encode(
                         f"curator:{stack.load_keys[6]}".encode()).decode()}}
    assert path_response.status_code == header_response.status_code == 200
    assert [session.get(f"{stack.base}/v1/models", headers=headers, timeout=60).status_code
            for headers in other_headers.values()] == [200, 200]
    # Other spellings of the key path the proxy accepts: an escaped "k" or "/", an absolute URL.
    spelled = {stack.load_keys[7]: f"/%6B/{stack.load_keys[7]}/api/dce/generate",
               stack.load_keys[8]: f"/k%2F{stack.load_keys[8]}/api/dce/generate",
               stack.load_keys[9]: f"https://localhost:{stack.https_port}/k/{stack.load_keys[9]}/api/dce/generate"}
    assert [_post_raw(stack, target, generate) for target in spelled.values()] == [200, 200, 200]
    answer = path_response.json()["responses"][0]
    logs = {service: stack.container(service).logs().decode(errors="replace") for service in ("caddy", "proxy")}
    assert "/k/REDACTED" in logs["caddy"]  # the request was logged, with its key cut out
    # Every form the proxy accepts a key in, sent above: none of the keys may be in a log.
    keys = [stack.key, stack.other_key, *other_headers, *spelled]
    figures.add("keys_in_logs", sum(text.count(key) for text in logs.values() for key in keys))
    for service, text in logs.items():
        for key in keys:
            assert key not in text, f"API key in {service} logs"
        assert PROMPT_MARKER not in text, f"prompt in {service} logs"
        if len(answer) >= 8:
            assert answer not in text, f"answer in {service} logs"


def test_a_wrong_key_counts_against_the_callers_own_address_whatever_it_claims(stack, session):
    # The failed-key limit is per client address, as Caddy saw it: a client cannot pick another
    # address's budget (X-Forwarded-For), and clients do not share Caddy's own.
    claimed = "203.0.113.7"
    before = stack.limits_counts("*auth-failures*")
    response = session.get(f"{stack.base}/v1/models", timeout=30,
                           headers={"X-API-Key": "wrong-" + stack.key, "X-Forwarded-For": claimed})
    assert response.status_code == 401, response.text
    after = stack.limits_counts("*auth-failures*")
    (counted,) = [key for key, count in after.items() if count != before.get(key, 0)]
    # One more (or the first, had the counter lapsed between the two reads).
    assert after[counted] in (before.get(counted, 0) + 1, 1), (before, after)
    caddy = stack.container("caddy").attrs["NetworkSettings"]["Networks"].values()
    for address in [claimed, *(network["IPAddress"] for network in caddy)]:
        assert f"/{address}/" not in counted, (address, counted)


def test_healthchecks_do_not_flood_the_logs(stack):
    # The stack only came up once every healthcheck had passed, so each ran at least once.
    for service in ("caddy", "proxy"):
        state = stack.container(service).attrs["State"]["Health"]
        assert state["Log"], f"{service} healthcheck never ran"
    logs = {service: stack.container(service).logs().decode(errors="replace") for service in ("caddy", "proxy")}
    assert '"admin.api"' not in logs["caddy"]
    assert "/healthz" not in logs["proxy"]


def test_another_host_header_reaches_nothing(stack, session):
    # Same TLS name (SNI), other Host: Caddy has no site for it, so nothing is proxied.
    response = session.get(f"{stack.base}/v1/models", timeout=10,
                           headers={"Host": "vllm:8000", "Authorization": f"Bearer {stack.key}"})
    assert "X-Request-Id" not in response.headers  # the proxy never saw it
    assert b"tiny" not in response.content


def test_slow_client_sending_headers_is_cut(stack):
    context = ssl.create_default_context(cafile=stack.ca_file)
    with socket.create_connection(("localhost", stack.https_port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")  # ...and never the blank line
            started = time.monotonic()
            try:
                while tls.recv(1024):
                    pass
            except (ConnectionError, ssl.SSLError):
                pass
            assert time.monotonic() - started < 25, "Caddy kept a slowloris connection open"


def test_containers_are_locked_down(stack):
    for service in ("caddy", "proxy", "vllm"):
        host_config = stack.container(service).attrs["HostConfig"]
        assert "no-new-privileges:true" in host_config["SecurityOpt"], service
        assert host_config["CapDrop"] == ["ALL"], service
        assert host_config["Privileged"] is False
        assert not any("docker.sock" in bind for bind in host_config.get("Binds") or []), service
    for service in ("caddy", "proxy"):
        assert stack.container(service).attrs["HostConfig"]["ReadonlyRootfs"] is True, service
    assert stack.container("proxy").attrs["Config"]["User"] == "10001:10001"


def test_vllm_runs_as_its_own_user_and_owns_its_model_cache(stack):
    vllm = stack.container("vllm")
    assert vllm.attrs["Config"]["User"] == "2000:0"
    status = vllm.exec_run(["cat", "/proc/1/status"]).output.decode()
    assert "\nUid:\t2000\t2000\t2000\t2000\n" in status, status
    # The cache volume was root's when created; the one-shot owner container handed it over.
    probe = vllm.exec_run(["sh", "-c", "touch /home/vllm/.cache/huggingface/probe && stat -c %u:%g /home/vllm/.cache/huggingface"])
    assert probe.exit_code == 0 and probe.output.decode().strip() == "2000:0", probe.output
    owner = stack.container("vllm-cache-owner").attrs
    assert owner["State"]["Status"] == "exited" and owner["State"]["ExitCode"] == 0
    assert owner["HostConfig"]["CapDrop"] == ["ALL"]
    assert sorted(owner["HostConfig"]["CapAdd"]) == ["CAP_CHOWN", "CAP_DAC_READ_SEARCH"]
    assert owner["HostConfig"]["NetworkMode"] == "none"
    assert "no-new-privileges:true" in owner["HostConfig"]["SecurityOpt"]


def test_the_limits_store_answers_only_the_proxys_password_and_is_debians_patched_build(stack):
    limits = stack.container("limits")
    refused = limits.exec_run(["redis-cli", "ping"])
    assert b"NOAUTH" in refused.output, refused.output
    allowed = limits.exec_run(["redis-cli", "ping"], environment={"REDISCLI_AUTH": stack.limits_password})
    assert allowed.output.strip() == b"PONG", allowed.output
    # The password reached Redis on stdin: no process's command line shows it.
    assert stack.limits_password not in json.dumps(limits.top(ps_args="-eo pid,args"))
    # Debian's security fixes for the 2025 Lua CVEs (CVE-2025-49844 and others) are in 1~deb12u6.
    version = limits.exec_run(["dpkg-query", "-W", "-f", "${Version}", "redis-server"]).output.decode()
    assert int(re.fullmatch(r"5:7\.0\.15-1~deb12u(\d+)", version)[1]) >= 6, version
