# One image for both roles: `ef21 master ...` or `ef21 worker ...` (see docker-compose.yml).
# BASE: any image with Python >= 3.11 and pip (tests/test_compose_e2e.py builds on a local one: no registry there).
ARG BASE=python:3.11-slim
FROM ${BASE}

# MPLCONFIGDIR, NUMBA_CACHE_DIR: compose runs the containers as the invoking user's uid, which has no home in the
# image; matplotlib's settings and numba's compiled loops (ef21[fast]) are kept under /tmp instead (without a
# writable cache numba would compile them afresh in every process; ef21.compression.kernels.njit).
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ef21 ./ef21
COPY ef21_wire ./ef21_wire
COPY server ./server
COPY worker ./worker
# The [fast] extra (uvloop) lets master and workers take --event-loop uvloop (see docs/benchmarks/round-rate.md).
RUN pip install '.[fast]' && useradd --create-home --uid 10001 ef21
USER ef21
WORKDIR /home/ef21
# gRPC and the HTTP status endpoint of the master.
EXPOSE 50051 8080
ENTRYPOINT ["ef21"]
CMD ["--help"]
