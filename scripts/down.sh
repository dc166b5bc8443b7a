#!/usr/bin/env bash
# `make down`: first the proxy answers new requests with a JSON 503 and the reason (Caddy still
# listening, so nobody gets a refused connection) while its running streams finish, up to
# DCE_STOP_GRACE_SECONDS; then every service stops, each with the same grace for what is left (so
# at most twice that in all). Arguments go to `docker compose down` (make down ARGS=--volumes).
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_BAKE=false

say() { printf 'make down: %s\n' "$*"; }
compose=(docker compose)
[[ -z ${DCE_ENV_FILE:-} ]] || compose+=(--env-file "$DCE_ENV_FILE")
proxy_runs() { [[ -n $("${compose[@]}" ps --quiet --status running proxy 2>/dev/null) ]]; }

if proxy_runs; then
  # However this ends short of the proxy's stop (Ctrl-C, a lost session, a failed `down`), a proxy
  # still running serves again, rather than refusing everyone until the announcement lapses.
  trap 'proxy_runs && "${compose[@]}" exec -T proxy python3 -m dce_proxy.stop cancel >/dev/null 2>&1 || true' EXIT
  trap 'exit 130' INT TERM HUP
  say "new requests now get a JSON 503 (the stack is stopping); running streams finish first"
  "${compose[@]}" exec -T proxy python3 -m dce_proxy.stop announce \
    || say "the proxy did not answer: stopping anyway (each service still lets its streams finish)"
fi
"${compose[@]}" down --remove-orphans "$@"
