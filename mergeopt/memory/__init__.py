"""Memory: the per-rank memory plan (``mergeopt plan``), device maps over local GPUs, activation checkpointing.

The plan is computed from config files and safetensors headers only, before any weight is read.
"""
