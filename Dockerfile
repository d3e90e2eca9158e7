# modserve image. GPU (default): the vLLM GPU build, `pip install modserve[vllm]`.
# CPU: --build-arg VARIANT=cpu installs CPU torch first (as `make setup` does), then modserve,
# and serves with the native backend.
#   docker build -t modserve:gpu .
#   docker build --build-arg VARIANT=cpu -t modserve:cpu .
#   docker run --gpus all -p 8000:8000 -v $PWD/models:/models:ro -v $PWD/packs:/packs:ro \
#     -v $PWD/configs/llama31-8b-mgsm.yaml:/etc/modserve/serve.yaml:ro modserve:gpu
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG VARIANT=gpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODSERVE_CACHE=/var/cache/modserve \
    MODSERVE_SERVER_HOST=0.0.0.0 \
    MODSERVE_SERVER_PORT=8000

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin modserve \
    && mkdir -p /var/cache/modserve /etc/modserve \
    && chown modserve /var/cache/modserve

WORKDIR /opt/modserve

# Dependencies first, from pyproject.toml alone, so editing the source keeps this layer cached.
# (DL3013: these install this source tree; versions come from pyproject.toml.)
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir modserve && touch modserve/__init__.py \
    && if [ "$VARIANT" = "cpu" ]; then \
         pip install torch==2.13.0 && pip install . ; \
       else \
         pip install ".[vllm]" ; \
       fi \
    && pip uninstall -y modserve

COPY modserve ./modserve
COPY configs ./configs
# hadolint ignore=DL3013
RUN pip install --no-deps . && cp configs/demo.yaml /etc/modserve/serve.yaml

USER 10001
EXPOSE 8000
VOLUME ["/models", "/packs", "/var/cache/modserve"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["modserve", "serve"]
CMD ["--config", "/etc/modserve/serve.yaml"]
