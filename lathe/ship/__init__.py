"""Shipping: the package contract (one home for its schema, file names and stamp keys), decision
threshold and gates, lineage, model card, the build step, archives and signing."""
