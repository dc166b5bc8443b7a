"""`make backup` / `make restore` (scripts/backup.py, issue 14): .env, the secrets it names and
Caddy's data volume in one owner-only archive; a restore saves what it replaces and refuses a
running stack or an altered archive. Docker is a stub whose "volume" is a folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOT_CA = "caddy/pki/authorities/local/root.crt"

# `docker compose … run … caddy` reads or replaces the volume folder; `ps` says whether Caddy runs.
FAKE_DOCKER = r'''#!{python}
import io, os, shutil, sys, tarfile
state = os.environ["FAKE_DOCKER_STATE"]
volume = os.path.join(state, "volume")
args = sys.argv[1:]
with open(os.path.join(state, "calls"), "a") as calls:
    calls.write(" ".join(args) + "\n")
if args[:2] == ["image", "inspect"]:
    sys.exit(0)
if "ps" in args:
    print("abc123" if os.path.exists(os.path.join(state, "running")) else "")
elif "-cf" in args:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as out:
        out.add(volume, arcname=".")
    sys.stdout.buffer.write(buffer.getvalue())
elif "-xf" in " ".join(args):
    if os.path.exists(os.path.join(state, "fail")):
        sys.exit("no space left on device")
    shutil.rmtree(volume)
    os.mkdir(volume)
    with tarfile.open(fileobj=io.BytesIO(sys.stdin.buffer.read())) as archive:
        archive.extractall(volume, filter="tar")
'''


@pytest.fixture()
def host(tmp_path):
    """A checkout with .env, its secrets and a Caddy volume holding a root CA."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts/backup.py", tmp_path / "scripts/backup.py")
    (tmp_path / ".env").write_text("DCE_DOMAIN=localhost\nDCE_API_KEYS_SECRET=./secrets/dce_api_keys\n")
    (tmp_path / "secrets").mkdir(mode=0o700)
    for name, text in [("dce_api_keys", "alice:k1\n"), ("vllm_api_key", "v1\n"), ("limits_password", "p1\n"),
                       ("hf_token", "")]:
        (tmp_path / "secrets" / name).write_text(text)
        (tmp_path / "secrets" / name).chmod(0o644)
    state = tmp_path / "docker"
    (state / "volume" / Path(ROOT_CA).parent).mkdir(parents=True)
    (state / "volume" / ROOT_CA).write_text("OLD ROOT")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "docker").write_text(FAKE_DOCKER.replace("{python}", sys.executable))
    (stubs / "docker").chmod(0o755)
    return tmp_path


@pytest.fixture()
def archive(host) -> Path:
    """A backup of `host`, as make backup takes it."""
    result = _run(host, "backup")
    assert result.returncode == 0, result.stderr
    (path,) = _archives(host, "dce-backup")
    return path


