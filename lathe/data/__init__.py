"""Data: the raw contract and its importers (raw), ingest and splits (ingest), the data gate (validate)."""
