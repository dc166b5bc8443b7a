#!/usr/bin/env python3
"""`make backup` and `make restore FILE=…`: what a host cannot make again by itself, in one archive.

- `.env` (the host's settings),
- every secret file `.env` names (the API keys, and the keys between the services),
- Caddy's data volume: its internal root CA, which every client machine trusts, and the
  certificates. Restored on a new host, the clients need no change.

The archive holds private keys: it is written with mode 0600 in a folder only its owner reads.
A restore first saves what it replaces (`backups/pre-restore-…`): nothing is lost.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKUPS = REPO / "backups"
FORMAT = 1
# The secret files .env names, and where they are when it names none (as in .env.example).
SECRETS = {
    "DCE_API_KEYS_SECRET": "./secrets/dce_api_keys",
    "VLLM_API_KEY_SECRET": "./secrets/vllm_api_key",
    "LIMITS_PASSWORD_SECRET": "./secrets/limits_password",
    "HF_TOKEN_SECRET": "./secrets/hf_token",
}
CADDY_ROOT_CA = "./caddy/pki/authorities/local/root.crt"  # inside Caddy's /data
ENV, MANIFEST, CADDY_DATA = "env", "manifest.json", "caddy_data.tar"


class Refused(Exception):
    """What the operator must change before this can run; said as is, without a traceback."""


def say(command: str, message: str) -> None:
    print(f"make {command}: {message}", file=sys.stderr)


def env_file() -> Path:
    """The settings file compose reads (DCE_ENV_FILE for another than the checkout's .env)."""
    return Path(os.environ.get("DCE_ENV_FILE") or REPO / ".env")


def env_values(text: str) -> dict[str, str]:
    """KEY=value lines as compose reads them (the last one wins); comments and blanks skipped."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name.strip()] = value.strip().strip("'\"")
    return values


def secret_paths(env_text: str) -> dict[str, Path]:
    values = env_values(env_text)
    return {name: REPO / (values.get(name) or default) for name, default in SECRETS.items()}


def compose(*args: str, stdin: bytes | None = None) -> bytes:
    """`docker compose` as `make` runs it, with the settings file this backup is about."""
    command = ["docker", "compose"]
    if os.environ.get("DCE_ENV_FILE"):
        command += ["--env-file", os.environ["DCE_ENV_FILE"]]
    result = subprocess.run(command + list(args), cwd=REPO, input=stdin, capture_output=True)
    if result.returncode != 0:
        raise Refused(f"docker compose {' '.join(args[:2])} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def caddy_is_running() -> bool:
    return bool(compose("ps", "--quiet", "--status", "running", "caddy").strip())


def ensure_caddy_image(env_text: str) -> None:
    """A host that builds its images (DCE_IMAGES=local) may not have Caddy's yet: build it, as
    `make up` would; a registry host's compose pulls it."""
    values = env_values(env_text)
    image = values.get("CADDY_IMAGE", "caddy:2.11.7")
    if values.get("DCE_IMAGES") == "local" and subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True).returncode != 0:
        subprocess.run([str(REPO / "scripts/build-images.sh"), "caddy"], cwd=REPO, check=True)


def read_caddy_data() -> bytes:
    """Caddy's data volume as a tar stream, read by a one-off container of the stack's own Caddy
    image (running or not, the volume is the same)."""
    return compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "tar", "caddy", "-C", "/data", "-cf", "-", ".")


def write_caddy_data(data: bytes) -> None:
    """Replaces the volume's content with the archive's."""
    compose("run", "--rm", "--no-deps", "-T", "--entrypoint", "sh", "caddy", "-c",
            "cd /data && rm -rf -- * .[!.]* ..?* && tar -xf -", stdin=data)


def has_root_ca(caddy_data: bytes) -> bool:
    with tarfile.open(fileobj=io.BytesIO(caddy_data)) as volume:
        return any(name.rstrip("/") == CADDY_ROOT_CA for name in volume.getnames())


