#!/usr/bin/env bash
# `make keys`, `make key-add NAME=...`, `make key-revoke NAME=...`: the API key file (a Compose
# secret). The proxy reads the file again within two seconds of a change: no restart, no stream cut.
# The file is rewritten in place, in one write: the proxy's container sees the file it was started
# with (a bind mount holds on to it), so a file replaced by a new one would go unseen.
set -euo pipefail
cd "$(dirname "$0")/.."

case ${1:-} in list) target=keys ;; add) target=key-add ;; revoke) target=key-revoke ;; *) target=keys ;; esac
say() { printf 'make %s: %s\n' "$target" "$*" >&2; }
command=${1:-}
name=${2:-}
keys_file=${DCE_API_KEYS_SECRET:-$( [[ -f .env ]] && sed -n 's/^DCE_API_KEYS_SECRET=//p' .env | tail -n 1)}
keys_file=${keys_file:-./secrets/dce_api_keys}
[[ -f $keys_file ]] || { say "no key file at $keys_file (make up creates it)"; exit 1; }

names() { sed -n 's/^[[:space:]]*\([^#:[:space:]][^:]*\):.*/\1/p' "$keys_file"; }
has_name() { grep -qxF -- "$name" < <(names); }
valid_name() { [[ $name =~ ^[A-Za-z0-9._-]{1,64}$ ]] || { say "NAME=name, with letters, digits, . _ - only"; exit 2; }; }
# The file's new content, given on stdin, in one write (never half a file for the proxy to read).
rewrite() { python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC); os.write(fd, sys.stdin.buffer.read()); os.close(fd)' "$keys_file"; }
entries() { grep -cvE '^[[:space:]]*(#|$)' "$keys_file" || true; }

case $command in
  list)
    names
    unnamed=$(grep -cvE '^[[:space:]]*(#|$)|:' "$keys_file" || true)
    (( unnamed == 0 )) || echo "($unnamed key(s) without a name: logged as key-<hash>; edit the file to revoke them)"
    ;;
  add)
    valid_name
    if has_name; then say "a key named $name exists: make key-revoke NAME=$name first"; exit 1; fi
    key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
    # A last line without its line break (as some editors save) must not swallow the new entry.
    { cat "$keys_file"; [[ ! -s $keys_file || $(tail -c 1 "$keys_file" | od -An -c) == *'\n'* ]] || echo; \
      printf '%s:%s\n' "$name" "$key"; } | rewrite
    say "added $name; its key, shown this once (give it to its user; it is in no log):"
    [[ -t 1 ]] || say "(the output is not a terminal: the key went wherever it is redirected)"
    printf '%s\n' "$key"
    ;;
  revoke)
    valid_name
    if ! has_name; then say "no key named $name"; exit 1; fi
    if (( $(entries) <= 1 )); then say "$name holds the only key: the proxy would accept none (add another first)"; exit 1; fi
    grep -vE "^[[:space:]]*${name//./\\.}:" "$keys_file" | rewrite
    say "revoked $name: its requests get 401 within two seconds; streams it has running finish"
    ;;
  *)
    echo "usage: scripts/keys.sh list | add NAME | revoke NAME" >&2
    exit 2
    ;;
esac
