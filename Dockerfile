# fedmoe: one image for both roles, chosen by the command:
#   docker run fedmoe:latest coordinator --listen 0.0.0.0:50051 ...
#   docker run fedmoe:latest peer --coordinator HOST:50051 ...
#
# Build arguments:
#   BASE_IMAGE  a Debian-based image with python3 (3.11) and its venv module.
#               Default: the public python:3.11-slim. Without registry access,
#               scripts/build_base_image.sh makes fedmoe-base:bookworm locally.
#   WHEELHOUSE  optional directory in the build context holding wheels of all
#               runtime dependencies (scripts/make_wheelhouse.sh, .wheelhouse/).
#               Given: pip installs with --no-index from it (no network needed,
#               build with --network none). Empty: pip installs from PyPI.
#
# Written for the classic builder as well as BuildKit (docker-compose v1 and
# Debian's docker 20.10 use the classic one): no RUN --mount, no heredocs.
#
# Layers: the dependency install (torch etc., several GB) depends only on
# pyproject.toml and the wheelhouse; the project source is copied afterwards,
# so code changes rebuild only the small last layers.

ARG BASE_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
# lets scripts/make_image.sh prune dangling images of this build only
LABEL org.fedmoe.build=1
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# --------------------------------------------------------------------------
# Runtime dependencies in a venv (Debian's python3 is "externally managed").
FROM base AS deps
ARG WHEELHOUSE=
RUN python3 -m venv /opt/venv
COPY pyproject.toml /tmp/build/pyproject.toml
# With WHEELHOUSE empty this copies pyproject.toml again (harmless): COPY needs
# some source, and an ARG cannot make the instruction conditional.
COPY ${WHEELHOUSE:-pyproject.toml} /tmp/build/wheels/
RUN set -eu; \
    python3 -c 'import tomllib; p = tomllib.load(open("/tmp/build/pyproject.toml", "rb")); print("\n".join(p["project"]["dependencies"] + p.get("build-system", {}).get("requires", [])))' \
        > /tmp/build/requirements.txt; \
    echo "--- requirements (pyproject.toml dependencies + build-system.requires):"; \
    cat /tmp/build/requirements.txt; \
    if [ -n "${WHEELHOUSE}" ]; then \
        ls /tmp/build/wheels/*.whl >/dev/null 2>&1 \
            || { echo "WHEELHOUSE=${WHEELHOUSE} holds no wheels" >&2; exit 1; }; \
        pip install --no-index --find-links /tmp/build/wheels -r /tmp/build/requirements.txt; \
    else \
        pip install -r /tmp/build/requirements.txt; \
    fi; \
    rm -rf /tmp/build; \
    python -c "import torch, torchvision, grpc, grpc_health.v1.health_pb2_grpc, google.protobuf, numpy, sklearn; print('deps ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'grpcio', grpc.__version__, 'numpy', numpy.__version__, 'sklearn', sklearn.__version__)"

# --------------------------------------------------------------------------
# Build the project's own wheel (needs only setuptools/wheel from the venv).
FROM deps AS build
COPY . /src
RUN pip wheel --no-deps --no-build-isolation --no-index --wheel-dir /tmp/dist /src

# --------------------------------------------------------------------------
FROM base AS runtime
# A non-root user, the default. Compose starts the container as root and the
# entrypoint drops to the clone owner's uid (so that files written to bind
# mounts belong to the host user): HOME, /runs and /data are therefore
# writable by any uid.
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/fedmoe --shell /bin/sh fedmoe \
 && mkdir -p /runs /data \
 && chmod 1777 /home/fedmoe /runs /data
ENV HOME=/home/fedmoe
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /tmp/dist/ /tmp/dist/
RUN pip install --no-deps --no-index /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && command -v fedmoe
# Runs `fedmoe "$@"`; started as root (docker-compose.yml) it first hands the run directory to
# the clone's owner and drops to that uid with setpriv (util-linux). See docker/entrypoint.sh.
COPY docker/entrypoint.sh /usr/local/bin/fedmoe-entrypoint
RUN chmod 0755 /usr/local/bin/fedmoe-entrypoint && command -v setpriv
USER 1000:1000
WORKDIR /home/fedmoe
# 50051: coordinator, 50052: peer (by convention; both are set by flags)
EXPOSE 50051 50052
ENTRYPOINT ["fedmoe-entrypoint"]
CMD ["--help"]
