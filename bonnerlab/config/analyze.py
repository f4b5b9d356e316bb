"""The analysis job's config: which store, which layers, which analyses. Imports no torch.

Layers are named as extraction names them (config/extract.py's grammar): exact names or patterns
(`blocks.*`, `features.**`) matched against the layers the store holds, in the store's order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bonnerlab.config.core import check, check_choice
from bonnerlab.config.extract import is_pattern, layer_matches
from bonnerlab.errors import ConfigError

RDM_METRICS = ("correlation", "euclidean", "cosine", "none")
RSA_METHODS = ("spearman", "kendall", "pearson")
DEFAULT_ALPHAS = [10.0**k for k in range(-2, 7)]  # np.logspace(-2, 6, 9), without numpy


@dataclass
class AnalyzeConfig:
    """Analyse layers of an activation store: RDMs, RSA, CKA, spectra, encoding models."""

    # activation store (a .zarr folder written by extract); the default is what a plain
    # `python jobs/extract.py` writes
    store: str = "activations/mnist_cnn-digits.zarr"
    # layers by name or pattern (* within one dotted part, ** across), as extract names them;
    # empty = every layer of the store
    layers: list[str] = field(default_factory=list)
    # representational dissimilarity matrix: correlation, euclidean, cosine, or none
    rdm: str = "correlation"
    # PCA eigenvalues, effective dimensionality (participation ratio) and power-law exponent
    spectrum: bool = True
    # targets to fit a ridge encoding model to: .csv/.tsv (rows keyed by stimulus_id), .npy (with
    # an ids file), or netCDF/zarr (presentation x neuroid); empty = no encoding
    encode: str = ""
    # compare each layer's RDM with another one: an activation store (with rsa_layer) or an RDM
    # file; empty = no RSA
    rsa: str = ""
    # the layer of the rsa store; empty = the same name as the layer analysed
    rsa_layer: str = ""
    # how RDMs are compared: spearman, kendall (tau-a) or pearson
    rsa_method: str = "spearman"
    # linear CKA of each layer against a layer of another store (over the shared stimuli);
    # empty = no CKA
    cka: str = ""
    # the layer of the cka store; empty = the same name as the layer analysed
    cka_layer: str = ""
    # debiased (unbiased HSIC) CKA instead of the plain estimate
    cka_debiased: bool = False
    # encoding: cross-validation folds
    cv: int = 5
    # encoding: ridge penalties, one chosen per target inside each training fold
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    # encoding: a presentation coordinate whose values are kept within one fold (image category,
    # repeat); empty = plain folds
    groups: str = ""
    # RSA: bootstrap resamples of the stimuli for a confidence interval (0 = none)
    bootstrap: int = 0
    # seed of the folds and the bootstrap
    seed: int = 0
    # auto (cuda when available), cpu, cuda, cuda:1, ...
    device: str = "auto"
    # memory the stream may hold, in GB: the Gram (12 n^2 bytes), feature panels, read buffers
    memory_gb: float = 1.0
    # analysis folder; empty = analysis/<store name>
    output: str = ""
    # keep the Gram matrices beside the store (keyed by its identity) so reruns read it once
    cache: bool = True
    # show progress bars over the streamed passes
    progress: bool = True

    def __post_init__(self) -> None:
        check(bool(self.store), "store must name an activation store (a .zarr folder)")
        check(len(set(self.layers)) == len(self.layers), f"layers has duplicates: {self.layers}")
        check_choice("rdm", self.rdm, RDM_METRICS)
        check_choice("rsa_method", self.rsa_method, RSA_METHODS)
        check(self.cv >= 2, f"cv must be >= 2 folds; got {self.cv}")
        check(bool(self.alphas), "alphas must list at least one ridge penalty")
        bad = [a for a in self.alphas if not a > 0]
        check(not bad, f"alphas must be > 0; got {bad[0] if bad else ''}")
        check(self.bootstrap >= 0, f"bootstrap must be >= 0; got {self.bootstrap}")
        check(self.memory_gb > 0, f"memory_gb must be > 0; got {self.memory_gb}")
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be auto, cpu or cuda[:N]; got {self.device!r}",
        )
        check(
            not self.rsa or self.rdm != "none",
            "rsa compares RDMs: give --rdm correlation, euclidean or cosine",
        )
        check(not self.rsa_layer or bool(self.rsa), "rsa_layer goes with rsa (the other store)")
        check(not self.cka_layer or bool(self.cka), "cka_layer goes with cka (the other store)")
        check(not self.groups or bool(self.encode), "groups goes with encode (the targets)")
        check(
            self.rdm != "none" or self.spectrum or bool(self.encode) or bool(self.cka),
            "nothing to compute: ask for an rdm, spectrum, encode or cka",
        )


def expand_layers(patterns: list[str], stored: list[str], store: str = "the store") -> list[str]:
    """Names and patterns -> the store's layers they name, in the store's order; empty = all.
    A name or pattern that matches nothing is one line naming what the store holds."""
    if not patterns:
        return list(stored)
    for pattern in patterns:
        if not any(n == pattern or layer_matches(pattern, n) for n in stored):
            kind = "pattern" if is_pattern(pattern) else "layer"
            raise ConfigError(
                f"{kind} {pattern!r} is not in {store}; it holds: {', '.join(stored[:8])}"
                + (" ..." if len(stored) > 8 else "")
            )
    return [n for n in stored if any(n == p or layer_matches(p, n) for p in patterns)]


def default_output(cfg: AnalyzeConfig) -> str:
    """analysis/<store name without .zarr>: every task of a per-layer array names the same one."""
    return cfg.output or str(
        Path("analysis") / Path(cfg.store.rstrip("/")).name.removesuffix(".zarr")
    )
