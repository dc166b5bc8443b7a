"""The production compose file as a user gets it: valid with .env.example, only Caddy published."""

from __future__ import annotations

import json
import os
import re
import subprocess

from stack import LOCAL_IMAGES, REPO


def _config(*files: str, **settings: str) -> dict:
    """The merged configuration, with .env.example and `settings` (what `make up` writes into .env)."""
    args = ["docker", "compose", "--env-file", ".env.example"]
    for name in files:
        args += ["-f", name]
    # As a user runs it: none of the suite's COMPOSE_* settings, only .env.example.
    env = {**{name: value for name, value in os.environ.items() if not name.startswith("COMPOSE_")}, **settings}
    result = subprocess.run(args + ["config", "--format", "json"], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_production_compose_publishes_only_caddy():
    services = _config("compose.yaml")["services"]
    assert {name for name, service in services.items() if service.get("ports")} == {"caddy"}
    assert services["vllm"]["networks"].keys() == {"backend"}
    assert services["vllm"]["image"] == "vllm/vllm-openai:v0.32.0"  # the release the CPU test image runs
    assert services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["vllm"]["user"] == "2000:0"
    (cache,) = [volume for volume in services["vllm"]["volumes"] if volume["source"] == "hf_cache"]
    assert services["vllm"]["environment"]["HF_HOME"] == cache["target"]  # the model lands in the volume
    # Telemetry off (issue 12): vLLM's usage stats, and every library that honours DO_NOT_TRACK.
    assert {name: services["vllm"]["environment"].get(name)
            for name in ("VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "HF_HUB_DISABLE_TELEMETRY")} == \
        {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    # The front door opens while the model downloads and vLLM loads: requests then get the proxy's
    # 503 with the reason, which the download leaves where the proxy reads it.
    assert "vllm" not in services["proxy"].get("depends_on", {})
    assert services["vllm"]["depends_on"]["model-download"]["condition"] == "service_completed_successfully"
    status = services["proxy"]["environment"]["DCE_MODEL_STATUS_FILE"]
    assert status == services["model-download"]["environment"]["DCE_MODEL_STATUS"]
    assert {(v["source"], v["target"]) for v in services["proxy"]["volumes"]} & \
        {(v["source"], v["target"]) for v in services["model-download"]["volumes"]} == {("model_status", "/model-status")}
    # The download and the cache's owner run from the image vLLM already has: no other image to pull.
    assert services["vllm-cache-owner"]["image"] == services["model-download"]["image"] == services["vllm"]["image"]
    assert services["model-download"]["environment"]["DCE_MODEL"] == "openai/gpt-oss-20b"


def test_cpu_profile_drops_the_gpu_and_keeps_the_rest():
    services = _config("compose.yaml", "compose.cpu.yaml")["services"]
    assert "deploy" not in services["vllm"]
    assert services["vllm"]["image"] == services["vllm-cache-owner"]["image"] == \
        services["model-download"]["image"] == LOCAL_IMAGES["VLLM_CPU_IMAGE"]  # .env.example's, built here
    assert services["model-download"]["environment"]["DCE_MODEL"] == "/models/tiny"  # in the image
    assert {name for name, service in services.items() if service.get("ports")} == {"caddy"}


def test_every_service_but_the_engine_has_memory_and_process_bounds():
    # A runaway proxy must not take vLLM down with it (issue 12); vLLM's own need depends on the model.
    services = _config("compose.yaml", "compose.scale.yaml")["services"]
    bounded = {name for name, service in services.items() if service.get("mem_limit") and service.get("pids_limit")}
    assert bounded == {"caddy", "proxy", "limits"}
    assert services["proxy"]["pids_limit"] == 512 and int(services["proxy"]["mem_limit"]) == 4 * 1024 ** 3


def test_the_limits_store_is_built_here_and_wants_the_proxys_password():
    # Not upstream's end-of-life redis:7.0 image: Debian's patched package, built like the proxy.
    services = _config("compose.yaml", "compose.scale.yaml")["services"]
    limits, proxy = services["limits"], services["proxy"]
    assert limits["image"] == "dce-limits:latest" and limits["build"]["context"] == str(REPO / "limits")
    assert limits["build"]["args"]["BASE_IMAGE"] == "debian:bookworm-slim"
    assert {secret["source"] for secret in limits["secrets"]} == {"limits_password"}
    assert "limits_password" in {secret["source"] for secret in proxy["secrets"]}
    assert proxy["environment"]["DCE_RATELIMIT_PASSWORD_FILE"] == "/run/secrets/limits_password"
    # (`compose config` writes a literal $ as $$, so that its output reads back the same.)
    assert "requirepass $$(cat /run/secrets/limits_password)" in limits["command"][0]


def test_the_monitoring_profile_answers_on_this_host_only_and_keeps_its_data():
    services = _config("compose.yaml", "compose.monitoring.yaml")["services"]
    prometheus = services["prometheus"]
    assert [(port["host_ip"], port["published"]) for port in prometheus["ports"]] == [("127.0.0.1", "9090")]
    # Pulled in registry mode, never built under the registry's name (local mode builds dce-prometheus).
    assert prometheus["image"] == "prom/prometheus:v3.5.0" and "build" not in prometheus
    assert prometheus["user"] == "65534:65534" and prometheus["mem_limit"] and prometheus["pids_limit"]
    assert "--storage.tsdb.retention.time=30d" in prometheus["command"]
    assert {volume["source"] for volume in prometheus["volumes"] if volume["type"] == "volume"} == {"prometheus_data"}
    assert "backend" in prometheus["networks"]  # where the proxy's and vLLM's metrics are
    assert {name for name, service in services.items() if service.get("ports")} == {"caddy", "prometheus"}


def test_the_router_sits_on_the_backend_only_bounded_and_the_proxy_names_conversations_to_it():
    services = _config("compose.yaml", "compose.router.yaml",
                       VLLM_WORKER_URLS="http://vllm:8000 http://10.0.0.12:8000")["services"]
    router = services["vllm-router"]
    assert set(router["networks"]) == {"backend"} and not router.get("ports")
    assert router["mem_limit"] and router["pids_limit"] and router["read_only"] and router["cap_drop"] == ["ALL"]
    assert router["logging"]["options"] == {"max-size": "10m", "max-file": "5"}
    assert router["environment"]["RUST_LOG"] == "warn"  # no line per request
    assert router["image"] == "dce-router:latest" and router["build"]["context"] == str(REPO / "router")
    command = router["command"]
    assert command[:3] == ["--worker-urls", "http://vllm:8000", "http://10.0.0.12:8000"]
    assert command[command.index("--policy") + 1] == "consistent_hash"
    assert services["proxy"]["environment"]["VLLM_URL"] == "http://vllm-router:8000"
    assert services["proxy"]["environment"]["DCE_SESSION_AFFINITY"] == "true"


def test_every_service_of_every_profile_rotates_its_log():
    files = ("compose.yaml", "compose.cpu.yaml", "compose.scale.yaml", "compose.monitoring.yaml")
    services = {**_config(*files[:1], *files[2:])["services"], **_config(*files)["services"]}
    assert {"caddy", "proxy", "vllm", "vllm-cache-owner", "limits", "prometheus"} <= services.keys()
    for name, service in services.items():
        assert service.get("logging") == {"driver": "json-file", "options": {"max-size": "10m", "max-file": "5"}}, name


def test_one_stop_grace_for_every_service_that_streams():
    for files in (("compose.yaml",), ("compose.yaml", "compose.cpu.yaml")):
        services = _config(*files)["services"]
        assert {name: services[name]["stop_grace_period"] for name in ("caddy", "proxy", "vllm")} == \
            dict.fromkeys(("caddy", "proxy", "vllm"), "10m0s"), files
        assert services["caddy"]["environment"]["DCE_STOP_GRACE"] == "600s"  # Caddy's grace_period
        assert services["proxy"]["environment"]["DCE_STOP_GRACE_SECONDS"] == "600"  # gunicorn's
        assert "--shutdown-timeout 600" in " ".join(services["vllm"]["command"]), files  # vLLM drains


# Read by the proxy but set by the compose files' own wiring (or, DCE_API_KEYS, meant for other
# deployments: keys come from a secret file here), not settings an operator chooses in .env.
_WIRED = {"VLLM_URL", "VLLM_API_KEY_FILE", "DCE_API_KEYS", "DCE_API_KEYS_FILE", "DCE_PROXY_BIND",
          "DCE_RATELIMIT_STORAGE_URI", "DCE_RATELIMIT_PASSWORD_FILE", "DCE_MODEL_STATUS_FILE",
          "DCE_METRICS_PORT",  # its default, 9100, is what monitoring/prometheus.yml scrapes
          "DCE_SESSION_AFFINITY"}  # on with the vLLM router (compose.router.yaml)


def test_every_setting_the_proxy_reads_is_in_env_example_and_reaches_the_proxy():
    source = "".join(path.read_text() for path in (REPO / "proxy").rglob("*.py"))
    read = set(re.findall(r'(?:env(?:iron)?\.get|reader\.\w+)\("((?:DCE|VLLM)_[A-Z_]+)"', source))
    assert {"DCE_MAX_N", "DCE_LOG_LEVEL", "DCE_PROXY_WORKERS"} <= read  # the scan sees them
    example = set(re.findall(r"^([A-Z_]+)=", (REPO / ".env.example").read_text(), re.MULTILINE))
    environment = {**_config("compose.yaml")["services"]["proxy"]["environment"],
                   **_config("compose.yaml", "compose.scale.yaml")["services"]["proxy"]["environment"]}
    chosen = read - _WIRED
    assert chosen - example == set(), "read by the proxy, missing from .env.example"
    assert chosen - set(environment) == set(), "read by the proxy, never passed to it by compose"
