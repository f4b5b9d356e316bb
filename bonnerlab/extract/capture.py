"""Capture: forward hooks on named modules, element selection, pooling, random projection.

Layer names (`blocks.3.attn:0`, patterns like `blocks.*`) are parsed by the grammar in
`bonnerlab.config.extract`; here they are expanded against a model, in model order.

The hook reduces the output at once (element, channel subset, pooling, projection) and copies it
into a preallocated CPU buffer (`Capture._hand_off`, the one place a capture leaves the device),
so an in-place op that follows (`ReLU(inplace=True)` after a BatchNorm) cannot change what was
captured. After the last requested layer fires, its hook raises `StopForward`: the rest of the
network never runs.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bonnerlab.config.extract import OUTPUT, is_pattern, layer_matches, split_layer
from bonnerlab.errors import UserError


class StopForward(Exception):
    """Raised by the last requested layer's hook to skip the rest of the network."""


# ----------------------------------------------------------------------------- names


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module in model order, plus `output` (the whole model) when free."""
    modules = {n: m for n, m in model.named_modules() if n}
    if OUTPUT not in modules:
        modules[OUTPUT] = model
    return modules


def expand_layers(model: nn.Module, layers: list[str]) -> list[str]:
    """Patterns replaced by the matching module names (model order); unknown names are errors
    listing the closest valid ones."""
    modules = named_modules(model)
    out: list[str] = []
    for layer in layers:
        module, sep, element = layer.partition(":")
        if is_pattern(layer):
            matches = [
                f"{n}{sep}{element}"
                for n in modules
                if n != OUTPUT and layer_matches(layer, f"{n}{sep}{element}")
            ]
            if not matches:
                raise UserError(f"layer pattern {layer!r} matches no module (see --list_layers)")
            out += [m for m in matches if m not in out]
        elif module in modules:
            if layer not in out:
                out.append(layer)
        else:
            valid = [n for n in modules if n]
            close = difflib.get_close_matches(module, valid, n=5, cutoff=0.4)
            hint = ", ".join(close) if close else ", ".join(valid[:8]) + ", ..."
            raise UserError(f"unknown layer {module!r}; closest: {hint} (see --list_layers)")
    return out


def resolve_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """layer name (element included) -> module that produces it."""
    modules = named_modules(model)
    return {name: modules[split_layer(name)[0]] for name in expand_layers(model, names)}


# ----------------------------------------------------------------------------- outputs


def structure(out: Any) -> Any:
    """The shape of an output: a tuple for a tensor, a list/dict of those for containers."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):  # ModelOutput is an OrderedDict of its non-None fields
        return {k: structure(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return [structure(v) for v in out]
    return type(out).__name__


def select(out: Any, element: int | str | None, name: str) -> Any:
    """The element of an output a layer name asks for; a one-line error when it does not exist."""
    if element is None:
        return out
    if isinstance(out, dict):
        if isinstance(element, int):
            values = list(out.values())
            if -len(values) <= element < len(values):
                return values[element]
        elif element in out:
            return out[element]
        raise UserError(
            f"layer {name}: the output has no element {element!r}; keys: {', '.join(map(str, out))}"
        )
    if isinstance(out, list | tuple):
        if isinstance(element, int) and -len(out) <= element < len(out):
            return out[element]
        raise UserError(
            f"layer {name}: the output is a sequence of {len(out)}; use an index 0..{len(out) - 1}"
        )
    raise UserError(
        f"layer {name}: the output is a {type(out).__name__}, which has no element {element!r}"
    )


def describe(struct: Any) -> str:
    if isinstance(struct, tuple):
        return str(list(struct))
    if isinstance(struct, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in struct.items()) + "}"
    if isinstance(struct, list):
        return "(" + ", ".join(f"{i}: {describe(v)}" for i, v in enumerate(struct)) + ")"
    return str(struct)


def probe(
    model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor
) -> dict[str, tuple[Any, int]]:
    """module name -> (structure of its last call's output, calls per forward) for one batch."""
    seen: dict[str, Any] = {}
    calls: dict[str, int] = {}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1
            seen[name] = structure(out)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (seen[n], calls[n]) for n in seen}


# ----------------------------------------------------------------------------- reduction


@dataclass
class SparseProjection:
    """A seeded sparse random projection in_features -> k (Li, Hastie & Church 2006; the
    `density = 1/sqrt(in_features)` of scikit-learn's SparseRandomProjection): each entry is
    +-sqrt(1/density)/sqrt(k) with probability density/2 each, else 0. The same seed gives the
    same matrix in every shard and restart."""

    in_features: int
    k: int
    seed: int
    matrix: torch.Tensor | None = field(default=None, repr=False)  # (k, in_features) CSR

    @property
    def density(self) -> float:
        return 1.0 / np.sqrt(self.in_features)

    def build(self, device: torch.device) -> SparseProjection:
        rng = np.random.default_rng(self.seed)
        d, k = self.in_features, self.k
        counts = rng.binomial(d, self.density, size=k)
        crow = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        cols = (
            np.concatenate([np.sort(rng.choice(d, n, replace=False)) for n in counts])
            if k
            else np.zeros(0)
        )
        scale = np.sqrt(1.0 / self.density) / np.sqrt(k)
        values = np.where(rng.random(crow[-1]) < 0.5, -scale, scale).astype(np.float32)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.matrix = torch.sparse_csr_tensor(
                torch.from_numpy(crow),
                torch.from_numpy(cols.astype(np.int64)),
                torch.from_numpy(values),
                size=(k, d),
                check_invariants=True,
            ).to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert self.matrix is not None
        flat = x.flatten(1)
        if self.matrix.device != flat.device:
            self.matrix = self.matrix.to(flat.device)
        # (k, d) @ (d, batch) -> (k, batch); float32: a projection of float16 sums too many terms
        return torch.sparse.mm(self.matrix, flat.float().t()).t()

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "srp",
            "k": self.k,
            "seed": self.seed,
            "in_features": self.in_features,
            "density": self.density,
        }


