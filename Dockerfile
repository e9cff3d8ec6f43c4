# Container image of balena-registry-proxy: `docker build -t balena-registry-proxy .`
#
# Port: the proxy runs as an unprivileged user (uid 10001) and listens on 8080 inside the
# container; publish it as 80 outside (docker-compose.yml maps "80:8080", the Kubernetes Service
# maps port 80 to 8080). Binding 80 itself as non-root would need CAP_NET_BIND_SERVICE, e.g. a
# file capability on the interpreter (then every Python program in the image has it, and
# Kubernetes' "capabilities: drop: [ALL]" and no-new-privileges make it void or refuse to
# start), or the net.ipv4.ip_unprivileged_port_start sysctl, which not every runtime sets. Set
# the port with PROXY_PORT (not --port), so that the HEALTHCHECK follows it.
#
# The base image is pinned to a Python patch release on Debian bookworm, the Python that CI
# tests with (3.11); both stages use the same one. Bump both FROM lines together.
#
# Every Python package comes from a hashed lock in requirements/ (`make lock` writes them from
# pyproject.toml), so a rebuild installs the same files: build.txt for the build backend,
# runtime.txt for the dependencies. Their hashes cover the amd64 and arm64 wheels alike.

# Stage 1: build the wheel of this project (pure Python; its dependencies come as wheels below).
FROM python:3.11.13-slim-bookworm AS build
WORKDIR /src
COPY requirements/build.txt requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY src/ src/
# Built with the locked setuptools just installed, not one fetched for an isolated build.
RUN pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels .

# Stage 2: the runtime image: the locked dependencies and the wheel, no build tools, no sources.
FROM python:3.11.13-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROXY_PORT=8080
COPY requirements/runtime.txt /tmp/requirements.txt
COPY --from=build /wheels/ /tmp/wheels/
# Last, the folder for the cache (CACHE_DIR, off unless set), owned by the proxy's user: a new
# named volume mounted there (docker-compose.yml) takes the folder's owner.
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels /tmp/requirements.txt \
    && groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin proxy \
    && install -d -o 10001 -g 10001 -m 0750 /var/cache/registry-proxy
# Numeric, so that Kubernetes' runAsNonRoot can check it without the image's /etc/passwd.
USER 10001:10001
EXPOSE 8080
# GET /ping answers "pong" without asking upstream. No curl in the image: Python's urllib.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/ping' % os.environ.get('PROXY_PORT', '8080'); sys.exit(urllib.request.urlopen(url, timeout=4).read() != b'pong')"]
# On SIGTERM the proxy lets in-flight requests finish for SHUTDOWN_TIMEOUT seconds (default 30),
# then exits 0: give `docker stop` (-t), compose (stop_grace_period) or Kubernetes
# (terminationGracePeriodSeconds) more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["balena-registry-proxy"]
