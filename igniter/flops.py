"""Model FLOPs per optimizer step, counted once on a real batch with ``torch.utils.flop_counter``.

:class:`FirstStepFlops` runs the first training step of a process under
``torch.utils.flop_counter.FlopCounterMode``: every matrix multiplication, convolution and
attention kernel the step dispatches is counted with PyTorch's formulas (forward and backward;
element-wise ops, norms and the optimizer are not counted, as in the usual "model FLOPs").
Counting the step itself, on the batch it trains on, means gradient accumulation (every
micro-batch is in the step), mixed precision and the batch shape cannot make the figure wrong.

Attention through ``scaled_dot_product_attention`` on CPU dispatches a kernel PyTorch has no
formula for (``_scaled_dot_product_flash_attention_for_cpu``); importing this module registers
PyTorch's own SDPA formulas for it. Like PyTorch's, they count the full ``T x T`` score matrix
(causal masking not subtracted), as PaLM's appendix B does.
"""

from __future__ import annotations

import logging
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

__all__ = ["count_flops", "FirstStepFlops"]

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

        return counted_step
