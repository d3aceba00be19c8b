"""Model FLOPs per optimizer step, counted once on a real batch with ``torch.utils.flop_counter``.

:class:`FirstStepFlops` runs the first training step of a process under
``torch.utils.flop_counter.FlopCounterMode``: every matrix multiplication, convolution and
attention kernel the step dispatches is counted with PyTorch's formulas (forward and backward;
element-wise ops, norms and the optimizer are not counted, as in the usual "model FLOPs").
Counting the step itself, on the batch it trains on, means gradient accumulation (every
micro-batch is in the step), mixed precision and the batch shape cannot make the figure wrong.

MFU (model FLOPs utilisation, PaLM's appendix B: achieved model FLOP/s over the peak of the
hardware) is :func:`mfu`, against :func:`run_peak`: ``logging.peak_tflops`` when given, else the
dense peak of the GPU for the run's compute dtype in :data:`PEAK_TFLOPS`, found by its NVML name.

Attention through ``scaled_dot_product_attention`` on CPU dispatches a kernel PyTorch has no
formula for (``_scaled_dot_product_flash_attention_for_cpu``); importing this module registers
PyTorch's own SDPA formulas for it. Like PyTorch's, they count the full ``T x T`` score matrix
(causal masking not subtracted), as PaLM's appendix B does.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from ignite.engine import Engine
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

__all__ = [
    "count_flops",
    "FirstStepFlops",
    "PEAK_TFLOPS",
    "DEVICE_PATTERNS",
    "table_key",
    "table_peak_tflops",
    "tf32_allowed",
    "compute_dtype",
    "Peak",
    "run_peak",
    "achieved_tflops",
    "mfu",
]

logger = logging.getLogger("igniter")

_aten = torch.ops.aten
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu") and (
    _aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry
):

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _sdpa_cpu_backward_flop(
        grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
    ) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """``(fn(*args, **kwargs), FLOPs it dispatched)`` (multiply-add = 2 FLOPs), counted by
    ``FlopCounterMode`` in this process only."""
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return result, int(counter.get_total_flops())


class FirstStepFlops:
    """Counts the FLOPs of the first step a process function runs (:func:`count_flops`);
    the following steps run untouched (one attribute test each).

    ``on_count(flops)`` is called once the step is counted (igniter sets
    :attr:`igniter.timing.StepTimer.model_flops` with it).

    Attributes:
        flops: FLOPs of that step in this process (forward and backward of every micro-batch),
            ``None`` until it ran or when counting is off.
    """

    def __init__(self, enabled: bool = True, on_count: Callable[[int], None] | None = None) -> None:
        self.enabled, self.on_count = enabled, on_count
        self.flops: int | None = None

    def wrap(self, step: Callable[[Engine, Any], Any]) -> Callable[[Engine, Any], Any]:
        """``step`` whose first call is counted."""
        if not self.enabled:
            return step
        pending = {"count": True}

        def counted_step(engine: Engine, batch: Any) -> Any:
            if not pending["count"]:
                return step(engine, batch)
            pending["count"] = False
            output, self.flops = count_flops(step, engine, batch)
            if self.on_count is not None:
                self.on_count(self.flops)
            return output

        counted_step.__wrapped__ = step  # type: ignore[attr-defined]  (inspect.unwrap finds the step)
        return counted_step


#: Dense peak TFLOP/s (10^12 FLOP/s, multiply-add = 2) of one GPU per compute dtype: tensor cores
#: for bf16, fp16 and tf32, the non-tensor FP32 units for fp32. Vendor datasheets print most
#: tensor figures "with sparsity" (2:4 structured sparsity, twice the dense rate): those are halved.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf):
    # TF32 156, BF16/FP16 312 dense (312/624 with sparsity), FP32 19.5; the SXM4 and PCIe columns are equal.
    "A100 SXM": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A100 PCIe": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: TF32 989, BF16/FP16 1,979 with
    # sparsity (halved), FP32 67.
    "H100 SXM": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
    # NVIDIA H100 PCIe product brief (PB-11133-001) and datasheet: TF32 756, BF16/FP16 1,513 with
    # sparsity (halved), FP32 51.
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    # NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column (one GPU): TF32 835, BF16/FP16 1,671
    # with sparsity (halved), FP32 60.
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: as the H100 SXM (TF32 989, BF16/FP16
    # 1,979 with sparsity, halved; FP32 67).
    "H200 SXM": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
    # NVIDIA H200 datasheet, H200 NVL column: TF32 835, BF16/FP16 1,671 with sparsity (halved), FP32 60.
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    # NVIDIA L40S datasheet (it prints dense and sparse): TF32 183, BF16/FP16 362.05, FP32 91.6.
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    # NVIDIA L4 Tensor Core GPU datasheet: TF32 120, BF16/FP16 242 with sparsity (halved), FP32 30.3.
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    # The A10G is AWS's variant of the A10 (G5 instances); NVIDIA publishes no datasheet for it.
    # Figures from Baseten's "NVIDIA A10 vs A10G for ML model inference": FP32 35, TF32 35,
    # BF16/FP16 70 dense (the A10's datasheet: 31.2, 62.5, 125). The least certain entry of the
    # table: set logging.peak_tflops where it matters.
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 35.0},
    # NVIDIA HGX B200 datasheet, per GPU: TF32 2.2 PFLOPS, BF16/FP16 4.5 PFLOPS with sparsity
    # (halved), FP32 75.
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
}

#: ``(regular expression, PEAK_TFLOPS key)``: the first whose pattern is found in the lower-case
#: NVML device name wins (NVML names the SXM boards "NVIDIA H100 80GB HBM3", "NVIDIA H200",
#: "NVIDIA A100-SXM4-80GB"; the others "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100 80GB PCIe",
#: "NVIDIA A100-PCIE-40GB", "NVIDIA L40S", "NVIDIA L4", "NVIDIA A10G", "NVIDIA B200").
DEVICE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b", "H100 SXM"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200 SXM"),
    (r"\ba100\b.*\bpcie\b", "A100 PCIe"),
    (r"\ba100\b", "A100 SXM"),
    (r"\bl40s\b", "L40S"),
    (r"\bl4\b", "L4"),
    (r"\ba10g\b", "A10G"),
    (r"\bb200\b", "B200"),
)


def table_key(device_name: str) -> str | None:
    """The :data:`PEAK_TFLOPS` key of a GPU by its NVML name (``"NVIDIA H100 80GB HBM3"`` ->
    ``"H100 SXM"``), ``None`` for a GPU the table does not have."""
    name = device_name.lower()
    return next((key for pattern, key in DEVICE_PATTERNS if re.search(pattern, name)), None)


def table_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of the GPU named ``device_name`` (NVML's name) for ``dtype``
    (``"bf16"``, ``"fp16"``, ``"tf32"``, ``"fp32"``); ``None`` when the table lacks either."""
    key = table_key(device_name)
    return PEAK_TFLOPS[key].get(dtype) if key is not None else None


