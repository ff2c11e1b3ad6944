"""Reporting: what a person reads after a run (report.md, plots, the closing summary) and the analysis API."""
