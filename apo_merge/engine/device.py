"""Where a merge computes: ``resolve_device`` turns the user's choice into a device once, before the engine runs."""

from __future__ import annotations

import contextlib
import os
import sys

from apo_merge.errors import MergeError


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is available, else ``cpu``; a CUDA request without one is refused."""
    if device == "cpu" or (device == "auto" and not _may_have_gpu()):
        return "cpu"
    from apo_merge.shell import import_torch

    torch = import_torch()  # Ctrl-C held while torch starts (see hold_signals)

    if not torch.cuda.is_available():
        if device == "auto":
            return "cpu"
        raise MergeError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return "cuda" if device == "auto" else device


def is_gpu(device: str) -> bool:
    return device.startswith("cuda")


def on(device: str) -> contextlib.AbstractContextManager:
    """The device's context (where pinned memory and streams belong); nothing on the CPU."""
    if not is_gpu(device):
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(torch.device(device))


def _may_have_gpu() -> bool:
    """False only where no CUDA or ROCm device can be, told without importing torch (3 s of start-up)."""
    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return sys.platform != "darwin"  # torch is loaded, so asking it is free; macOS has no CUDA
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    for path in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd"):  # drivers: NVIDIA, WSL, ROCm
        if os.path.exists(path):
            return True
    try:  # an NVIDIA or AMD display/3D controller whose driver is not loaded yet
        devices = [d.path for d in os.scandir("/sys/bus/pci/devices")]
    except OSError:
        return True  # cannot tell: ask torch
    for dev in devices:
        with contextlib.suppress(OSError), open(f"{dev}/vendor") as v, open(f"{dev}/class") as c:
            if v.read().strip() in ("0x10de", "0x1002") and c.read().startswith("0x03"):
                return True
    return False
