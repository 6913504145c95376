#!/usr/bin/env bash
# The wheels bench/run_gpu.sh needs and a bare GPU image lacks, downloaded here (where pip reaches PyPI)
# at the versions of this checkout's .venv, for CPython 3.12 on x86-64:
#   bash bench/gpu_wheels.sh DIR [core] [serve] [fanout] [test]        (default: all four)
# core: the compute core's pydantic; serve: the server and the openai client; fanout: dask and distributed;
# test: pytest, for the tests that need CUDA (`python3 -m pytest -p no:cacheprovider tests/test_engine.py ...`).
# On the GPU machine `WHEELS=DIR bash bench/run_gpu.sh ...` installs them (no index, no dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?a folder for the wheels}; shift
core="pydantic pydantic_core annotated-types typing-inspection typing_extensions"
serve="fastapi starlette uvicorn anyio sniffio idna openai httpx2 httpcore2 truststore h2 hpack hyperframe jiter
       distro annotated-doc opentelemetry-api"
fanout="dask distributed partd locket tblib tornado zict"
test="pytest pluggy iniconfig packaging pygments pytest-timeout"
pins=()
for group in ${*:-core serve fanout test}; do
  [ -n "${!group:-}" ] || { echo "unknown group: $group (core, serve, fanout, test)"; exit 2; }
  for name in ${!group}; do
    version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
    [ -n "$version" ] || { echo "$name is not installed in .venv (make install)"; exit 2; }
    pins+=("$name==$version")
  done
done
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" "${pins[@]}"
ls "$DIR"