def tf32_allowed() -> bool:
    """Whether float32 matrix multiplications on CUDA may use TF32 tensor cores
    (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, set by
    ``torch.set_float32_matmul_precision("high")`` or ``allow_tf32 = True``; off by default)."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", None)
        if precision is None:  # a torch before the fp32_precision API
            return bool(matmul.allow_tf32)
        if precision == "none":  # inherits the global setting
            precision = getattr(torch.backends, "fp32_precision", "ieee")
        return precision == "tf32"
    except (AttributeError, RuntimeError):  # RuntimeError: legacy and new APIs mixed
        return False


def compute_dtype(precision: str) -> str:
    """The dtype the matrix multiplications of a ``trainer.precision`` run in: ``bf16-mixed`` ->
    ``"bf16"``, ``16-mixed`` -> ``"fp16"``, ``32`` -> ``"tf32"`` when :func:`tf32_allowed`, else ``"fp32"``."""
    return {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(str(precision)) or ("tf32" if tf32_allowed() else "fp32")


@dataclass(frozen=True)
class Peak:
    """The peak MFU is measured against: ``tflops`` (TFLOP/s of one process's device; ``None``:
    unknown, no MFU) and ``source``: where it comes from (``"logging.peak_tflops"``,
    ``"<NVML name>, <dtype> (<table key> in igniter.flops.PEAK_TFLOPS)"``), or why there is none."""

    tflops: float | None
    source: str


@functools.lru_cache(maxsize=8)
def run_peak(precision: str, device: torch.device, override: float | None) -> Peak:
    """The peak of this process's device for a run: ``override`` (``logging.peak_tflops``) when
    given; else, on CUDA, :data:`PEAK_TFLOPS` for the GPU's NVML name
    (:func:`igniter.telemetry.device_name`) and the :func:`compute_dtype` of ``precision``; else
    a :class:`Peak` without ``tflops`` saying why (CPU, a GPU the table does not have). Looked up
    once per process for the same arguments."""
    if override is not None:
        return Peak(float(override), "logging.peak_tflops")
    if device.type != "cuda":
        return Peak(None, f"no peak for a {device.type} device: set logging.peak_tflops")
    from igniter.telemetry import device_name

    name, dtype = device_name(device), compute_dtype(precision)
    tflops = table_peak_tflops(name, dtype)
    if tflops is None:
        return Peak(None, f"{name} ({dtype}) is not in igniter.flops.PEAK_TFLOPS: set logging.peak_tflops")
    return Peak(tflops, f"{name}, {dtype} ({table_key(name)} in igniter.flops.PEAK_TFLOPS)")


def achieved_tflops(flops_per_step: float, steps: float, seconds: float) -> float | None:
    """Model TFLOP/s: ``flops_per_step x steps / seconds / 1e12`` (``flops_per_step``: one optimizer
    step of all processes); ``None`` without a count or without time."""
    return flops_per_step * steps / seconds / 1e12 if flops_per_step and seconds > 0 else None


def mfu(model_tflops_per_s: float, peak_tflops: float, world_size: int) -> float:
    """Model FLOPs utilisation (PaLM, Chowdhery et al. 2022, appendix B): the model FLOP/s of all
    processes over the peak of all their devices, ``model_tflops_per_s / (world_size x peak_tflops)``
    (both in TFLOP/s; a fraction, 1.0 = every device at its peak).

    Raises:
        ValueError: ``peak_tflops`` or ``world_size`` is not positive.
    """
    if peak_tflops <= 0 or world_size <= 0:
        raise ValueError(f"peak_tflops ({peak_tflops}) and world_size ({world_size}) must be positive")
    return model_tflops_per_s / (world_size * peak_tflops)
