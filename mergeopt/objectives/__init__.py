"""Objectives: dev sets, the chunked token loss, metrics, lm-eval terms, and the one utility they combine into."""
