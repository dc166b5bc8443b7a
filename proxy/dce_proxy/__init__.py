"""The DCE proxy: authenticates, validates, rate-limits and streams between Caddy and vLLM."""

from __future__ import annotations

import logging
from typing import Mapping

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from .access_log import configure_logging, write_access_line
from .auth import PathKeyMiddleware, authenticate
from .config import Settings, init_settings, load_settings
from .cors import init_cors
from .errors import register_error_handlers
from .keys import init_keys
from .limits import init_limits
from .metrics import observe
from .record import init_records
from .routes import dce, health, openai
from .stopping import refuse_while_stopping
from .upstream import init_upstream

log = logging.getLogger("dce_proxy")


def create_app(env: Mapping[str, str] | None = None) -> Flask:
    settings = load_settings(env)
    app = Flask(__name__, static_folder=None)  # no /static: it serves only the API
    init_settings(app, settings)
    init_upstream(app, settings)
    init_keys(app, settings)
    # Caddy is the only hop in front of us: trust exactly one X-Forwarded-For entry, the one it wrote.
    app.wsgi_app = PathKeyMiddleware(ProxyFix(app.wsgi_app, x_for=1, x_proto=0, x_host=0))
    register_error_handlers(app)
    configure_logging()
    init_records(app, [write_access_line, observe])
    init_cors(app, settings.cors_origins)  # before the key check: a browser's preflight has no key
    app.before_request(refuse_while_stopping)  # a stop on its way starts nothing new, whoever asks
    app.before_request(authenticate)  # before the limiter: limits count per authenticated key
    init_limits(app, settings)  # after authenticate: budgets are per key
    app.register_blueprint(health.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(openai.utility_bp)
    app.register_blueprint(dce.bp)
    _announce(settings)
    return app


def _announce(settings: Settings) -> None:
    if settings.open_mode:
        log.warning("OPEN MODE: requests without an API key are served (DCE_OPEN_MODE=true); "
                    "limits apply per client IP. Do not use this for private code.")
    log.info("dce proxy configured: upstream %s, %d API key(s) [%s]", settings.vllm_url,
             len(settings.api_keys), ", ".join(key.key_id for key in settings.api_keys))
