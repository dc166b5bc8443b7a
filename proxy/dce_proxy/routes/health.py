"""Liveness and readiness probes for Docker and operators; no key needed, no limits."""

from flask import Blueprint

from ..errors import ApiError, json_response, upstream_unavailable
from ..upstream import upstream

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz():
    try:
        models = upstream().models(fresh=True)
    except ApiError as error:
        # Whatever went wrong upstream, the proxy is simply not ready yet.
        raise upstream_unavailable(f"Not ready: {error.message}") from None
    return json_response({"status": "ready", "model": models.default,
                               "max_model_len": models.max_model_len.get(models.default)})