@dataclass
class LayerPlan:
    name: str
    channels: list[int] | None
    pooling: str
    calls: int = 1  # capture the last call when a module runs more than once per forward
    element: int | str | None = None
    projection: SparseProjection | None = None
    index: torch.Tensor | None = None

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        """Channel subset, pooling, projection; may return a view of `out` (none of them)."""
        t = out.detach()
        tokens = t.ndim == 3  # (batch, token, dim): channels are the last dim, pooling over tokens
        if self.channels is not None:
            if self.index is None or self.index.device != t.device:
                self.index = torch.tensor(self.channels, device=t.device)
            t = t.index_select(2 if tokens else 1, self.index)
        if self.pooling == "cls":
            t = t[:, 0]
        elif self.pooling == "mean" or (self.pooling == "avg" and tokens):
            t = t.mean(dim=1)
        elif self.pooling == "max" and tokens:
            t = t.amax(dim=1)
        elif self.pooling == "avg":
            t = t.mean(dim=tuple(range(2, t.ndim)))
        elif self.pooling == "max":
            t = t.amax(dim=tuple(range(2, t.ndim)))
        elif self.pooling == "flatten":
            t = t.flatten(1)
        if self.projection is not None:
            t = self.projection(t)
        return t


def check_plan(name: str, shape: tuple[int, ...], channels: list[int] | None, pooling: str) -> None:
    """One-line errors for options that do not fit the layer's output shape."""
    tokens = len(shape) == 3
    if channels is not None:
        dim = 2 if tokens else 1
        if len(shape) <= dim:
            raise UserError(f"layer {name} outputs {list(shape)}: it has no channels to select")
        if max(channels) >= shape[dim]:
            raise UserError(
                f"channel {max(channels)} is out of range for layer {name}, "
                f"which has {shape[dim]} channels (0-{shape[dim] - 1})"
            )
    if pooling in ("avg", "max") and len(shape) < 3:
        raise UserError(
            f"pooling {pooling} needs spatial dims or tokens but layer {name} outputs {list(shape)}"
        )
    if pooling in ("cls", "mean") and not tokens:
        raise UserError(
            f"pooling {pooling} needs token outputs (batch, tokens, dim) "
            f"but layer {name} outputs {list(shape)}"
        )


def feature_dims(ndim: int, pooling: str, projected: bool = False) -> tuple[str, ...]:
    """Names of the feature dims of a layer output with `ndim` dims (batch included)."""
    if projected or pooling == "flatten" or ndim == 2:
        return ("neuroid",)
    if ndim == 3:
        return ("neuroid",) if pooling != "none" else ("token", "neuroid")
    if pooling in ("avg", "max"):
        return ("channel",)
    return {4: ("channel", "y", "x"), 5: ("channel", "t", "y", "x")}.get(
        ndim, ("channel", *(f"dim_{i}" for i in range(2, ndim)))
    )


# ----------------------------------------------------------------------------- capture


