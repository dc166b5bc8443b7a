"""The real stack: Caddy, the proxy image and the vLLM CPU engine, composed from the production
compose.yaml plus the CPU profile and the test override, started once per session by the
integration suite (conftest.py) and by the engine benchmark.

Images come from `make images` (scripts/build-images.sh); nothing is pulled. If Docker is not
usable, starting fails: these tests never skip.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import requests
from testcontainers.compose import DockerCompose

REPO = Path(__file__).resolve().parents[2]
PROJECT = "dce-test"
# The images scripts/build-images.sh builds, by the setting compose reads each one's name from.
LOCAL_IMAGES = dict(line.split("=", 1) for line in (REPO / "images.env").read_text().splitlines()
                    if line and not line.startswith("#"))
# Two proxy workers sharing their limits in Redis (compose.scale.yaml): limits must hold across
# workers, and a killed worker must not take the other's streams down. One worker, the default, is
# what the unit suite runs under gunicorn.
COMPOSE_FILES = ["compose.yaml", "compose.cpu.yaml", "compose.scale.yaml", "compose.monitoring.yaml",
                 "compose.test.yaml", "tests/integration/compose.monitoring.test.yaml"]
CADDY_ROOT_CA = "/data/caddy/pki/authorities/local/root.crt"
DIRECT_REFERENCE = (Path(__file__).parent / "direct_reference.py").read_text()
# The test stack's context (the tiny model has positions for it).
MAX_MODEL_LEN = 32768
# The one web page origin the test stack lets call it from a browser (DCE_CORS_ORIGINS).
CORS_ORIGIN = "https://chat.example.com"
# A stream with ignore_eos and this budget runs for minutes beside others on this CPU, so a test that
# needs streams running when it acts can have them, and ends them itself. Alone it runs for about a
# minute (measured: 480 tokens/s): a test checks its streams still run before it acts.
LONG_STREAM_TOKENS = 30000
# DCE_MAX_CONCURRENT in the test stack: streams one key may run at once (the default).
CAP = 20
# Token ids of the tiny model (vllm/make_tiny_model.py): 2048 trained, then <think> and </think>.
TINY_VOCAB = 2050
THINK_END_ID = 2049
# Runs in the limits container: leases of one client's slots that have not lapsed.
_LIVE_LEASES = "return redis.call('ZCOUNT', KEYS[1], redis.call('TIME')[1], '+inf')"
# Runs in the limits container: each matching key and its count, whichever window kind keeps it.
_COUNTS = """local out = {}
for _, key in ipairs(redis.call('KEYS', ARGV[1])) do
  local kind = redis.call('TYPE', key).ok
  local count = kind == 'list' and redis.call('LLEN', key) or kind == 'zset' and redis.call('ZCARD', key)
                or tonumber(redis.call('GET', key)) or 0
  table.insert(out, key); table.insert(out, count)
