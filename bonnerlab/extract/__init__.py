"""Extraction: a model's layers over a stimulus set into an activation store.
`from bonnerlab.extract import extract, list_layers` (a model's layers; a store's are
`bonnerlab.activations.stored_layers`)."""

from bonnerlab.extract.run import extract, list_layers

__all__ = ["extract", "list_layers"]
