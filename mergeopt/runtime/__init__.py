"""Runtime: torchrun ranks, resumable run state, atomic files and exact CSV reads, deterministic mode."""
