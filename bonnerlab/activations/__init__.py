"""The activation store: the extraction job writes it (`store`), analysis reads it lazily
(`reader`). Imports no torch."""

from bonnerlab.activations.reader import (
    export_netcdf,
    flatten,
    open_activations,
    select_stimuli,
    store_info,
    stored_layers,
    to_numpy,
)
from bonnerlab.activations.store import finalize, verify

__all__ = [
    "export_netcdf",
    "finalize",
    "flatten",
    "open_activations",
    "select_stimuli",
    "store_info",
    "stored_layers",
    "to_numpy",
    "verify",
]
