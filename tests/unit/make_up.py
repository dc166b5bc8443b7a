"""`make up` (scripts/up.sh) in a copy of the checkout, with Docker, the image builds and the host's
GPU and cores as stubs that record their calls: for test_up.py and test_replicas.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def make_checkout(tmp_path: Path) -> Path:
    """A copy of what up.sh reads, with docker, ensure-docker.sh and build-images.sh recording calls."""
    for name in (".env.example", "compose.yaml", "compose.cpu.yaml", "compose.scale.yaml", "compose.monitoring.yaml",
                 "compose.router.yaml", "images.env"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "scripts").mkdir()
    for script in ("up.sh", "replicas.py"):
        shutil.copy(REPO / "scripts" / script, tmp_path / "scripts" / script)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for path, body in [(tmp_path / "scripts/ensure-docker.sh", "exit 0"),
                       (tmp_path / "scripts/build-images.sh",
                        f'echo "$*" >> {tmp_path}/built; echo "${{DCE_BUILD_FRESH:-cached}}" >> {tmp_path}/fresh'),
                       (stubs / "docker", f'echo "$*" >> {tmp_path}/docker'),
                       (stubs / "nvidia-smi", "exit 1"),  # no GPU, even on a host that has one
                       (stubs / "nproc", 'echo "${OMP_NUM_THREADS:-${STUB_CORES:-2}}"')]:  # 2 cores; OMP_* as nproc
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return tmp_path


def run_up(checkout: Path, env_lines: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    (checkout / ".env").write_text((REPO / ".env.example").read_text() + env_lines)
    # The stubs first: the CPU profile (nvidia-smi finds no GPU), docker recording its calls.
    path = f"{checkout / 'bin'}:{os.path.dirname(shutil.which('python3'))}:/usr/bin:/bin"
    return subprocess.run(["bash", "scripts/up.sh"], cwd=checkout, capture_output=True, text=True,
                          env={"PATH": path, "HOME": str(checkout), **(extra_env or {})})


def env_values(checkout: Path, name: str) -> list[str]:
    return [line.split("=", 1)[1] for line in (checkout / ".env").read_text().splitlines()
            if line.startswith(f"{name}=")]