def _run(host: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{host / 'bin'}:/usr/bin:/bin", "FAKE_DOCKER_STATE": str(host / "docker")}
    return subprocess.run([sys.executable, "scripts/backup.py", *args], cwd=host, capture_output=True, text=True,
                          env=env)


def _archives(host: Path, prefix: str) -> list[Path]:
    return sorted((host / "backups").glob(f"{prefix}-*.tar.gz"))


def test_a_backup_holds_the_settings_the_secrets_and_the_ca_readable_by_its_owner_only(host):
    result = _run(host, "backup")
    assert result.returncode == 0, result.stderr
    (archive,) = _archives(host, "dce-backup")
    assert "NOT" not in result.stderr  # nothing missing
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert stat.S_IMODE((host / "backups").stat().st_mode) == 0o700
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        volume = tarfile.open(fileobj=io.BytesIO(tar.extractfile("caddy_data.tar").read()))
        assert volume.extractfile(f"./{ROOT_CA}").read() == b"OLD ROOT"
    assert names == {"manifest.json", "env", "caddy_data.tar", "secrets/DCE_API_KEYS_SECRET",
                     "secrets/VLLM_API_KEY_SECRET", "secrets/LIMITS_PASSWORD_SECRET", "secrets/HF_TOKEN_SECRET"}
    assert "alice:k1" not in result.stderr  # it says where the keys are, never what


def test_a_restore_on_a_new_host_brings_back_the_same_ca_keys_and_settings(host, archive, tmp_path_factory):
    # A new host: another checkout, no .env, no secrets, an empty volume.
    new = tmp_path_factory.mktemp("new-host")
    shutil.copytree(host / "scripts", new / "scripts")
    shutil.copytree(host / "bin", new / "bin")
    (new / "docker" / "volume").mkdir(parents=True)
    result = _run(new, "restore", str(archive))
    assert result.returncode == 0, result.stderr
    assert (new / ".env").read_text() == (host / ".env").read_text()
    assert (new / "secrets/dce_api_keys").read_text() == "alice:k1\n"
    assert stat.S_IMODE((new / "secrets/dce_api_keys").stat().st_mode) == 0o644  # the proxy's user reads it
    assert (new / "docker/volume" / ROOT_CA).read_text() == "OLD ROOT"
    assert "clients need no change" in result.stderr
    assert not (new / "backups").exists()  # nothing there to save first


def test_a_restore_saves_what_it_replaces_first(host, archive):
    (host / "secrets/dce_api_keys").write_text("alice:k1\nbob:k2\n")
    (host / "docker/volume" / ROOT_CA).write_text("NEW ROOT")
    result = _run(host, "restore", str(archive))
    assert result.returncode == 0, result.stderr
    assert (host / "secrets/dce_api_keys").read_text() == "alice:k1\n"
    assert (host / "docker/volume" / ROOT_CA).read_text() == "OLD ROOT"
    (saved,) = _archives(host, "pre-restore")
    with tarfile.open(saved) as tar:
        assert tar.extractfile("secrets/DCE_API_KEYS_SECRET").read() == b"alice:k1\nbob:k2\n"
        volume = tarfile.open(fileobj=io.BytesIO(tar.extractfile("caddy_data.tar").read()))
        assert volume.extractfile(f"./{ROOT_CA}").read() == b"NEW ROOT"


def test_a_restore_refuses_a_running_stack(host, archive):
    (host / "docker/running").touch()
    result = _run(host, "restore", str(archive))
    assert result.returncode == 1 and "make down first" in result.stderr, result.stderr
    assert "-xf" not in (host / "docker/calls").read_text()  # the volume was not touched


def test_a_restore_refuses_a_cut_or_damaged_archive(host, archive):
    cut = host / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[:200])
    altered = host / "altered.tar.gz"
    with tarfile.open(archive) as source, tarfile.open(altered, "w:gz") as target:
        for info in source.getmembers():
            data = source.extractfile(info).read()
            if info.name == "secrets/DCE_API_KEYS_SECRET":
                data, info.size = b"mallory:k9\n", len(b"mallory:k9\n")
            target.addfile(info, io.BytesIO(data))
    for bad, reason in [(cut, "not a readable backup"), (altered, "cut or damaged"), (host / "none", "no backup at")]:
        result = _run(host, "restore", str(bad))
        assert result.returncode == 1 and reason in result.stderr, result.stderr
    assert (host / "secrets/dce_api_keys").read_text() == "alice:k1\n"


def test_a_backup_without_settings_says_so(host):
    os.remove(host / ".env")
    result = _run(host, "backup")
    assert result.returncode == 1 and "no settings file" in result.stderr, result.stderr


def test_a_restore_fails_midway_and_says_how_to_undo_it(host, archive):
    (host / "docker/volume" / ROOT_CA).write_text("NEW ROOT")
    (host / "docker/fail").touch()
    result = _run(host, "restore", str(archive))
    (saved,) = _archives(host, "pre-restore")
    assert result.returncode == 1 and "half restored" in result.stderr and f"FILE={saved}" in result.stderr
    assert (host / "docker/volume" / ROOT_CA).read_text() == "NEW ROOT"  # the volume comes first: untouched


def test_a_restore_writes_secrets_only_inside_the_checkout_or_beside_the_settings(host, archive, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "authorized_keys"
    crafted = host / "crafted.tar.gz"
    with tarfile.open(archive) as source:
        env = source.extractfile("env").read() + f"DCE_API_KEYS_SECRET={elsewhere}\n".encode()
        manifest = json.loads(source.extractfile("manifest.json").read())
        manifest["files"]["env"] = hashlib.sha256(env).hexdigest()
        with tarfile.open(crafted, "w:gz") as target:
            for info in source.getmembers():
                data = {"env": env, "manifest.json": json.dumps(manifest).encode()}.get(
                    info.name, source.extractfile(info).read())
                info.size = len(data)
                target.addfile(info, io.BytesIO(data))
    result = _run(host, "restore", str(crafted))
    assert result.returncode == 1 and "outside" in result.stderr, result.stderr
    assert not elsewhere.exists() and not _archives(host, "pre-restore")  # refused before any change


def test_a_backup_says_what_it_could_not_take(host):
    os.remove(host / "secrets/vllm_api_key")
    os.remove(host / "docker/volume" / ROOT_CA)
    result = _run(host, "backup")
    assert result.returncode == 0, result.stderr
    assert "NOT in the backup: VLLM_API_KEY_SECRET" in result.stderr and "NO internal root CA" in result.stderr


def test_restore_without_a_file_asks_which(host):
    result = _run(host, "restore")
    assert result.returncode == 1 and "which backup?" in result.stderr, result.stderr


def test_settings_are_read_as_compose_reads_them():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import backup
    finally:
        sys.path.pop(0)
    assert backup.env_values("A=./x # a note\nB=\"y # not a note\"\nexport C='z'\n# D=1\nA=./w\n") == \
        {"A": "./w", "B": "y # not a note", "C": "z"}
