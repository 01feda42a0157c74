"""A GPU's energy counter through NVML (ctypes on the driver's libnvidia-ml; no extra package):
the millijoules the board has drawn since the driver loaded. Where a point is power-bound (the
GPU at its power cap, its clocks lowered: bench/NOTES.md item 65), the joules a call takes say
more than its time.

    meter = EnergyMeter.for_device(torch.device("cuda", 0))   # None without NVML or a CUDA device
    before = meter.millijoules(); ...; joules = (meter.millijoules() - before) / 1e3

The counter is the whole board's and NVML refreshes it every few milliseconds, so read it around
loops of many calls, not one call."""

from __future__ import annotations

import ctypes

import torch


class EnergyMeter:
    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p):
        self._lib, self._handle = lib, handle

    @classmethod
    def for_device(cls, device: torch.device) -> EnergyMeter | None:
        """The meter of a CUDA device (found by its UUID, so CUDA_VISIBLE_DEVICES does not matter),
        or None where NVML or the counter is not there."""
        if device.type != "cuda":
            return None
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return None
        uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}".encode()
        handle = ctypes.c_void_p()
        if lib.nvmlInit_v2() != 0 or lib.nvmlDeviceGetHandleByUUID(uuid, ctypes.byref(handle)) != 0:
            return None
        meter = cls(lib, handle)
        return meter if meter.millijoules() is not None else None

    def millijoules(self) -> int | None:
        """The board's energy counter in mJ, or None if NVML refuses."""
        mj = ctypes.c_ulonglong()
        if self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(mj)) != 0:
            return None
        return mj.value
