"""Prefect flows that run the dvc.yaml stages. Prefect orchestrates, DVC decides."""
