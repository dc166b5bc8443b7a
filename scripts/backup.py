#!/usr/bin/env python3
"""`make backup` and `make restore FILE=…`: what a host cannot make again by itself, in one archive.

- `.env` (the host's settings),
- every secret file `.env` names (the API keys, and the keys between the services),
- Caddy's data volume: its internal root CA, which every client machine trusts, and the
  certificates. Restored on a new host, the clients need no change.

The archive holds private keys: it is written with mode 0600 in a folder only its owner reads.
A restore checks everything it can before it changes anything, then saves what it replaces
(`backups/pre-restore-…`), so a failure midway can be undone with that archive.

DCE_ENV_FILE names the settings file when it is not the checkout's `.env` (compose's --env-file);
DCE_BACKUP_DIR, where archives go (`backups/`).
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
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
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
    print(f"make {command}: {message}", file=sys.stderr, flush=True)


def settings_file() -> Path:
    return Path(os.environ.get("DCE_ENV_FILE") or REPO / ".env")


def backups_dir() -> Path:
    return Path(os.environ.get("DCE_BACKUP_DIR") or REPO / "backups")


def env_values(text: str) -> dict[str, str]:
    """KEY=value lines as compose reads them: the last one wins, quotes are taken off, and an
    unquoted value ends at " #" (a comment)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = (part.strip() for part in line.split("=", 1))
        if value[:1] in ("'", '"') and value[0] in value[1:]:
            value = value[1:value.index(value[0], 1)]
        else:
            value = value.split(" #", 1)[0].strip()
        values[name.removeprefix("export ").strip()] = value
    return values


def secret_paths(env_text: str) -> dict[str, Path]:
    """Each secret's file; relative paths are the project directory's, as compose reads them."""
    values = env_values(env_text)
    return {name: REPO / (values.get(name) or default) for name, default in SECRETS.items()}


def compose_files(env_text: str) -> list[str]:
    return [name for name in env_values(env_text).get("COMPOSE_FILE", "").split(":") if name]


class Compose:
    """`docker compose` for the host the settings in `env_text` describe (its project, its files,
    its images), as `make` runs it."""

    def __init__(self, env_text: str | None):
        self.env_text = env_text

    @contextmanager
    def _env_file(self) -> Iterator[list[str]]:
        if self.env_text is None:  # a new host: compose's defaults
            yield []
            return
        with tempfile.NamedTemporaryFile("w", suffix=".env") as file:
            file.write(self.env_text)
            file.flush()
            yield ["--env-file", file.name]

    def __call__(self, *args: str, stdin: bytes | None = None) -> bytes:
        with self._env_file() as env_file:
            result = subprocess.run(["docker", "compose", *env_file, *args], cwd=REPO, input=stdin,
                                    capture_output=True)
        if result.returncode != 0:
            raise Refused(f"docker compose {' '.join(args)} failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def anything_running(self) -> bool:
        return bool(self("ps", "--quiet").strip())

    def ensure_caddy_image(self) -> None:
        """Every volume step runs the stack's own Caddy image. A host that builds its images
        (DCE_IMAGES=local) reaches no registry: build it, as `make up` would, rather than let
        compose try to pull it."""
        values = env_values(self.env_text or "")
        image = values.get("CADDY_IMAGE") or "caddy:2.11.7"
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0:
            return
        if values.get("DCE_IMAGES") == "local":
            if subprocess.run([str(REPO / "scripts/build-images.sh"), "caddy"], cwd=REPO).returncode != 0:
                raise Refused(f"could not build {image} (scripts/build-images.sh caddy)")

    def read_caddy_data(self) -> bytes:
        """Caddy's data volume as a tar stream, read by a one-off container (running or not,
        the volume is the same)."""
        self.ensure_caddy_image()
        return self("run", "--rm", "--no-deps", "-T", "--entrypoint", "tar", "caddy", "-C", "/data", "-cf", "-", ".")

    def replace_caddy_data(self, data: bytes) -> None:
        self.ensure_caddy_image()
        self("run", "--rm", "--no-deps", "-T", "--entrypoint", "sh", "caddy", "-c",
             "cd /data && rm -rf -- * .[!.]* ..?* && tar -xf -", stdin=data)


def volume_files(caddy_data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(caddy_data)) as volume:
        return [member.name for member in volume.getmembers() if member.isfile()]


def write_archive(members: dict[str, tuple[bytes, int]], caddy_data: bytes, prefix: str) -> Path:
    members = {**members, CADDY_DATA: (caddy_data, 0o600)}
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "caddy_root_ca": CADDY_ROOT_CA in volume_files(caddy_data),
                "files": {name: hashlib.sha256(data).hexdigest() for name, (data, _) in members.items()}}
    folder = backups_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    out = folder / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.tar.gz"
    # Private keys inside: only the owner reads it, from the first byte on.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for name, (data, mode) in [(MANIFEST, (json.dumps(manifest, indent=1).encode(), 0o600)), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return out


