"""`make backup` and `make restore` (issue 14) with the real stack: a backup taken from the running
stack, restored on a "new host" (another compose project: no settings file, empty volumes), makes
that host's Caddy serve a certificate the clients' old root CA verifies. Without the restore it
does not: every client would have to trust a new root."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from pathlib import Path

from stack import COMPOSE_FILES, REPO
from wire import wait_until

NEW_HOST = "dce-test-restored"


def _on(project: str, env_file: Path) -> dict[str, str]:
    """The environment `make` would have on that host: its compose files, project and settings."""
    return {**os.environ, "COMPOSE_FILE": ":".join(COMPOSE_FILES), "COMPOSE_PROJECT_NAME": project,
            "DCE_ENV_FILE": str(env_file)}


def _run(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(list(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _compose(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return _run(env, "docker", "compose", "--env-file", env["DCE_ENV_FILE"], *args)


def _front_door_verifies(env: dict[str, str], ca_file: str) -> bool:
    """Starts the host's Caddy alone (what the clients reach) and tells whether its certificate
    verifies against `ca_file`, the root the clients trusted before."""
    _compose(env, "up", "-d", "--no-deps", "caddy")
    host, port = _compose(env, "port", "caddy", "443").stdout.strip().rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca_file)

    def handshake() -> str | None:
        try:
            with socket.create_connection((host, int(port)), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost"):
                return "verified"
        except ssl.SSLCertVerificationError:
            return "not verified"
        except (OSError, ssl.SSLError):
            return None  # Caddy not serving yet

    return wait_until(handshake, 120, "the new host's Caddy to answer a TLS handshake", interval=0.5) == "verified"


def test_a_restored_backup_keeps_the_root_the_clients_trust(stack, tmp_path):
    backup = tmp_path / "dce-backup.tar.gz"
    _run(_on(stack.project, stack.settings_file), "python3", "scripts/backup.py", "backup", str(backup))
    assert backup.stat().st_mode & 0o777 == 0o600

    new_host = _on(NEW_HOST, tmp_path / "new-host.env")
    Path(new_host["DCE_ENV_FILE"]).write_text(stack.settings_file.read_text())
    try:
        # The new host before the restore: a Caddy of its own makes a root nobody trusts.
        assert not _front_door_verifies(new_host, stack.ca_file)
        _compose(new_host, "down", "--volumes", "--timeout", "5")  # make down -v: nothing of it left
        os.remove(new_host["DCE_ENV_FILE"])

        restored = _run(new_host, "python3", "scripts/backup.py", "restore", str(backup))
        assert "clients need no change" in restored.stderr, restored.stderr
        assert Path(new_host["DCE_ENV_FILE"]).read_text() == stack.settings_file.read_text()
        assert _front_door_verifies(new_host, stack.ca_file)
    finally:
        subprocess.run(["docker", "compose", "--env-file", str(stack.settings_file), "down", "--volumes",
                        "--timeout", "5"], cwd=REPO, env=new_host, capture_output=True, timeout=300)