class Capture:
    """Forward hooks that reduce and copy the requested layers' outputs; a context manager.

    Each capture is copied into a CPU buffer inside the hook, so an in-place op that follows
    cannot change it. Pinned buffers (CUDA) are `slots` fixed ones reused round-robin (pinning is
    costly). Plain CPU buffers are allocated per batch and freed as soon as the writer has written
    them: a fixed slot would stay allocated through the next batch's first layers, which are the
    forward pass's own peak (ResNet-50's layer1 at 56x56), and add a whole batch of captures to
    it (layer2+layer3 at batch 32: 77 MB, +6% peak RSS); a fresh one costs a page fault per 4 kB
    written once, well under 1 ms per image.
    The caller must not reuse a slot while its previous contents are still being written:
    `before_first_copy` (e.g. the writer's `acquire`) is called when a forward pass is about to
    fill its slot, i.e. at the first requested layer, not before the pass starts. So one slot
    still overlaps writing batch N with batch N+1's layers before the first captured one.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        plans: dict[str, LayerPlan],
        dtype: torch.dtype,
        stop_early: bool = True,
        slots: int = 1,
        pin_memory: bool = False,
        before_first_copy: Any = None,
    ):
        self.modules, self.plans, self.dtype, self.stop_early = modules, plans, dtype, stop_early
        self.n_slots, self.pin_memory = slots, pin_memory
        self.buffers: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles: list[Any] = []
        self.slot = 0
        self.before_first_copy = before_first_copy

    def _dest(self, name: str, t: torch.Tensor) -> torch.Tensor:
        shape = tuple(t.shape)
        if not self.pin_memory:
            return torch.empty(shape, dtype=self.dtype)  # this batch's own, see the class doc
        bufs = self.buffers.get(name)
        if bufs is None or bufs[0].shape[0] < shape[0] or bufs[0].shape[1:] != shape[1:]:
            bufs = [
                torch.empty(shape, dtype=self.dtype, pin_memory=self.pin_memory)
                for _ in range(self.n_slots)
            ]
            self.buffers[name] = bufs
        return bufs[self.slot][: shape[0]]

    def _hand_off(self, name: str, t: torch.Tensor) -> None:
        """Copy a reduced capture off the device into this batch's slot buffer.

        On CUDA the copy is queued on the current stream, before any later in-place op on the
        layer's output; `run` waits for the queued copies before handing the slot to the writer.
        """
        if not self.outputs and self.before_first_copy is not None:
            self.before_first_copy()  # e.g. wait until the writer is done with this slot
        dest = self._dest(name, t)
        dest.copy_(t, non_blocking=t.device.type == "cuda")
        self.outputs[name] = dest

    def _hook(self, module_name: str, names: list[str]):
        def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:
            self.calls[module_name] = self.calls.get(module_name, 0) + 1
            for name in names:
                plan = self.plans[name]
                if self.calls[module_name] != plan.calls:
                    continue
                t = select(out, plan.element, name)
                if not isinstance(t, torch.Tensor):
                    raise UserError(
                        f"layer {name} outputs a {type(t).__name__}, not a tensor; "
                        "pick an element (NAME:0 or NAME:KEY) or a submodule"
                    )
                self._hand_off(name, plan.reduce(t))
            if self.stop_early and len(self.outputs) == len(self.plans):
                raise StopForward

        return hook

    def __enter__(self) -> Capture:
        # several layer names may read one module (blocks.3:0 and blocks.3:1): one hook each module
        by_module: dict[int, tuple[nn.Module, str, list[str]]] = {}
        for name, module in self.modules.items():
            entry = by_module.setdefault(id(module), (module, split_layer(name)[0], []))
            entry[2].append(name)
        self.handles = [
            m.register_forward_hook(self._hook(mn, names)) for m, mn, names in by_module.values()
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def run(
        self, model: nn.Module, x: torch.Tensor, slot: int = 0, wait: bool = True
    ) -> dict[str, torch.Tensor]:
        """Forward `x`; returns name -> CPU tensor (a view of buffer `slot`).

        On CUDA the copies are queued on the stream and `self.ready` is an event recorded after
        them: with `wait=False` the caller must `ready.synchronize()` before reading the buffers
        (the extraction writer thread does, so the main thread never waits for the GPU).
        """
        self.outputs, self.calls, self.slot = {}, {}, slot % self.n_slots
        self.ready: torch.cuda.Event | None = None
        try:
            model(x)
        except StopForward:
            pass
        if x.device.type == "cuda":
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(x.device))
            if wait:
                self.ready.synchronize()
        missing = [n for n in self.plans if n not in self.outputs]
        if missing:
            raise UserError(f"layers {missing} did not run in the forward pass")
        return self.outputs


def list_layer_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, str, int]]:
    """(name, module type, output shape(s) for one input, calls per forward) for every module."""
    modules = named_modules(model)
    seen = probe(model, modules, x)
    return [
        (n, type(m).__name__, describe(seen[n][0]), seen[n][1])
        for n, m in modules.items()
        if n in seen
    ]
