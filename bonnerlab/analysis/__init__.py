"""Analysis straight from an activation store: a layer's Gram streamed once (and cached beside
the store), then RDMs, RSA, CKA, spectra and encoding models from it. Knows nothing of how the
activations were made: it reads stores through `bonnerlab.activations` only."""

from bonnerlab.analysis.gram import Gram, layer_gram
from bonnerlab.analysis.similarity import cka, rdm, rsa, spectrum

__all__ = ["Gram", "cka", "layer_gram", "rdm", "rsa", "spectrum"]
