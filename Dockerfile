# moemesh on NVIDIA GPUs: CUDA 13 runtime, torch for CUDA 13, moemesh[server] with the CUDA 13 UCX (ucxx-cu13)
# and cupy (cupy-cuda13x) wheels. `make image` builds it as moemesh:<version>; run any role with
#   docker run --gpus all moemesh:0.1.0 serve decode --registry GATEWAY:50051 ...
# (the Helm chart in helm/moemesh does that for every role). Without arguments it serves the demo mesh.

# --- the wheel, built from this tree ---------------------------------------------------------------------
FROM python:3.12-slim-bookworm AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps -w /dist .

# --- the runtime -----------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH_VERSION=2.11.0
# Triton compiles a small launcher with the system C compiler against Python's headers at first use.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/moemesh \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin moemesh
ENV PATH=/opt/moemesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TRITON_CACHE_DIR=/tmp/triton
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY --from=wheel /dist/ /tmp/dist/
# the local wheel; pyproject.toml bounds its dependencies
# hadolint ignore=DL3013
RUN set -- /tmp/dist/moemesh-*.whl \
    && pip install --no-cache-dir "$1[server,cuda13]" \
    && rm -rf /tmp/dist \
    && moemesh --help > /dev/null
USER 10001
EXPOSE 50051 8000
ENTRYPOINT ["moemesh"]
CMD ["up", "--model", "demo", "--device", "cuda", "--host", "0.0.0.0"]
