"""Adding or revoking a key in the key file holds from the next check on, without a restart
(keys.py, issue 14); a file that no longer parses keeps the keys in force."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dce_proxy.config import ApiKey, load_settings
from dce_proxy.keys import KeyRing

REPO = Path(__file__).resolve().parents[2]
OLD, NEW = "old-key-aaaaaaaaaaaaaaaa", "new-key-bbbbbbbbbbbbbbbb"


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "dce_api_keys"
    path.write_text(f"old:{OLD}\n")
    return path


def _ring(key_file, **env) -> KeyRing:
    settings = load_settings({"DCE_API_KEYS_FILE": str(key_file), "VLLM_URL": "http://vllm:8000", **env})
    return KeyRing(settings, check_seconds=0)  # looks at the file on every call


def _names(ring: KeyRing) -> list[str]:
    return [key.key_id for key in ring.keys()]


def test_a_key_added_and_one_revoked_in_place_hold_at_the_next_check(key_file):
    ring = _ring(key_file)
    assert _names(ring) == ["old"]
    with key_file.open("a") as keys:  # appended in place, as `make key-add` does
        keys.write(f"new:{NEW}\n")
    assert _names(ring) == ["old", "new"]
    key_file.write_text(f"new:{NEW}\n")  # rewritten in place, as `make key-revoke` does
    assert ring.keys() == (ApiKey("new", NEW.encode()),)


def test_a_file_caught_half_written_is_never_read(key_file):
    # A rewrite in place truncates the file first, then writes it, maybe in pieces: a worker may
    # look in between. Nothing fresh is read before it ends with a line break.
    ring = _ring(key_file)
    for half in ("", f"old:{OLD}\nnew:{NEW[:18]}"):
        key_file.write_text(half)
        assert _names(ring) == ["old"], half
    key_file.write_text(f"old:{OLD}\nnew:{NEW}\n")
    assert _names(ring) == ["old", "new"]


def test_a_file_without_a_last_line_break_is_read_once_it_is_not_fresh(key_file):
    ring = _ring(key_file)
    key_file.write_text(f"new:{NEW}")  # as some editors save
    assert _names(ring) == ["old"]
    written = key_file.stat().st_mtime - 5
    os.utime(key_file, (written, written))
    assert _names(ring) == ["new"]


def test_a_replaced_file_is_read_too(key_file, tmp_path):
    ring = _ring(key_file)
    replacement = tmp_path / "edited"
    replacement.write_text(f"new:{NEW}\n")
    replacement.replace(key_file)  # how many editors save: a new file under the old name
    assert _names(ring) == ["new"]


@pytest.mark.parametrize("broken, why", [("short:abc\n", "shorter than"), ("# all revoked\n", "holds no key"),
                                         (None, None)])
def test_a_file_that_cannot_be_used_keeps_the_keys_in_force(key_file, broken, why, caplog):
    ring = _ring(key_file)
    if broken is None:
        key_file.unlink()
    else:
        key_file.write_text(broken)
    assert _names(ring) == ["old"]
    if broken is not None:
        assert "cannot be used" in caplog.text and why in caplog.text and "abc" not in caplog.text  # never a key


def test_inline_keys_stay_whatever_the_file_says(key_file):
    ring = _ring(key_file, DCE_API_KEYS=f"inline:{NEW}")
    key_file.write_text("\n")
    assert _names(ring) == ["inline"]


def test_the_file_is_looked_at_once_per_interval(key_file):
    ring = KeyRing(load_settings({"DCE_API_KEYS_FILE": str(key_file)}), check_seconds=3600)
    key_file.write_text(f"new:{NEW}\n")
    assert _names(ring) == ["old"]  # not yet: the next look is an hour away


def test_a_revoked_key_gets_401_on_its_next_request(make_app, key_file):
    client = make_app(DCE_API_KEYS=None, DCE_API_KEYS_FILE=str(key_file)).test_client()
    client.application.extensions["dce_keys"] = KeyRing(client.application.config["DCE_SETTINGS"], check_seconds=0)
    assert client.get("/v1/models", headers={"X-API-Key": OLD}).status_code == 200
    key_file.write_text(f"new:{NEW}\n")
    assert client.get("/v1/models", headers={"X-API-Key": OLD}).status_code == 401
    assert client.get("/v1/models", headers={"X-API-Key": NEW}).status_code == 200


def _keys_sh(key_file, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts/keys.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "DCE_API_KEYS_SECRET": str(key_file)})


def test_make_key_add_and_revoke_change_the_file_in_place_and_show_the_key_once(key_file):
    inode = key_file.stat().st_ino  # the proxy's bind mount holds on to this file
    ring = _ring(key_file)
    added = _keys_sh(key_file, "add", "alice")
    assert added.returncode == 0, added.stderr
    (new_key,) = added.stdout.split()
    assert _names(ring) == ["old", "alice"] and ring.keys()[1].secret == new_key.encode()
    assert new_key not in added.stderr  # the one copy goes to the terminal's output
    assert _keys_sh(key_file, "add", "alice").returncode == 1  # one key per name
    assert _keys_sh(key_file, "revoke", "old").returncode == 0
    assert _names(ring) == ["alice"] and key_file.stat().st_ino == inode
    assert _keys_sh(key_file, "list").stdout.split() == ["alice"]
    assert _keys_sh(key_file, "revoke", "nobody").returncode == 1
    assert _keys_sh(key_file, "add", "no spaces").returncode == 2


def test_make_key_add_keeps_a_last_line_without_its_line_break(key_file):
    key_file.write_text(f"old:{OLD}")  # as some editors save
    assert _keys_sh(key_file, "add", "alice").returncode == 0
    assert [line.split(":")[0] for line in key_file.read_text().splitlines()] == ["old", "alice"]


def test_make_key_revoke_keeps_the_last_key(key_file):
    refused = _keys_sh(key_file, "revoke", "old")
    assert refused.returncode == 1 and "only key" in refused.stderr
    assert key_file.read_text() == f"old:{OLD}\n"
