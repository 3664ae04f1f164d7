"""Experiments: config, run directory, resume, MLflow lineage, export, reports."""