end
return out"""


@dataclass
class Stack:
    compose: DockerCompose
    https_port: int
    http_port: int
    ca_file: str
    key: str
    other_key: str
    # Ten more curators: a load beyond one key's DCE_MAX_CONCURRENT needs several keys.
    load_keys: list[str]
    keys_file: Path  # the proxy's Compose secret; a test may revoke a key in it
    limits_password: str  # Redis's (compose.scale.yaml)
    settings_file: Path  # the stack's .env
    project: str = PROJECT

    @property
    def base(self) -> str:
        # localhost, not an IP: Caddy needs SNI to pick the certificate.
        return f"https://localhost:{self.https_port}"

    def session(self) -> requests.Session:
        session = requests.Session()
        # Otherwise REQUESTS_CA_BUNDLE from the environment would override the CA below.
        session.trust_env = False
        session.verify = self.ca_file
        return session

    def container(self, service: str):
        # By label, not through testcontainers: it only finds running containers.
        labels = [f"com.docker.compose.project={self.project}", f"com.docker.compose.service={service}"]
        (container,) = docker.from_env().containers.list(all=True, filters={"label": labels})
        return container

    def direct_answers(self, bodies: list[dict]) -> list[dict]:
        """What vLLM itself streams for each body ({"content", "reasoning"}), all sent at once from
        inside the backend network (direct_reference.py), past Caddy and the proxy."""
        result = self.container("proxy").exec_run(["python3", "-c", DIRECT_REFERENCE],
                                                  environment={"DCE_REFERENCE_BODIES": json.dumps(bodies)})
        assert result.exit_code == 0, result.output.decode(errors="replace")
        return json.loads(result.output)

    def ready(self) -> bool:
        """Whether the whole chain answers: Caddy, the proxy and vLLM (/readyz through Caddy)."""
        return self.answers("/readyz")

    def answers(self, path: str) -> bool:
        """Whether a GET of `path` through Caddy gets a 200."""
        with self.session() as session:
            try:
                return session.get(f"{self.base}{path}", timeout=5).status_code == 200
            except OSError:
                return False

    def unpause(self, service: str) -> None:
        """Unpauses a service a test paused, if it still is."""
        container = self.container(service)
        container.reload()
        if container.status == "paused":
            container.unpause()

    def live_slot_leases(self, key_name: str) -> int:
        """Generation slots a key holds right now, across every proxy worker (Redis)."""
        result = self.container("limits").exec_run(["redis-cli", "EVAL", _LIVE_LEASES, "1", f"dce-slots/{key_name}"],
                                                   environment={"REDISCLI_AUTH": self.limits_password})
        assert result.exit_code == 0, result.output
        return int(result.output)

    def limits_counts(self, pattern: str) -> dict[str, int]:
        """The limits store's counters whose key matches `pattern`, with what each has counted."""
        result = self.container("limits").exec_run(["redis-cli", "--raw", "EVAL", _COUNTS, "0", pattern],
                                                   environment={"REDISCLI_AUTH": self.limits_password})
        assert result.exit_code == 0, result.output
        lines = result.output.decode().split()
        return {key: int(count) for key, count in zip(lines[::2], lines[1::2])}

    def operator_env(self) -> dict[str, str]:
        """The environment of `make` on this stack's host (scripts/*.sh, backup.py)."""
        return operator_env(self.project, self.settings_file)

    def up_again(self) -> None:
        """After the whole stack stopped (make down): started as it was, its volumes kept."""
        subprocess.run(self.compose.compose_command_property + ["up", "-d", "--wait"], cwd=self.compose.context,
                       check=True, capture_output=True, timeout=900)
        self.follow_caddy()

    def follow_caddy(self) -> None:
        """After Caddy restarted: it may have another random loopback port."""
        caddy = self.container("caddy")
        caddy.reload()
        self.https_port = int(caddy.attrs["NetworkSettings"]["Ports"]["443/tcp"][0]["HostPort"])

    def proxy_metrics(self) -> str:
        """The proxy's Prometheus metrics, from its own container (the port is not published)."""
        result = self.container("proxy").exec_run(["python3", "-m", "dce_proxy.report", "metrics"])  # as `make metrics`
        assert result.exit_code == 0, result.output
        return result.output.decode()

    def prometheus_url(self) -> str:
        """The monitoring profile's Prometheus, on its loopback port."""
        port = self.compose.get_container("prometheus").get_publisher(by_port=9090, by_host="127.0.0.1").PublishedPort
        return f"http://127.0.0.1:{port}"

    def exec_python(self, service: str, code: str, *args: str) -> tuple[int, str]:
        """Runs Python inside a service's container (on its networks, not the host's)."""
        result = self.container(service).exec_run(["python3", "-c", code, *args])
        return result.exit_code, result.output.decode(errors="replace")


def replicas_compose(tmp: Path, replicas: int = 2) -> tuple[list[str], list[str]]:
    """The compose files and settings of `make up` with VLLM_REPLICAS=`replicas` in the CPU profile
    (the vLLM router before the replicas), with the test override: for start_stack."""
    sys.path.insert(0, str(REPO / "scripts"))
    from replicas import cpu_file, replica_names, replicas_file

    generated = [tmp / "compose.replicas.yaml", tmp / "compose.replicas.cpu.yaml"]
    generated[0].write_text(replicas_file(replicas, "", cpu=True, compose_dir=str(REPO)))
    generated[1].write_text(cpu_file(replicas, compose_dir=str(REPO)))
    files = ["compose.yaml", "compose.cpu.yaml", "compose.router.yaml", *map(str, generated), "compose.test.yaml",
             "tests/integration/compose.replicas.test.yaml"]
    urls = " ".join(f"http://{name}:8000" for name in replica_names(replicas))
    return files, [f"VLLM_WORKER_URLS={urls}"]


