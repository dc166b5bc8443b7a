#!/usr/bin/env bash
# Build every image the test stack needs from Debian and PyPI packages only:
# no container registry is reachable. Docker's layer cache (and a script hash
# for the base) makes a rerun with unchanged inputs take seconds. After the
# base, the images build at the same time: vLLM's mostly waits on downloads
# and disk, so the small ones cost no extra time (about 50 s saved when cold).
# Usage: scripts/build-images.sh [base] [caddy] [proxy] [limits] [prometheus] [vllm]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."

# The local images' names (LOCAL_BASE_IMAGE, CADDY_IMAGE, ...): one file, also read by make up and the tests.
. ./images.env

wanted=" ${*:-base caddy proxy limits prometheus router vllm} "
for name in $wanted; do
  [[ " base caddy proxy limits prometheus router vllm " == *" $name "* ]] || { echo "unknown image: $name (base|caddy|proxy|limits|prometheus|router|vllm)" >&2; exit 2; }
done

scripts/ensure-docker.sh >/dev/null

# pip inside `docker build` passes the same TLS-inspecting proxy as the host.
EXTRA_CA_CERTS=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS

report() { printf '%-26s %-11s %4ds\n' "$1" "$2" "$3"; }

build() {  # TAG CONTEXT [docker build options...]
  local tag=$1 context=$2 start=$SECONDS before log="$work/${1//[:\/]/_}.log"
  shift 2
  before=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
  # DCE_BUILD_FRESH=1 (make upgrade): every layer again, so Debian's latest security updates go in.
  if ! docker build --force-rm ${DCE_BUILD_FRESH:+--no-cache} -t "$tag" --build-arg BASE_IMAGE="$LOCAL_BASE_IMAGE" \
      --build-arg EXTRA_CA_CERTS="$EXTRA_CA_CERTS" "$@" "$context" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "build-images: building $tag failed" >&2
    return 1
  fi
  if [[ $(docker image inspect -f '{{.Id}}' "$tag") == "$before" ]]; then
    report "$tag" "up to date" $((SECONDS - start))
  else
    report "$tag" built $((SECONDS - start))
  fi
}

builds=()
in_background() { "$@" & builds+=($!); }

# Every other image starts FROM the base, so it is always checked (a label
# comparison when nothing changed).
start=$SECONDS
report "$LOCAL_BASE_IMAGE" "$(scripts/build-base-image.sh "$LOCAL_BASE_IMAGE")" $((SECONDS - start))

if [[ $wanted == *" caddy "* ]]; then
  in_background build "$CADDY_IMAGE" caddy/
fi

if [[ $wanted == *" proxy "* ]]; then
  in_background build "$PROXY_IMAGE" proxy/
fi

if [[ $wanted == *" limits "* ]]; then
  in_background build "$LIMITS_IMAGE" limits/
fi

if [[ $wanted == *" prometheus "* ]]; then
  in_background build "$PROMETHEUS_IMAGE" monitoring/
fi

if [[ $wanted == *" router "* ]]; then
  in_background build "$ROUTER_IMAGE" router/
fi

if [[ $wanted == *" vllm "* ]]; then
  # Reuse the torch wheel pip already knows locally (find-links) instead of
  # downloading 190 MB; without one the Dockerfile falls back to TORCH_INDEX_URL.
  ctx=$work/vllm
  mkdir -p "$ctx/wheels"
  cp vllm/make_tiny_model.py "$ctx/"
  links=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
  for dir in $links; do
    dir=${dir#file://}
    for whl in "$dir"/torch-2.13.0+cpu-*.whl; do
      if [[ -f $whl ]]; then ln -f "$whl" "$ctx/wheels/" 2>/dev/null || cp "$whl" "$ctx/wheels/"; fi
    done
  done
  in_background build "$VLLM_CPU_IMAGE" "$ctx" -f vllm/cpu.Dockerfile
fi

failed=0
for pid in "${builds[@]}"; do
  wait "$pid" || failed=1
done
(( failed == 0 )) || exit 1

echo "total $((SECONDS - t0))s"
