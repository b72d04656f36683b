# fusionrec: one image for every component (consume, embed-workers, learner, trending, serve).
# CPU build by default; for GPU embedding workers build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (any torch 2.13.0 wheel index) and run with a GPU reservation (see deploy/compose.yaml).
FROM python:3.11-slim-bookworm AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fusionrec
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fusionrec ./fusionrec
COPY streams ./streams
COPY models ./models
COPY online ./online
RUN /opt/fusionrec/bin/pip install --extra-index-url "${TORCH_INDEX}" torch==2.13.0 \
 && /opt/fusionrec/bin/pip install . \
 && /opt/fusionrec/bin/pip check

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /var/lib/fusionrec --create-home fusionrec
COPY --from=build /opt/fusionrec /opt/fusionrec
ENV PATH=/opt/fusionrec/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    FUSIONREC_RUN_DIR=/var/lib/fusionrec \
    FUSIONREC_METRICS_HOST=0.0.0.0 \
    FUSIONREC_SERVE_HOST=0.0.0.0
USER fusionrec
WORKDIR /var/lib/fusionrec
# 8080 reader API (+ /metrics), 9464 consumer, 9470 embed pool, 9472 learner, 9473 trending
EXPOSE 8080 9464 9470 9472 9473
ENTRYPOINT ["fusionrec"]
CMD ["--help"]
