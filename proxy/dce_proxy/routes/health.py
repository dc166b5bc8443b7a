"""Liveness and readiness probes for Docker and operators; no key needed, no limits."""

from flask import Blueprint, current_app

from ..errors import ApiError, upstream_unavailable
from ..relay import json_body_response

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return json_body_response({"status": "ok"})


@bp.get("/readyz")
def readyz():
    try:
        models = current_app.extensions["dce_upstream"].models(fresh=True)
    except ApiError as error:
        # Whatever went wrong upstream, the proxy is simply not ready yet.
        raise upstream_unavailable(f"Not ready: {error.message}") from None
    return json_body_response({"status": "ready", "model": models.default,
                               "max_model_len": models.max_model_len.get(models.default)})
