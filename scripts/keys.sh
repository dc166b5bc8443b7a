#!/usr/bin/env bash
# `make keys`, `make key-add NAME=...`, `make key-revoke NAME=...`: the API key file (a Compose
# secret). The proxy reads the file again within a second of a change: no restart, no stream cut.
# The file is changed in place: the proxy's container sees the file it was started with (a bind
# mount holds on to it), so a file replaced by a new one would go unseen.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'make %s: %s\n' "$command" "$*" >&2; }
command=${1:-}
name=${2:-}
keys_file=${DCE_API_KEYS_SECRET:-$( [[ -f .env ]] && sed -n 's/^DCE_API_KEYS_SECRET=//p' .env | tail -n 1)}
keys_file=${keys_file:-./secrets/dce_api_keys}
[[ -f $keys_file ]] || { command=${command:-keys}; say "no key file at $keys_file (make up creates it)"; exit 1; }

names() { sed -n 's/^[[:space:]]*\([^#:[:space:]][^:]*\):.*/\1/p' "$keys_file"; }
valid_name() { [[ $name =~ ^[A-Za-z0-9._-]{1,64}$ ]] || { say "NAME=name, with letters, digits, . _ - only"; exit 2; }; }

case $command in
  list)
    names
    unnamed=$(grep -cvE '^[[:space:]]*(#|$)|:' "$keys_file" || true)
    (( unnamed == 0 )) || echo "($unnamed key(s) without a name: logged as key-<hash>)"
    ;;
  add)
    command=key-add; valid_name
    if names | grep -qxF -- "$name"; then say "a key named $name exists: make key-revoke NAME=$name first"; exit 1; fi
    key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
    printf '%s:%s\n' "$name" "$key" >> "$keys_file"
    say "added $name; its key, shown this once (give it to its user; it is in no log):"
    printf '%s\n' "$key"
    ;;
  revoke)
    command=key-revoke; valid_name
    if ! names | grep -qxF -- "$name"; then say "no key named $name"; exit 1; fi
    kept=$(grep -vE "^[[:space:]]*${name//./\\.}:" "$keys_file" || true)
    # In place (the same file, truncated and written), never a new file: see the top of this script.
    printf '%s\n' "$kept" > "$keys_file"
    say "revoked $name: its requests get 401 within a few seconds; streams it has running finish"
    ;;
  *)
    echo "usage: scripts/keys.sh list | add NAME | revoke NAME" >&2
    exit 2
    ;;
esac
