"""Extraction: a model's layers over a stimulus set into an activation store."""
