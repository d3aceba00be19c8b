"""GPU telemetry through NVML (``pynvml`` from the ``nvidia-ml-py`` package).

Every ``logging.gpu_telemetry_every`` iterations each rank samples the GPU it
uses (NVML index = local rank; with ``CUDA_VISIBLE_DEVICES`` remapping, the
index NVML sees may differ): utilization (%), memory used and total (bytes),
power (W) and temperature (deg C). Samples are gathered to rank 0, written to
TensorBoard as ``gpu/<rank>/<quantity>`` and summarised (mean, max) in
``metrics.json`` under ``"gpu"``. Without an NVIDIA driver (or without
``nvidia-ml-py``) rank 0 logs one line saying telemetry is off and why, and
nothing is attached to the engine: no per-iteration cost.

Also here: the NVML name of a CUDA device (:func:`device_name`, what the peak-FLOPs table of
:mod:`igniter.flops` is keyed by) and a process's peak memory (:func:`peak_memory_bytes`).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine

from igniter.registry import event_handler_registry

if TYPE_CHECKING:
    from igniter.context import RunContext

__all__ = [
    "QUANTITIES",
    "open_nvml",
    "device_name",
    "peak_memory_bytes",
    "rss_bytes",
    "gather_rows",
    "GpuTelemetry",
    "gpu_telemetry",
]

logger = logging.getLogger("igniter")

#: Sampled quantities, in tensor order, with their units in the name.
QUANTITIES = ("utilization_pct", "memory_used_bytes", "memory_total_bytes", "power_w", "temperature_c")


def open_nvml() -> tuple[Any, str | None]:
    """``(pynvml module, None)`` when NVML works, else ``(None, reason)``."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            return None, "NVML sees no GPU"
    except Exception as e:  # pynvml.NVMLError_LibraryNotFound / DriverNotLoaded ...
        return None, f"NVML is unavailable ({e})"
    return pynvml, None


def device_name(device: torch.device) -> str:
    """The NVML name of CUDA device ``device`` (``"NVIDIA H100 80GB HBM3"``), found by the
    device's UUID (so ``CUDA_VISIBLE_DEVICES`` cannot mix devices up); torch's name for it
    (``torch.cuda.get_device_name``, the same string from the CUDA runtime) when NVML is
    unavailable or does not know the UUID (a MIG instance)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    nvml, _ = open_nvml()
    if nvml is not None:
        try:
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}"))
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # pynvml.NVMLError_NotFound ..., or a torch without .uuid
            pass
    return torch.cuda.get_device_name(index)


def rss_bytes(ru_maxrss: int, platform: str = sys.platform) -> int:
    """``getrusage``'s ``ru_maxrss`` in bytes: it is in KiB on Linux (and the BSDs), in bytes on macOS."""
    return int(ru_maxrss) if platform == "darwin" else int(ru_maxrss) * 1024


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far, bytes: on CUDA the caching allocator's peak of
    allocated tensors on ``device`` (``torch.cuda.max_memory_allocated``; the CUDA context and
    the allocator's unused cache are not in it), elsewhere the process's peak resident set size
    (``resource.getrusage(RUSAGE_SELF).ru_maxrss``; DataLoader worker processes are not in it)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource  # Unix

    return rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def gather_rows(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (the same length on each), in rank order: one ``all_gather``
    (every rank must call it at the same point); ``[values]`` in a single process."""
    if idist.get_world_size() == 1:
        return [list(values)]
    rows = idist.all_gather(torch.tensor([values], dtype=torch.float64))
    return rows.cpu().tolist()


class GpuTelemetry:
    """Samples one GPU; ``__call__(engine)`` gathers every rank's sample to rank 0.

    Args:
        nvml: the ``pynvml`` module (already initialised).
        index: NVML device index of this rank's GPU.
        writer: a TensorBoard ``SummaryWriter`` (rank 0) or ``None``.
        step_engine: the engine whose iteration is the TensorBoard step.
    """

    def __init__(self, nvml: Any, index: int, writer: Any = None, step_engine: Engine | None = None) -> None:
        self.nvml, self.writer, self.step_engine = nvml, writer, step_engine
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.samples: list[torch.Tensor] = []  # rank 0: [world_size, len(QUANTITIES)] per call

    def sample(self) -> torch.Tensor:
        """This GPU now: a float64 tensor in :data:`QUANTITIES` order."""
        n, h = self.nvml, self.handle
        util = n.nvmlDeviceGetUtilizationRates(h).gpu
        mem = n.nvmlDeviceGetMemoryInfo(h)
        power_w = n.nvmlDeviceGetPowerUsage(h) / 1000.0  # NVML reports milliwatts
        temp = n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)
        return torch.tensor([util, mem.used, mem.total, power_w, temp], dtype=torch.float64)

    def __call__(self, engine: Engine) -> None:
        mine = self.sample()
        every = idist.all_gather(mine.unsqueeze(0)) if idist.get_world_size() > 1 else mine.unsqueeze(0)
        if idist.get_rank() != 0:
            return
        self.samples.append(every)
        if self.writer is not None:
            step = (self.step_engine or engine).state.iteration
            for rank, row in enumerate(every.tolist()):
                for name, value in zip(QUANTITIES, row):
                    self.writer.add_scalar(f"gpu/{rank}/{name}", value, step)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{rank: {quantity: {"mean", "max"}}}`` over all samples (rank 0)."""
        if not self.samples:
            return {}
        stacked = torch.stack(self.samples)  # [samples, world, quantities]
        return {
            str(rank): {
                name: {"mean": float(stacked[:, rank, q].mean()), "max": float(stacked[:, rank, q].max())}
                for q, name in enumerate(QUANTITIES)
            }
            for rank in range(stacked.shape[1])
        }


@event_handler_registry("gpu_telemetry")
def gpu_telemetry(ctx: RunContext, writer: Any = None) -> GpuTelemetry | None:
    """A :class:`GpuTelemetry` handler for this rank's GPU, or ``None`` (after logging
    why on rank 0: in ``rank0.log`` only when torch sees no GPU) when NVML is unavailable on any rank. Every rank must call it and
    attach the handler at the same event (the gather is collective). igniter attaches
    it every ``logging.gpu_telemetry_every`` iterations by default."""
    nvml, reason = open_nvml()
    ok = nvml is not None
    if idist.get_world_size() > 1:
        ok = bool(idist.all_reduce(torch.tensor(int(ok)), op="MIN").item())
        reason = reason or "NVML is unavailable on another rank"
    if not ok:
        if idist.get_rank() == 0:  # on a machine without GPUs nothing to say on the console: the rank log keeps it
            logger.info("GPU telemetry off: %s", reason, extra={"console": torch.cuda.is_available()})
        return None
    return GpuTelemetry(nvml, idist.get_local_rank(), writer, ctx.trainer)
