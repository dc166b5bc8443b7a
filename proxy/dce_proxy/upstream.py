"""The one place that talks to vLLM: pooled HTTP, model discovery, and upstream failures as ApiErrors."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import requests
from requests.adapters import HTTPAdapter

from .config import Settings
from .errors import ApiError, upstream_garbage, upstream_timeout, upstream_unavailable

# vLLM can be swapped for another model without a proxy restart; re-read its model list this often.
_MODELS_TTL_SECONDS = 30
_READINESS_TIMEOUT_SECONDS = 3


@dataclass(frozen=True)
class ModelInfo:
    served: tuple[str, ...]
    max_model_len: dict[str, int]

    @property
    def default(self) -> str:
        return self.served[0]


class UpstreamStreamError(Exception):
    """The upstream stream broke after the client already got its 200."""

    def __init__(self, error: ApiError):
        super().__init__(error.message)
        self.error = error


class Upstream:
    def __init__(self, settings: Settings):
        self._base = settings.vllm_url
        self._timeout = (settings.connect_timeout, settings.first_byte_timeout)
        self._session = requests.Session()
        # Nothing from the environment: no HTTP_PROXY detour to vLLM, and no per-request scan of
        # os.environ and ~/.netrc (a measurable share of each request's CPU).
        self._session.trust_env = False
        # One pool, sized for many concurrent streams; no retries: a POST may already be generating.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=2048, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._models: ModelInfo | None = None
        self._models_fetched_at = 0.0
        self._models_lock = threading.Lock()

    # -- model discovery -------------------------------------------------------------------

    def models(self, *, fresh: bool = False) -> ModelInfo:
        with self._models_lock:
            stale = time.monotonic() - self._models_fetched_at > _MODELS_TTL_SECONDS
            if self._models is None or stale or fresh:
                self._models = self._fetch_models()
                self._models_fetched_at = time.monotonic()
            return self._models

    def forget_models(self) -> None:
        with self._models_lock:
            self._models = None

    def _fetch_models(self) -> ModelInfo:
        response = self.request("GET", "/v1/models", timeout=(self._timeout[0], _READINESS_TIMEOUT_SECONDS))
        try:
            cards = json.loads(response.content)["data"]
            served = tuple(str(card["id"]) for card in cards)
            lengths = {str(card["id"]): int(card["max_model_len"]) for card in cards if card.get("max_model_len")}
        except (ValueError, KeyError, TypeError):
            raise upstream_garbage("vLLM's /v1/models answer is not the expected model list.") from None
        if not served:
            raise upstream_unavailable("vLLM serves no model yet.")
        return ModelInfo(served=served, max_model_len=lengths)

    # -- requests --------------------------------------------------------------------------

    def request(self, method: str, path: str, *, body: bytes | None = None, stream: bool = False,
                timeout: tuple[float, float] | None = None) -> requests.Response:
        """Sends one request; connection failures and 5xx-while-loading become ApiErrors.

        vLLM's own 4xx answers are returned as they are, for the caller to pass through.
        """
        try:
            response = self._session.request(
                method, self._base + path, data=body, stream=stream,
                headers={"Content-Type": "application/json"} if body is not None else None,
                timeout=timeout or self._timeout,
            )
        except requests.ConnectTimeout:
            raise upstream_unavailable("vLLM did not accept the connection in time (starting or overloaded).") from None
        except requests.ReadTimeout:
            raise upstream_timeout("vLLM did not start answering in time.") from None
        except requests.RequestException:
            raise upstream_unavailable("vLLM is not reachable (starting, restarting or down).") from None
        if response.status_code in (502, 503, 504):
            response.close()
            raise upstream_unavailable(f"vLLM is not ready (HTTP {response.status_code}).")
        return response


def iter_body(response: requests.Response) -> Iterator[bytes]:
    """Yields the upstream body chunk by chunk as it arrives; a broken stream raises UpstreamStreamError."""
    try:
        for chunk in response.iter_content(chunk_size=None):
            if chunk:
                yield chunk
    except requests.exceptions.ConnectionError as exc:
        if "timed out" in str(exc).lower():
            raise UpstreamStreamError(upstream_timeout("vLLM stopped sending tokens (timed out).")) from None
        raise UpstreamStreamError(upstream_unavailable("vLLM closed the stream before it ended.")) from None
    except requests.RequestException:
        raise UpstreamStreamError(upstream_unavailable("vLLM closed the stream before it ended.")) from None
