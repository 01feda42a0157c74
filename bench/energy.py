"""A GPU's energy counter through NVML (ctypes on the driver's libnvidia-ml; no extra package):
the millijoules the board has drawn since the driver loaded. Where a point is power-bound (the
GPU at its power cap, its clocks lowered: bench/NOTES.md item 65), the joules a call takes are
the number to cut, beside its time.

    meter = meter_for(torch.device("cuda", 0))   # None without NVML or a CUDA device
    before = meter.millijoules(); ...; joules = (meter.millijoules() - before) / 1e3

The counter is the whole board's and refreshes coarsely: on an H200, reads around loops of 40-160
ms gave powers 405-665 W in no order for one steady kernel (item 65 g). Read it around loops of a
second or more, several times."""

from __future__ import annotations

import ctypes
import functools

import torch


class EnergyMeter:
    """One GPU's NVML energy counter (lib: libnvidia-ml, initialised; handle: the device's)."""

    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p):
        self._lib, self._handle = lib, handle

    def millijoules(self) -> int | None:
        """The board's energy counter in mJ, or None if NVML refuses."""
        mj = ctypes.c_ulonglong()
        if self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(mj)) != 0:
            return None
        return mj.value


@functools.cache
def meter_for(device: torch.device) -> EnergyMeter | None:
    """The meter of a CUDA device (found by its UUID, so CUDA_VISIBLE_DEVICES does not matter), made
    once a device; None for other devices, or where NVML, the device or its counter is not there."""
    if device.type != "cuda":
        return None
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}".encode()
        handle = ctypes.c_void_p()
        if lib.nvmlInit_v2() != 0 or lib.nvmlDeviceGetHandleByUUID(uuid, ctypes.byref(handle)) != 0:
            return None
        meter = EnergyMeter(lib, handle)
        return meter if meter.millijoules() is not None else None
    except (OSError, AttributeError):  # no driver library, or a symbol or torch field missing
        return None