def _add(archive: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    archive.addfile(info, io.BytesIO(data))


def backup(out: Path | None, prefix: str = "dce-backup") -> Path:
    settings = env_file()
    if not settings.is_file():
        raise Refused(f"no settings file at {settings}: nothing to back up (make up creates it)")
    env_text = settings.read_text()
    caddy_data = read_caddy_data()
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "caddy_root_ca": has_root_ca(caddy_data), "files": {}}
    members = {ENV: (env_text.encode(), settings.stat().st_mode & 0o777)}
    for name, path in secret_paths(env_text).items():
        if path.is_file():
            members[f"secrets/{name}"] = (path.read_bytes(), path.stat().st_mode & 0o777)
    members[CADDY_DATA] = (caddy_data, 0o600)
    manifest["files"] = {name: hashlib.sha256(data).hexdigest() for name, (data, _) in members.items()}

    if out is None:
        BACKUPS.mkdir(mode=0o700, exist_ok=True)
        out = BACKUPS / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.tar.gz"
    # Private keys inside: only the owner reads it, from the first byte on.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as archive:
        _add(archive, MANIFEST, json.dumps(manifest, indent=1).encode())
        for name, (data, mode) in members.items():
            _add(archive, name, data, mode)
    return out


def read_archive(path: Path) -> tuple[dict, dict[str, tuple[bytes, int]]]:
    """The archive's members, checked against its manifest (a cut or altered file is refused)."""
    if not path.is_file():
        raise Refused(f"no backup at {path}")
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            members = {}
            for info in archive.getmembers():
                if info.isfile():
                    members[info.name] = (archive.extractfile(info).read(), info.mode & 0o777)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise Refused(f"{path} is not a readable backup: {error}") from None
    if MANIFEST not in members:
        raise Refused(f"{path} is not a DCE backup (no {MANIFEST})")
    manifest = json.loads(members.pop(MANIFEST)[0])
    if manifest.get("format") != FORMAT:
        raise Refused(f"{path} has backup format {manifest.get('format')}; this checkout reads {FORMAT}")
    expected = manifest["files"]
    for name in set(expected) | set(members):
        if name not in members or name not in expected or \
                hashlib.sha256(members[name][0]).hexdigest() != expected[name]:
            raise Refused(f"{path}: {name} does not match the backup's manifest (cut or altered)")
    if ENV not in members or CADDY_DATA not in members:
        raise Refused(f"{path} lacks {ENV} or {CADDY_DATA}")
    return manifest, members


def _write(path: Path, data: bytes, mode: int) -> str:
    if path.is_file() and path.read_bytes() == data:
        return "unchanged"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # In place, like make key-*: a running proxy's bind mount holds on to the file it has.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, mode)
    return "restored"


def restore(path: Path) -> list[str]:
    manifest, members = read_archive(path)
    settings = env_file()
    if settings.is_file():
        if caddy_is_running():
            raise Refused("the stack is running: make down first (a restore replaces Caddy's certificates)")
        saved = backup(None, prefix="pre-restore")
        report = [f"what this replaces is saved first: {saved}"]
    else:
        report = []
    env_text = members[ENV][0].decode()
    report.append(f"{settings}: {_write(settings, *members[ENV])}")
    for name, target in secret_paths(env_text).items():
        if f"secrets/{name}" in members:
            report.append(f"{target} ({name}): {_write(target, *members[f'secrets/{name}'])}")
    ensure_caddy_image(env_text)
    write_caddy_data(members[CADDY_DATA][0])
    ca = "with its internal root CA: clients need no change" if manifest["caddy_root_ca"] else \
        "no internal root CA in it (a public domain's certificates only)"
    report.append(f"Caddy's data volume: restored, {ca}")
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/backup.py")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("backup").add_argument("file", nargs="?", type=Path)
    commands.add_parser("restore").add_argument("file", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "backup":
            out = backup(args.file)
            say("backup", f"{out} (mode 0600: it holds the API keys and Caddy's CA key; keep it off this host)")
        else:
            if args.file is None or not str(args.file):
                raise Refused("which backup? make restore FILE=backups/dce-backup-….tar.gz")
            for line in restore(args.file):
                say("restore", line)
            say("restore", "done: make up starts the stack with it")
    except Refused as refusal:
        say(args.command, str(refusal))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
