#!/usr/bin/env bash
# Download, on a machine with the package registry, the wheels benchmarks/gpu_session.sh installs on
# the GPU machine, which reaches no registry: what its image lacks (benchmarks/gpu_wheels.txt), for
# its Python (CPython 3.12, x86-64 manylinux), into .whl/ (ignored by git; about 30 MB in all), and
# transformers with what it needs (benchmarks/gpu_wheels_transformers.txt) into .whl/transformers/.
#
#   bash benchmarks/gpu_wheels.sh [DIR]     # default .whl
#
# PYTHON_VERSION=3.11 fetches them for another Python (a rehearsal of the session on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
download() { # $1: a list of pins, $2: where their wheels go
  mkdir -p "$2"
  grep -v '^\s*#' "$1" | grep -v '^\s*$' | while read -r requirement; do
    # one at a time: pure-Python wheels are "any" and need no platform, binary ones need one
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
      --implementation cp "${platforms[@]}" -d "$2" "$requirement"
  done
}
download benchmarks/gpu_wheels.txt "$dest"
# transformers and its needs apart: gpu_session.sh keeps them only if transformers imports with them
download benchmarks/gpu_wheels_transformers.txt "$dest/transformers"
ls -1R "$dest"
