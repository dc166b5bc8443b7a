"""The API keys the proxy accepts right now: those of DCE_API_KEYS, and those of DCE_API_KEYS_FILE,
read again whenever that file changes. Adding or revoking a key takes no restart: every worker sees
the change on its first request a second later, and streams in flight go on."""

from __future__ import annotations

import logging
import os
import time

from flask import current_app

from .config import ApiKey, ConfigError, Settings, read_keys_file

log = logging.getLogger("dce_proxy")

# How often a worker looks at the key file (a stat, not a read, unless it changed).
CHECK_SECONDS = 1.0


class KeyRing:
    def __init__(self, settings: Settings, check_seconds: float = CHECK_SECONDS):
        self._inline = settings.inline_api_keys
        self._path = settings.api_keys_file
        self._check_seconds = check_seconds
        self._keys = settings.api_keys
        self._seen = self._signature()
        self._next_check = time.monotonic() + check_seconds

    def keys(self) -> tuple[ApiKey, ...]:
        if self._path and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + self._check_seconds
            self._read_if_changed()
        return self._keys

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self._path) if self._path else None
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns) if stat else None

    def _read_if_changed(self) -> None:
        signature = self._signature()
        if signature == self._seen:
            return
        self._seen = signature
        try:
            from_file = read_keys_file(self._path)
        except ConfigError as error:
            # Never fewer checks than before: the keys in force stay, and the operator is told why.
            log.warning("the key file changed but cannot be used, the %d key(s) in force stay: %s",
                        len(self._keys), error)
            return
        self._keys = self._inline + tuple(from_file)
        log.info("API keys read again from the key file: %d key(s) [%s]", len(self._keys),
                 ", ".join(key.key_id for key in self._keys))


def key_ring() -> KeyRing:
    return current_app.extensions["dce_keys"]
