#!/usr/bin/env bash
# Download, on a machine with the package registry, the wheels benchmarks/gpu_session.sh installs on
# the GPU machine, which reaches no registry: what its image lacks (benchmarks/gpu_wheels.txt), for
# its Python (CPython 3.12, x86-64 manylinux), into .whl/ (ignored by git; about 10 MB).
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
grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$' | while read -r requirement; do
  # one at a time: pure-Python wheels are "any" and need no platform, binary ones need one
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
    "${platforms[@]}" -d "$dest" "$requirement"
done
ls -1 "$dest"
