"""Whole jobs built from the pipeline and the formats: what the CLI commands run."""
