# One image for every Constellation service (dispatch, classifier, ranking, fusion, scaler, registry):
# the Helm chart runs `python -m services.<name>.main` in it. Build from the repository root:
#   docker build -f deploy/docker/services.Dockerfile -t ghcr.io/constellation/constellation:0.1.0 .
# The dependencies are the pinned ones of requirements.txt/constraints.txt (CPU torch, for the
# classifier's encoder and the rankers); nothing is downloaded at run time.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements.txt -c constraints.txt \
 && /opt/venv/bin/pip install --no-deps -r requirements-nodeps.txt
COPY protos/ protos/
COPY libs/ libs/
COPY services/ services/
# The generated stubs are built here, never committed.
RUN site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && /opt/venv/bin/python -m grpc_tools.protoc -I protos -I "$site" \
      --python_out=libs/constellation --grpc_python_out=libs/constellation protos/constellation/v1/*.proto \
 && /opt/venv/bin/pip install --no-deps --no-build-isolation .

FROM python:3.11-slim-bookworm
RUN groupadd --gid 10001 constellation && useradd --uid 10001 --gid 10001 --no-create-home constellation
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CONSTELLATION_CACHE_DIR=/var/cache/constellation \
    HOME=/tmp
WORKDIR /app
# The root filesystem is read-only in the cluster: /tmp and the cache are emptyDir volumes there.
USER 10001:10001
CMD ["python", "-m", "services.dispatch.main"]
