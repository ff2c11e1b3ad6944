#!/usr/bin/env bash
# Ranking transfer across model sizes on the tiny world, end to end: train the same 20 mixtures
# (step-1/3 lattice over 4 domains, experts at the vertices) at two model sizes, the tiny world's
# 64-wide 2-layer model and tiny-large's 128-wide 4-layer one (8x the parameters, same data), then
# ask how the small size's ranking of mixtures carries to the large size.
# Training is resumable and skipped when grid.csv exists (about 2 + 5 minutes on 2 CPU cores).
# Writes benchmarks/results/transfer_tiny/transfer_report.{md,json} and copies both grids to
# tests/data/ (the tests rank them again without training).
set -euo pipefail
PYTHON="${PYTHON:-python}"
RESULTS=benchmarks/results/transfer_tiny
"$PYTHON" -m mergeopt.train recipes/tiny_grid.yaml --quiet
"$PYTHON" -m mergeopt.train recipes/tiny_grid_large.yaml --quiet
cp runs/tiny-grid/grid.csv tests/data/tiny_grid/grid.csv
cp runs/tiny-grid-large/grid.csv tests/data/tiny_grid_large/grid.csv
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
"$PYTHON" -m mergeopt.transfer runs/tiny-grid/grid.csv runs/tiny-grid-large/grid.csv \
    --metrics loss_arith,loss_reverse,loss_brackets,loss_markov --seed 0 --out "$SCRATCH"
mkdir -p "$RESULTS"
cp "$SCRATCH/transfer_report.md" "$SCRATCH/transfer_report.json" "$RESULTS/"
