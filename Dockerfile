# zencoder-collector: the daemon in a slim image, running as a non-root user.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ZENCODER_COLLECTOR_CONFIG=/etc/zencoder-collector/config.yaml

WORKDIR /src
COPY pyproject.toml README.md ./
COPY collector ./collector
COPY plugins ./plugins
COPY config ./config
# DL3013: this installs the project itself from the copied source; its dependencies are ranged in
# pyproject.toml on purpose (a library-style daemon), not pinned here.
# hadolint ignore=DL3013
RUN pip install ".[all]" \
    && groupadd --system --gid 10001 collector \
    && useradd --system --uid 10001 --gid collector --home-dir /var/lib/zencoder-collector --create-home collector \
    && mkdir -p /etc/zencoder-collector \
    && cp config/example.yaml /etc/zencoder-collector/config.yaml

USER 10001:10001
WORKDIR /var/lib/zencoder-collector
VOLUME ["/var/lib/zencoder-collector"]
EXPOSE 9464

# /healthz answers 200 while the process is alive; the ops server must listen on 0.0.0.0:9464 in
# the container (server.listen in the config).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["zencoder-collector"]
CMD ["run"]
