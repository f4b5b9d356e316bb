"""Analysis straight from an activation store: a layer's Gram streamed once (and cached beside
the store), then RDMs, RSA, CKA, spectra and encoding models from it. Knows nothing of how the
activations were made: it reads stores through `bonnerlab.activations` only."""

from bonnerlab.analysis.encoding import encode, kernel_ridge_cv
from bonnerlab.analysis.gram import Gram, layer_gram
from bonnerlab.analysis.similarity import cka, rdm, rsa, spectrum
from bonnerlab.analysis.targets import load_targets

__all__ = [
    "Gram",
    "cka",
    "encode",
    "kernel_ridge_cv",
    "layer_gram",
    "load_targets",
    "rdm",
    "rsa",
    "spectrum",
]
