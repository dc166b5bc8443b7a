"""`make down` (scripts/down.sh, issue 14): a running proxy is told of the stop first and the stack
goes down only after; a stop that fails takes the announcement back; a stack whose proxy is not
running just goes down. Docker is a stub that records its calls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def checkout(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts/down.sh", tmp_path / "scripts/down.sh")
    (tmp_path / "bin").mkdir()
    return tmp_path


def _down(checkout: Path, proxy_running: bool, *args: str, down_fails: bool = False) -> tuple[int, list[str]]:
    """make down with a docker stub; the proxy runs until `compose down` succeeds. Returns the exit
    code and the calls, without the looks at whether the proxy runs."""
    gone = checkout / "gone"
    running = f"[ -e {gone} ] || echo abc123" if proxy_running else "true"
    down = "exit 1" if down_fails else f"touch {gone}"
    docker = checkout / "bin/docker"
    docker.write_text(f"""#!/bin/sh
echo "$*" >> {checkout}/calls
case "$*" in
  *" ps "*) {running} ;;
  "compose down"*) {down} ;;
esac
""")
    docker.chmod(0o755)
    result = subprocess.run(["bash", "scripts/down.sh", *args], cwd=checkout, capture_output=True, text=True,
                            env={"PATH": f"{checkout / 'bin'}:/usr/bin:/bin"})
    return result.returncode, [call for call in (checkout / "calls").read_text().splitlines() if " ps " not in call]


def test_a_running_proxy_is_told_of_the_stop_before_anything_stops(checkout):
    code, calls = _down(checkout, True, "--volumes")
    assert code == 0
    assert calls == ["compose exec -T proxy python3 -m dce_proxy.stop announce",
                     "compose down --remove-orphans --volumes"]  # and no cancel: the proxy is gone


def test_a_stop_that_fails_takes_its_announcement_back(checkout):
    code, calls = _down(checkout, True, down_fails=True)
    assert code == 1
    assert calls[-1] == "compose exec -T proxy python3 -m dce_proxy.stop cancel"  # the proxy serves again


def test_a_stack_without_a_running_proxy_just_goes_down(checkout):
    code, calls = _down(checkout, False)
    assert code == 0 and calls == ["compose down --remove-orphans"]