def file_member(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mode & 0o777


def backup() -> tuple[Path, list[str]]:
    """The archive, and what the operator should know about it (a missing secret, no root CA)."""
    settings = settings_file()
    if not settings.is_file():
        raise Refused(f"no settings file at {settings}: nothing to back up (make up creates it)")
    env_text = settings.read_text()
    members, notes = {ENV: file_member(settings)}, []
    for name, path in secret_paths(env_text).items():
        if path.is_file():
            members[f"secrets/{name}"] = file_member(path)
        else:
            notes.append(f"NOT in the backup: {name} (no file at {path})")
    caddy_data = Compose(env_text).read_caddy_data()
    if CADDY_ROOT_CA not in volume_files(caddy_data):
        notes.append("NO internal root CA in Caddy's volume (a public domain's certificates only, or a stack "
                     "never started)")
    return write_archive(members, caddy_data, "dce-backup"), notes


def read_archive(path: Path) -> tuple[dict, dict[str, tuple[bytes, int]]]:
    """The archive's members, checked against its manifest (a cut or damaged file is refused;
    the manifest is no signature: restore only archives you trust)."""
    if not path.is_file():
        raise Refused(f"no backup at {path}")
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            members = {info.name: (archive.extractfile(info).read(), info.mode & 0o777)
                       for info in archive.getmembers() if info.isfile()}
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
            raise Refused(f"{path}: {name} does not match the backup's manifest (cut or damaged)")
    if CADDY_DATA not in members:
        raise Refused(f"{path} lacks {CADDY_DATA}")
    return manifest, members


def restore_targets(members: dict[str, tuple[bytes, int]]) -> dict[str, Path]:
    """Where each file of the archive goes: the settings file, and each secret where the archive's
    settings name it, but only inside the checkout or beside the settings file (an archive must not
    write anywhere else on the host)."""
    settings = settings_file()
    targets = {ENV: settings} if ENV in members else {}
    env_text = members[ENV][0].decode() if ENV in members else ""
    allowed = (REPO.resolve(), settings.parent.resolve())
    for name, path in secret_paths(env_text).items():
        if f"secrets/{name}" in members:
            if not any(path.resolve().is_relative_to(folder) for folder in allowed):
                raise Refused(f"the backup's settings put {name} at {path}, outside {allowed[0]} and {allowed[1]}: "
                              "move that file there in the backup's .env first")
            targets[f"secrets/{name}"] = path
    return targets


def write_file(path: Path, data: bytes, mode: int) -> str:
    """Whole or not at all: a new file renamed over the old one, with the backup's mode."""
    if path.is_file() and path.read_bytes() == data:
        os.chmod(path, mode)
        return "unchanged"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)
    return "restored"


def restore(path: Path) -> list[str]:
    manifest, members = read_archive(path)
    targets = restore_targets(members)
    env_text = members[ENV][0].decode() if ENV in members else None
    missing = [name for name in compose_files(env_text or "") if not (REPO / name).is_file()]
    if missing:
        raise Refused(f"the backup's settings name compose files this checkout lacks: {', '.join(missing)}")
    compose = Compose(env_text)
    # The host's project as its settings name it now, and as the backup's do (they may differ).
    settings = settings_file()
    if compose.anything_running() or (settings.is_file() and Compose(settings.read_text()).anything_running()):
        raise Refused("the stack is running: make down first (a restore replaces Caddy's certificates)")

    # What the restore replaces, saved before anything changes.
    current = {name: file_member(target) for name, target in targets.items() if target.is_file()}
    current_data = compose.read_caddy_data()
    report, saved = [], None
    if current or volume_files(current_data):
        saved = write_archive(current, current_data, "pre-restore")
        say("restore", f"what this replaces is saved first: {saved}")
    try:
        compose.replace_caddy_data(members[CADDY_DATA][0])
        for name, target in targets.items():
            report.append(f"{target}: {write_file(target, *members[name])}")
    except (Refused, OSError) as error:
        undo = f"make restore FILE={saved} puts back what was there" if saved else "nothing was there before"
        raise Refused(f"half restored ({error}); {undo}") from None
    ca = "with its internal root CA: clients need no change" if manifest["caddy_root_ca"] else \
        "no internal root CA in it (a public domain's certificates only)"
    report.append(f"Caddy's data volume: restored, {ca}")
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/backup.py")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("backup")
    commands.add_parser("restore").add_argument("file", nargs="?", default="")
    args = parser.parse_args(argv)
    try:
        if args.command == "backup":
            out, notes = backup()
            for note in notes:
                say("backup", note)
            say("backup", f"{out} (mode 0600: it holds the API keys and Caddy's CA key; keep a copy off this host)")
        else:
            if not args.file:
                raise Refused("which backup? make restore FILE=backups/dce-backup-….tar.gz")
            for line in restore(Path(args.file)):
                say("restore", line)
            say("restore", "done: make up starts the stack with it")
    except Refused as refusal:
        say(args.command, str(refusal))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
