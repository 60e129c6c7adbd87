# zencoder-collector: the daemon in a slim image, running as a non-root user.
#
# Without arguments the container runs the demo (the built-in API simulator, a 30-day collection
# into SQLite and CSV under /var/lib/zencoder-collector/demo-output, a report) and exits 0. The
# daemon: `docker run ... -v ./config.yaml:/etc/zencoder-collector/config.yaml:ro IMAGE run`
# (deploy/docker-compose.yml and deploy/kubernetes/ do exactly that; see docs/deploy.md).
#
# The base image is pinned by digest (python:3.11.16-slim, the multi-arch index), so a rebuild
# gets the same OS and Python until someone decides otherwise. To bump it, resolve the tag's
# current digest and replace the line below (Renovate or Dependabot can do it too):
#     docker buildx imagetools inspect python:3.11-slim --format '{{json .Manifest.Digest}}'
#     # or: docker pull python:3.11-slim && docker inspect --format '{{index .RepoDigests 0}}' python:3.11-slim
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# ZENCODER_COLLECTOR_OPS_PORT is the one setting of the ops port: the configs under deploy/ listen
# on 0.0.0.0:${ZENCODER_COLLECTOR_OPS_PORT}, and EXPOSE and HEALTHCHECK below read it too.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ZENCODER_COLLECTOR_CONFIG=/etc/zencoder-collector/config.yaml \
    ZENCODER_COLLECTOR_OPS_PORT=9464

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY collector ./collector
COPY plugins ./plugins
# DL3013: this installs the project itself from the copied source; its dependencies are ranged in
# pyproject.toml on purpose (a library-style daemon), not pinned here.
# hadolint ignore=DL3013
RUN pip install ".[all]" \
    && groupadd --system --gid 10001 collector \
    && useradd --system --uid 10001 --gid collector --home-dir /var/lib/zencoder-collector --create-home collector \
    && mkdir -p /etc/zencoder-collector

USER 10001:10001
WORKDIR /var/lib/zencoder-collector
VOLUME ["/var/lib/zencoder-collector"]
EXPOSE ${ZENCODER_COLLECTOR_OPS_PORT}

# /healthz answers 200 while the daemon's event loop is alive (the demo has no ops server; it
# exits within the start period).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ['ZENCODER_COLLECTOR_OPS_PORT']; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["zencoder-collector"]
CMD ["demo"]
