"""The API keys the proxy accepts right now: those of DCE_API_KEYS, and those of DCE_API_KEYS_FILE,
read again whenever that file changes. Adding or revoking a key takes no restart: every worker sees
the change within a second or two, and streams in flight go on.

A file rewritten in place is empty for a moment (truncated, then written), or holds half its last
line while it is written in pieces: a change that is still fresh is read only once it looks whole
(it ends with a line break), an older one as it is. A file that leaves no key at all (the proxy
could not start with it) or does not parse keeps the keys in force, and the log says why.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flask import Flask, current_app

from .config import ApiKey, ConfigError, Settings, parse_keys_file

log = logging.getLogger("dce_proxy")

# How often a worker looks at the key file (a stat, not a read, unless it changed).
CHECK_SECONDS = 1.0
# A change younger than this may still be being written.
SETTLE_SECONDS = 1.0


class KeyRing:
    def __init__(self, settings: Settings, check_seconds: float = CHECK_SECONDS,
                 settle_seconds: float = SETTLE_SECONDS):
        self._inline = settings.inline_api_keys
        self._open_mode = settings.open_mode
        self._path = settings.api_keys_file
        self._check_seconds, self._settle_seconds = check_seconds, settle_seconds
        self._keys = settings.api_keys
        self._applied = self._signature()  # the file as its keys in force were read
        self._next_check = time.monotonic() + check_seconds

    def keys(self) -> tuple[ApiKey, ...]:
        if self._path and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + self._check_seconds
            self._read_if_changed()
        return self._keys

    def _signature(self) -> tuple | None:
        try:
            stat = os.stat(self._path) if self._path else None
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) if stat else None

    def _read_if_changed(self) -> None:
        signature = self._signature()
        if signature is None or signature == self._applied:
            return
        try:
            text = Path(self._path).read_text(encoding="utf-8")
        except OSError:
            return  # gone for a moment (replaced): the next check sees it
        fresh = time.time() - signature[2] / 1e9 < self._settle_seconds
        if fresh and not text.endswith("\n"):
            return  # being written: the next check reads it whole
        self._applied = signature
        try:
            keys = self._inline + tuple(parse_keys_file(text))
            if not keys and not self._open_mode:
                raise ConfigError("it holds no key, and the proxy would not start with it")
        except ConfigError as error:
            log.error("the key file changed but cannot be used, the %d key(s) in force stay: %s",
                      len(self._keys), error)
            return
        self._keys = keys
        log.info("API keys read again from the key file: %d key(s) [%s]", len(keys),
                 ", ".join(key.key_id for key in keys))


def init_keys(app: Flask, loaded: Settings) -> None:
    app.extensions["dce_keys"] = KeyRing(loaded)


def key_ring() -> KeyRing:
    return current_app.extensions["dce_keys"]
