"""Settings, read once from the environment and validated before the app serves anything."""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from flask import Flask, current_app
from limits import parse_many

MIN_KEY_LENGTH = 16
# The probes' endpoints: no key, no limits, and no access line when they succeed.
PUBLIC_ENDPOINTS = frozenset({"health.healthz", "health.readyz"})
_SETTINGS = "DCE_SETTINGS"


class ConfigError(ValueError):
    """The environment describes a proxy that must not start."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str  # what logs and limits use; never the key itself
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class Settings:
    vllm_url: str = "http://vllm:8000"
    # Secrets stay out of repr(): a logged Settings or traceback must not show them.
    vllm_api_key: str = field(default="", repr=False)  # sent to vLLM as a bearer token when set
    api_keys: tuple[ApiKey, ...] = ()  # at start: inline_api_keys, then the key file's (keys.py reads it again)
    inline_api_keys: tuple[ApiKey, ...] = ()  # DCE_API_KEYS
    api_keys_file: str = ""  # DCE_API_KEYS_FILE
    open_mode: bool = False
    model_aliases: Mapping[str, str] = field(default_factory=dict)
    rate_limit: str = "600/minute"
    auth_failure_limit: str = "30/minute"
    max_concurrent: int = 20
    max_n: int = 16
    default_n: int = 10
    default_max_tokens: int = 4096
    max_body_bytes: int = 50 * 1024 * 1024
    first_byte_timeout: float = 300.0
    answer_timeout: float = 1800.0
    heartbeat_seconds: float = 15.0
    queue_timeout: float = 300.0
    connect_timeout: float = 5.0
    model_status_file: str = ""  # the model download's state (download_model.py), for the 503's reason
    ratelimit_storage_uri: str = field(default="memory://", repr=False)  # may hold the Redis password
    workers: int = 1
    # vLLM_URL is the vLLM router before several replicas (compose.router.yaml): each generation
    # then names its conversation (affinity.py), so that a DCE batch stays on one replica.
    session_affinity: bool = False
    # Browser origins (scheme://host[:port]) allowed to call the API; none: CORS is off (cors.py).
    cors_origins: tuple[str, ...] = ()


def init_settings(app: Flask, loaded: Settings) -> None:
    app.config.update({_SETTINGS: loaded, "MAX_CONTENT_LENGTH": loaded.max_body_bytes})


def settings() -> Settings:
    """This app's settings, loaded once by create_app."""
    return current_app.config[_SETTINGS]


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    if env is None:
        env = os.environ
    reader = _Reader(env)
    inline_keys = tuple(_parse_keys(env.get("DCE_API_KEYS", "").split(","), "DCE_API_KEYS"))
    keys_file = env.get("DCE_API_KEYS_FILE", "").strip()
    file_keys = tuple(read_keys_file(keys_file)) if keys_file else ()
    loaded = Settings(
        vllm_url=env.get("VLLM_URL", Settings.vllm_url).rstrip("/"),
        vllm_api_key=_read_secret(env.get("VLLM_API_KEY_FILE", "").strip(), "VLLM_API_KEY_FILE"),
        api_keys=inline_keys + file_keys,
        inline_api_keys=inline_keys,
        api_keys_file=keys_file,
        open_mode=reader.boolean("DCE_OPEN_MODE", False),
        model_aliases=_parse_aliases(env.get("DCE_MODEL_ALIASES", "")),
        rate_limit=reader.rate_limit("DCE_RATE_LIMIT", Settings.rate_limit),
        auth_failure_limit=reader.rate_limit("DCE_AUTH_FAILURE_LIMIT", Settings.auth_failure_limit),
        max_concurrent=reader.integer("DCE_MAX_CONCURRENT", Settings.max_concurrent, 1, 100_000),
        max_n=reader.integer("DCE_MAX_N", Settings.max_n, 1, 1024),
        default_n=reader.integer("DCE_DEFAULT_N", Settings.default_n, 1, 1024),
        default_max_tokens=reader.integer("DCE_DEFAULT_MAX_TOKENS", Settings.default_max_tokens, 1, 10_000_000),
        max_body_bytes=reader.integer("DCE_MAX_BODY_MB", 50, 1, 10_000) * 1024 * 1024,
        first_byte_timeout=reader.number("DCE_FIRST_BYTE_TIMEOUT", Settings.first_byte_timeout),
        answer_timeout=reader.number("DCE_ANSWER_TIMEOUT", Settings.answer_timeout),
        connect_timeout=reader.number("DCE_CONNECT_TIMEOUT", Settings.connect_timeout),
        model_status_file=env.get("DCE_MODEL_STATUS_FILE", "").strip(),
        # Below the DCE extension's 60 s socket timeout, or the heartbeats would not keep it open.
        heartbeat_seconds=reader.number("DCE_HEARTBEAT_SECONDS", Settings.heartbeat_seconds, high=55),
        queue_timeout=reader.number("DCE_QUEUE_TIMEOUT", Settings.queue_timeout),
        ratelimit_storage_uri=_with_password(
            env.get("DCE_RATELIMIT_STORAGE_URI", Settings.ratelimit_storage_uri).strip(),
            _read_secret(env.get("DCE_RATELIMIT_PASSWORD_FILE", "").strip(), "DCE_RATELIMIT_PASSWORD_FILE")),
        workers=reader.integer("DCE_PROXY_WORKERS", Settings.workers, 1, 64),
        session_affinity=reader.boolean("DCE_SESSION_AFFINITY", False),
        cors_origins=_parse_origins(env.get("DCE_CORS_ORIGINS", "")),
    )
    _check_consistency(loaded)
    return loaded