def _write_env(tmp: Path, project: str, key: str, other_key: str, load_keys: list[str],
               extra_settings: list[str]) -> Path:
    keys = tmp / "dce_api_keys"
    load_lines = "".join(f"load{i}:{load_key}\n" for i, load_key in enumerate(load_keys))
    keys.write_text(f"curator:{key}\nother:{other_key}\n{load_lines}")
    token = tmp / "hf_token"
    token.write_text("")
    vllm_key = tmp / "vllm_api_key"
    vllm_key.write_text(secrets.token_urlsafe(24) + "\n")
    limits_password = tmp / "limits_password"
    limits_password.write_text(secrets.token_urlsafe(24) + "\n")
    for path in (keys, token, vllm_key, limits_password):
        path.chmod(0o644)  # the proxy reads it as an unprivileged user through the bind mount
    env = tmp / "test.env"
    env.write_text("\n".join([
        # Each compose command of this stack names its project from here (--env-file): two stacks
        # composed by one test session (test_replicas.py's beside the suite's) never mix.
        f"COMPOSE_PROJECT_NAME={project}",
        "DCE_DOMAIN=localhost",
        *(f"{name}={image}" for name, image in LOCAL_IMAGES.items() if name != "LOCAL_BASE_IMAGE"),
        "DCE_PROXY_WORKERS=2",
        f"VLLM_CPU_MAX_MODEL_LEN={MAX_MODEL_LEN}",
        f"DCE_API_KEYS_SECRET={keys}",
        f"HF_TOKEN_SECRET={token}",
        f"VLLM_API_KEY_SECRET={vllm_key}",
        f"LIMITS_PASSWORD_SECRET={limits_password}",
        f"DCE_MAX_CONCURRENT={CAP}",
        # A stop waits this long for running streams (the suite's own stop included).
        "DCE_STOP_GRACE_SECONDS=120",
        # The rate limits are tested in the unit suite; here they must not get in the way.
        "DCE_RATE_LIMIT=100000/minute",
        "DCE_AUTH_FAILURE_LIMIT=100000/minute",
        f"DCE_CORS_ORIGINS={CORS_ORIGIN}",
        *extra_settings,
    ]) + "\n")
    return env


def _fetch_root_ca(stack: Stack, dest: Path) -> None:
    # Caddy creates its internal CA on first start; wait for it rather than trusting anything.
    deadline = time.monotonic() + 60
    while True:
        result = stack.container("caddy").exec_run(["cat", CADDY_ROOT_CA])
        if result.exit_code == 0 and b"BEGIN CERTIFICATE" in result.output:
            dest.write_bytes(result.output)
            return
        assert time.monotonic() < deadline, f"Caddy never wrote {CADDY_ROOT_CA}"
        time.sleep(1)


def _wait_ready(stack: Stack) -> None:
    deadline = time.monotonic() + 120
    last = None
    with stack.session() as session:
        while time.monotonic() < deadline:
            try:
                last = session.get(f"{stack.base}/readyz", timeout=5)
                if last.status_code == 200:
                    return
            except requests.RequestException as exc:
                last = exc
            time.sleep(1)
    raise AssertionError(f"stack not ready through Caddy: {last}")


def operator_env(project: str, settings_file: Path) -> dict[str, str]:
    """What `make` has on a host: its compose files, its project and its settings file (.env)."""
    return {**os.environ, "COMPOSE_FILE": ":".join(COMPOSE_FILES), "COMPOSE_PROJECT_NAME": project,
            "DCE_ENV_FILE": str(settings_file)}


def remove_stack(compose: DockerCompose) -> None:
    """Removes the stack and its volumes without the stop grace it gives running streams (none run
    then): a vLLM stopped while it loads would otherwise hold the suite for the whole grace."""
    subprocess.run(compose.compose_command_property + ["down", "--volumes", "--timeout", "5"], cwd=compose.context,
                   check=True, capture_output=True, timeout=300)


def start_stack(tmp: Path, *, project: str = PROJECT, compose_files: list[str] = COMPOSE_FILES,
                load_keys: int = 10, extra_settings: list[str] = ()) -> Stack:
    """Composes a stack (after removing one a killed run may have left) and waits until it answers
    through Caddy. On failure it prints the logs and removes the stack."""
    os.environ.pop("COMPOSE_PROJECT_NAME", None)  # it would outrank the stack's own settings file
    os.environ["COMPOSE_BAKE"] = "false"
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    key, other_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    load_key_list = [secrets.token_urlsafe(24) for _ in range(load_keys)]
    env_file = _write_env(tmp, project, key, other_key, load_key_list, list(extra_settings))
    compose = DockerCompose(REPO, compose_file_name=compose_files, env_file=str(env_file),
                            build=False, pull=False, wait=True)
    remove_stack(compose)
    try:
        compose.start()
        caddy = compose.get_container("caddy")
        stack = Stack(compose=compose, https_port=int(caddy.get_publisher(by_port=443, by_host="127.0.0.1").PublishedPort),
                      http_port=int(caddy.get_publisher(by_port=80, by_host="127.0.0.1").PublishedPort),
                      ca_file=str(tmp / "caddy-root.crt"), key=key, other_key=other_key, load_keys=load_key_list,
                      keys_file=tmp / "dce_api_keys", limits_password=(tmp / "limits_password").read_text().strip(),
                      settings_file=env_file, project=project)
        _fetch_root_ca(stack, Path(stack.ca_file))
        _wait_ready(stack)
    except BaseException:
        stdout, stderr = compose.get_logs()
        print(f"--- {project} stack logs ---\n{stdout[-20000:]}\n{stderr[-5000:]}", flush=True)
        remove_stack(compose)
        raise
    return stack
