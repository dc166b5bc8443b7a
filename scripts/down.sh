#!/usr/bin/env bash
# `make down`: first the proxy answers new requests with a JSON 503 and the reason (Caddy still
# listening, so nobody gets a refused connection) while its running streams finish, up to
# DCE_STOP_GRACE_SECONDS; then every service stops, each with the same grace for what is left.
# Arguments go to `docker compose down` (make down ARGS=--volumes).
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_BAKE=false

say() { printf 'make down: %s\n' "$*"; }
settings=${DCE_ENV_FILE:-.env}
compose=(docker compose)
[[ -z ${DCE_ENV_FILE:-} ]] || compose+=(--env-file "$DCE_ENV_FILE")
grace=$( [[ -f $settings ]] && sed -n 's/^DCE_STOP_GRACE_SECONDS=//p' "$settings" | tail -n 1 || true)
grace=${grace:-600}

if [[ -n $("${compose[@]}" ps --quiet --status running proxy 2>/dev/null) ]]; then
  # Given up (Ctrl-C): the proxy serves again, rather than refusing everyone until a restart.
  trap '"${compose[@]}" exec -T proxy python3 -m dce_proxy.stopping cancel >/dev/null 2>&1 || true; exit 130' INT TERM
  say "new requests now get a JSON 503 (the stack is stopping); running streams finish first, up to ${grace}s"
  "${compose[@]}" exec -T proxy python3 -m dce_proxy.stopping announce "$grace" \
    || say "the proxy did not answer: stopping anyway (each service still lets its streams finish)"
  trap - INT TERM
fi
"${compose[@]}" down --remove-orphans "$@"
