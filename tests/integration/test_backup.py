"""`make backup` and `make restore` (issue 14) with the real stack and Caddy image: a backup of the
running stack, restored on a "new host" (another compose project, whose Caddy already made a root
of its own), makes that host's Caddy serve a certificate the clients' old root CA verifies.
Without the restore it does not: every client would have to trust a new root."""

from __future__ import annotations

import io
import socket
import ssl
import subprocess
import tarfile
from pathlib import Path

from stack import CADDY_ROOT_CA, REPO, operator_env
from wire import wait_until

NEW_HOST = "dce-test-restored"


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


def _archive(folder: Path, prefix: str) -> Path:
    (path,) = folder.glob(f"{prefix}-*.tar.gz")
    return path


def _root_ca_in(archive: Path) -> bytes:
    with tarfile.open(archive) as outer:
        with tarfile.open(fileobj=io.BytesIO(outer.extractfile("caddy_data.tar").read())) as volume:
            return volume.extractfile(f"./{CADDY_ROOT_CA.removeprefix('/data/')}").read()


def test_a_restored_backup_keeps_the_root_the_clients_trust(stack, tmp_path):
    backups = {"DCE_BACKUP_DIR": str(tmp_path)}
    _run({**stack.operator_env(), **backups}, "python3", "scripts/backup.py", "backup")
    backup = _archive(tmp_path, "dce-backup")
    assert backup.stat().st_mode & 0o777 == 0o600
    old_root = Path(stack.ca_file).read_bytes()
    assert _root_ca_in(backup) == old_root

    # Beside the stack's settings and secrets, which the backup's settings name.
    settings = stack.settings_file.parent / "new-host.env"
    new_host = {**operator_env(NEW_HOST, settings), **backups}
    settings.write_text(stack.settings_file.read_text())
    try:
        # The new host before the restore: a Caddy of its own made a root nobody trusts...
        assert not _front_door_verifies(new_host, stack.ca_file)
        _compose(new_host, "down", "--timeout", "5")  # ...and keeps it in its volume: make down

        restored = _run(new_host, "python3", "scripts/backup.py", "restore", str(backup))
        assert "clients need no change" in restored.stderr, restored.stderr
        # What the restore replaced was saved first: that host's own root.
        assert _root_ca_in(_archive(tmp_path, "pre-restore")) != old_root
        assert _front_door_verifies(new_host, stack.ca_file)
    finally:
        subprocess.run(["docker", "compose", "--env-file", str(settings), "down", "--volumes", "--timeout", "5"],
                       cwd=REPO, env=new_host, capture_output=True, timeout=300)
        settings.unlink(missing_ok=True)