def _check_consistency(loaded: Settings) -> None:
    if not loaded.vllm_url.startswith(("http://", "https://")):
        raise ConfigError(f"VLLM_URL must start with http:// or https://, got {loaded.vllm_url!r}")
    if not loaded.api_keys and not loaded.open_mode:
        raise ConfigError(
            "no API key configured: set DCE_API_KEYS or DCE_API_KEYS_FILE, "
            "or DCE_OPEN_MODE=true for a public demo without keys"
        )
    if loaded.default_n > loaded.max_n:
        raise ConfigError(f"DCE_DEFAULT_N ({loaded.default_n}) is above DCE_MAX_N ({loaded.max_n})")
    if loaded.workers > 1 and not in_redis(loaded.ratelimit_storage_uri):
        # Each worker would count on its own: limits would silently multiply by the worker count.
        raise ConfigError(
            "DCE_PROXY_WORKERS > 1 needs the limits shared in Redis: DCE_RATELIMIT_STORAGE_URI=redis://...; "
            f"with {loaded.ratelimit_storage_uri.split(':')[0]}:// they would hold per worker, not for the service"
        )


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def boolean(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if not low <= number <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {number}")
        return number

    def number(self, name: str, default: float, high: float = 1e6) -> float:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
        if not 0 < number < high:
            raise ConfigError(f"{name} must be a positive number of seconds below {high:.0f}, got {value!r}")
        return number

    def rate_limit(self, name: str, default: str) -> str:
        value = self._raw(name) or default
        try:
            parse_many(value)
        except ValueError:
            raise ConfigError(f"{name} must look like '600/minute', got {value!r}") from None
        return value


def _parse_keys(entries: Iterable[str], source: str) -> list[ApiKey]:
    keys = []
    for entry in entries:
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, secret = entry.partition(":")
        if not sep:
            name, secret = "", entry
        if len(secret) < MIN_KEY_LENGTH:
            # Never echo the key: only say which entry is too short.
            label = f"key {name!r}" if name else f"entry {len(keys) + 1}"
            raise ConfigError(f"{source}: {label} is shorter than {MIN_KEY_LENGTH} characters")
        key_id = name or "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]
        keys.append(ApiKey(key_id=key_id, secret=secret.encode()))
    return keys


def read_keys_file(path: str) -> list[ApiKey]:
    return parse_keys_file(_read_file(path, "DCE_API_KEYS_FILE"))


def parse_keys_file(text: str) -> list[ApiKey]:
    return _parse_keys(text.splitlines(), "DCE_API_KEYS_FILE")


def _read_secret(path: str, name: str) -> str:
    """A one-line secret from a file (a Compose secret); "" when no file is named."""
    if not path:
        return ""
    secret = _read_file(path, name).strip()
    if len(secret) < MIN_KEY_LENGTH or any(char.isspace() for char in secret):
        raise ConfigError(f"{name}: {path} must hold one key of at least {MIN_KEY_LENGTH} characters")
    return secret


_PASSWORD = re.compile(r"[A-Za-z0-9_-]+")


def in_redis(storage_uri: str) -> bool:
    """Whether the limits live in Redis (shared by the workers), not in each worker's memory."""
    return storage_uri.startswith(("redis://", "rediss://"))


def _with_password(storage_uri: str, password: str) -> str:
    """The Redis URI with the password of DCE_RATELIMIT_PASSWORD_FILE (a Compose secret) in it."""
    if not password:
        return storage_uri
    if not _PASSWORD.fullmatch(password):  # Redis reads it from its config file: no quoting needed
        raise ConfigError("DCE_RATELIMIT_PASSWORD_FILE: the password may hold only letters, digits, - and _")
    parts = urllib.parse.urlsplit(storage_uri)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError("DCE_RATELIMIT_PASSWORD_FILE is set, but DCE_RATELIMIT_STORAGE_URI is not a redis:// URI")
    if "@" in parts.netloc:
        raise ConfigError("DCE_RATELIMIT_STORAGE_URI holds a user or password already: "
                          "give the password only in DCE_RATELIMIT_PASSWORD_FILE")
    netloc = f":{password}@{parts.netloc}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _read_file(path: str, name: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None


# An origin as a browser sends it: scheme, host and an optional port, nothing after.
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(?::\d{1,5})?|https?://\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")


def _parse_origins(text: str) -> tuple[str, ...]:
    origins = tuple(entry.strip().rstrip("/") for entry in text.split(",") if entry.strip())
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            # "*" included: a key in a page's script is the page's to leak; name the pages you trust.
            raise ConfigError(f"DCE_CORS_ORIGINS lists origins like https://chat.example.com:8443, got {origin!r}")
    return origins


def _parse_aliases(text: str) -> dict[str, str]:
    aliases = {}
    for entry in text.split(","):
        if not entry.strip():
            continue
        alias, sep, target = entry.partition("=")
        if not sep or not alias.strip() or not target.strip():
            raise ConfigError(f"DCE_MODEL_ALIASES entries look like alias=served-model, got {entry.strip()!r}")
        aliases[alias.strip()] = target.strip()
    return aliases
