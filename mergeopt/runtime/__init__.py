"""Runtime: torchrun ranks, resumable run state, atomic files, deterministic mode."""
