"""What a step computes in: autocast dtype and float16's loss scaler, resolved in ONE place for
training, evaluation and extraction."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


def gpu_has_native_bf16() -> bool:
    """Ampere and newer. `is_bf16_supported()` alone also counts emulation: True on a T4/V100,
    where bfloat16 is slower than float16."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_has_native_bf16() -> bool:
    """oneDNN runs bfloat16 natively (AVX512-BF16 or AMX); emulated, it is slower than float32."""
    try:
        return torch.backends.mkldnn.is_available() and bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):  # a private op: absent in some builds
        return False


@dataclass
class Precision:
    """What a training step runs in: autocast to `dtype` when `enabled`, and float16's loss
    scaler (a disabled scaler otherwise). Made by `Precision.resolve`."""

    device: torch.device
    enabled: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler

    @classmethod
    def resolve(
        cls, device: torch.device, amp: bool = True, amp_dtype: str = "auto", amp_cpu: bool = False
    ) -> Precision:
        """CUDA with `amp`: bfloat16 where the GPU has it natively (Ampere+), float16 otherwise
        (`is_bf16_supported()` alone also counts emulation: True on a T4/V100, where bf16 is
        slow), or the `amp_dtype` asked for. A CPU: float32, or bfloat16 autocast with
        `amp_cpu` where oneDNN runs it natively. bfloat16 has float32's range and needs no loss
        scaling; float16's scaler reads one found-inf flag back per step, a host sync bf16
        avoids."""
        if device.type == "cuda" and amp:
            if amp_dtype == "auto":
                dtype = torch.bfloat16 if gpu_has_native_bf16() else torch.float16
            else:
                dtype = getattr(torch, amp_dtype)
            enabled = True
        else:
            enabled, dtype = (
                device.type == "cpu" and amp_cpu and cpu_has_native_bf16(),
                torch.bfloat16,
            )
        return cls(
            device,
            enabled,
            dtype,
            torch.amp.GradScaler("cuda", enabled=enabled and dtype == torch.float16),
        )

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        """A bf16 or CPU checkpoint holds an empty scaler state: resuming it with float16 keeps
        the fresh scaler (GradScaler refuses an empty state)."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def dtype_name(self) -> str | None:
        """`bfloat16`/`float16` when autocast is on, else None (as an extraction store records
        it)."""
        return str(self.dtype).removeprefix("torch.") if self.enabled else None
