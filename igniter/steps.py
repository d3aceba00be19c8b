"""Built-in entries of the function registry: step functions, losses, metrics, collate.

* A **step factory** returns Ignite's process function ``step(engine, batch)``.
  It is called with the keyword arguments its signature names among
  ``model``, ``optimizer``, ``loss_fn``, ``device``, ``grad_clip_norm``, ``autocast``,
  ``scaler``, ``accumulate_grad_batches`` (:class:`igniter.build.StepArgs`).
* A **loss** is ``loss(output [B, C], target [B]) -> scalar tensor`` (a language model's:
  ``loss(logits [B, T, V], target [B, T])``, :func:`next_token_cross_entropy`).
* A **metric factory** returns an ``ignite.metrics.Metric``; it may ask for
  ``loss_fn`` and ``device``. Ignite metrics reduce across processes.
* A **collate function** is passed to ``DataLoader(collate_fn=...)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.metrics import Accuracy, Loss, Metric, TopKCategoricalAccuracy
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import default_collate

from igniter.parallel.strategy import gradient_sync
from igniter.precision import Autocast, micro_batches
from igniter.registry import function_registry

__all__ = [
    "supervised",
    "loss_dict",
    "supervised_eval",
    "without_padding",
    "total_loss",
    "next_token_cross_entropy",
    "TokenLoss",
]

Batch = Any
StepFn = Callable[[Engine, Batch], Any]
_OFF = torch.amp.GradScaler("cpu", enabled=False)  # a step factory called without igniter's scaler


def _to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch[0], batch[1]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _set_mode(model: torch.nn.Module, training: bool) -> None:
    """``model.train(training)`` unless the top module is already in that mode: the call
    walks every submodule (~16 us for a 3-layer MLP, 2-3% of a small model's step),
    the flag costs nothing, and evaluation always switches the whole model."""
    if model.training != training:
        model.train(training)


def total_loss(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum of a model's dict of losses (the original Igniter convention)."""
    return torch.stack([v for v in losses.values()]).sum()


Forward = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, Mapping[str, torch.Tensor]]"]


def _optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip_norm: float | None
) -> None:
    """Clip the accumulated gradients (unscaled first under loss scaling) and step."""
    if grad_clip_norm is not None:
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()


def _training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    grad_clip_norm: float | None,
    autocast: Autocast,
    scaler: torch.amp.GradScaler,
    accumulate_grad_batches: int,
    forward: Forward,
) -> StepFn:
    """One optimizer step per batch: ``forward(x, y) -> (loss, logged terms)`` under
    ``autocast`` on each of ``k = accumulate_grad_batches`` micro-batches (moved to the
    device one at a time), backward of ``loss / k`` through ``scaler``, DDP's all-reduce
    only on the last micro-batch (:func:`~igniter.parallel.strategy.gradient_sync`),
    then clip and step. Returns the batch's mean loss and terms, detached, float32."""
    k = accumulate_grad_batches

    def step(engine: Engine, batch: Batch) -> dict[str, torch.Tensor]:
        _set_mode(model, True)
        optimizer.zero_grad(set_to_none=True)
        if k == 1:  # no split, no no_sync: the path of a run without accumulation
            x, y = _to_device(batch, device)
            with autocast():
                loss, terms = forward(x, y)
            scaler.scale(loss).backward()
            _optimizer_step(model, optimizer, scaler, grad_clip_norm)
            return {**{name: v.detach().float() for name, v in terms.items()}, "loss": loss.detach().float()}
        sums: dict[str, torch.Tensor] = {}
        for i, micro in enumerate(micro_batches(batch, k)):
            x, y = _to_device(micro, device)
            with gradient_sync(model, sync=i == k - 1):
                with autocast():
                    loss, terms = forward(x, y)
                scaler.scale(loss / k).backward()
            for name, value in {**terms, "loss": loss}.items():
                part = value.detach().float() / k
                sums[name] = sums[name] + part if name in sums else part
        _optimizer_step(model, optimizer, scaler, grad_clip_norm)
        return sums

    return step


@function_registry("supervised")
def supervised(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    device: torch.device,
    grad_clip_norm: float | None = None,
    autocast: Autocast = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    accumulate_grad_batches: int = 1,
) -> StepFn:
    """One optimizer step on ``(x [B, ...], y [B])``: ``loss_fn(model(x), y)``.

    If the model returns a dict of losses instead of logits, their sum is used. The
    forward pass and loss run under ``autocast`` (``trainer.precision``), the batch is
    split into ``accumulate_grad_batches`` micro-batches (:mod:`igniter.precision`).
    Returns ``{"loss": the batch's mean loss, detached float32 scalar tensor}`` (no host
    sync per iteration).
    """

    def forward(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        out = model(x)
        return (total_loss(out) if isinstance(out, Mapping) else loss_fn(out, y)), {}

    return _training_step(
        model, optimizer, device, grad_clip_norm, autocast, scaler or _OFF, accumulate_grad_batches, forward
    )


@function_registry("loss_dict")
def loss_dict(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    grad_clip_norm: float | None = None,
    autocast: Autocast = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    accumulate_grad_batches: int = 1,
) -> StepFn:
    """Step for models called as ``model(x, targets)`` that return ``{name: loss}``
    (the original Igniter MNIST example). Optimizes the sum; returns every term
    and ``loss`` (the sum), detached float32 (means over the micro-batches)."""

    def forward(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        losses = model(x, y)
        return total_loss(losses), losses

    return _training_step(
        model, optimizer, device, grad_clip_norm, autocast, scaler or _OFF, accumulate_grad_batches, forward
    )


@function_registry("supervised_eval")
def supervised_eval(
    model: torch.nn.Module, device: torch.device, autocast: Autocast = contextlib.nullcontext
) -> StepFn:
    """Evaluation step: ``(logits [B, C] float32, y [B])`` under ``torch.no_grad`` in eval
    mode, the forward pass under the training's ``autocast`` (``trainer.precision``);
    the logits are cast to float32 so that metrics are computed in float32.

    A model that returns ``(logits, losses)`` in eval mode is accepted (first item used).
    """

    def step(engine: Engine, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        _set_mode(model, False)
        x, y = _to_device(batch, device)
        with torch.no_grad(), autocast():
            out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        return logits.float(), y

    return step


def _first_rows(output: Any, rows: int, keep: int) -> Any:
    """``output`` (a pytree: tensors in tuples, lists, dicts) with every tensor of ``rows`` rows
    (first dimension) cut to its first ``keep``."""

    def cut(t: Any) -> Any:
        return t[:keep] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == rows else t

    return tree_map(cut, output)


def without_padding(step: StepFn, real_samples: int, batch_size: int) -> StepFn:
    """An evaluation step whose output leaves out the padding a sharded evaluation adds.

    Under a sharded model every rank runs the same number of forward passes (each one
    gathers parameters: a collective), so the evaluation loader pads the shorter shards
    (:class:`igniter.parallel.sampler.ShardedSampler` with ``tail="pad"``: at most one
    sample, a rank's last). The forward pass sees the padding; the output does not:
    every tensor in it whose first dimension is the batch's is cut to the real samples,
    and a batch of padding only gives ``None``, which metrics skip
    (:func:`igniter.assemble` attaches them with a filter on it).

    Args:
        step: the evaluation step (its output: tensors, or tuples, lists or dicts of them,
            with samples along the first dimension, such as ``(logits [B, C], y [B])``).
        real_samples: the real samples of this rank's shard (the rest is padding).
        batch_size: the per-process batch size (every batch but the last has it).
    """

    def wrapped(engine: Engine, batch: Any) -> Any:
        output = step(engine, batch)
        rows = next(t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)).shape[0]  # samples in the batch
        keep = real_samples - (engine.state.iteration - 1) * batch_size
        if keep >= rows:
            return output
        return _first_rows(output, rows, keep) if keep > 0 else None

    return wrapped


function_registry.register(F.cross_entropy, "cross_entropy")
function_registry.register(F.nll_loss, "nll_loss")
function_registry.register(default_collate, "default_collate")


@function_registry("accuracy")
def accuracy(device: torch.device) -> Metric:
    """Top-1 accuracy in [0, 1] (``ignite.metrics.Accuracy``)."""
    return Accuracy(device=device)


@function_registry("top5")
def top5(device: torch.device) -> Metric:
    """Top-5 accuracy in [0, 1] (``ignite.metrics.TopKCategoricalAccuracy``)."""
    return TopKCategoricalAccuracy(k=5, device=device)


@function_registry("loss")
def loss(loss_fn: Callable, device: torch.device) -> Metric:
    """Mean of the training loss function over the evaluation set (``ignite.metrics.Loss``)."""
    return Loss(loss_fn, device=device)


@function_registry("next_token_cross_entropy")
def next_token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per token) of ``logits [B, T, V]`` against ``target [B, T]``
    (int64 token ids): the ``[B * T, V]`` and ``[B * T]`` flattening of a causal LM's loss.
    Computed in float32 whatever the logits' dtype (autocast gives bf16/fp16 logits)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten())


class TokenLoss(Metric):
    """Cross-entropy per token over every validation token of every rank (an Ignite metric).

    Sums the loss (float64) and counts the target tokens of each batch, then all-reduces both
    once per evaluation: the exact per-token mean, whatever the batch sizes and however the
    samples are sharded over the ranks. ``perplexity=True`` reports ``exp`` of that mean.

    Updates take ``(logits [B, T, V], target [B, T])`` or ``(logits [B, V], target [B])``.
    """

    def __init__(self, perplexity: bool = False, device: torch.device | str = "cpu") -> None:
        self.perplexity = perplexity
        super().__init__(device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._tokens = torch.tensor(0, dtype=torch.int64, device=self._device)

    @reinit__is_reduced
    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        logits, target = output[0].detach(), output[1].detach()
        loss = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction="sum")
        self._sum += loss.to(self._device, torch.float64)
        self._tokens += target.numel()

    @sync_all_reduce("_sum", "_tokens")
    def compute(self) -> float:
        if int(self._tokens) == 0:
            raise RuntimeError("TokenLoss needs at least one token before it can be computed")
        mean = float(self._sum) / int(self._tokens)
        return math.exp(mean) if self.perplexity else mean


@function_registry("token_loss")
def token_loss(device: torch.device) -> Metric:
    """Cross-entropy in nats per token, exact over all validation tokens and ranks (:class:`TokenLoss`)."""
    return TokenLoss(device=device)


@function_registry("perplexity")
def perplexity(device: torch.device) -> Metric:
    """``exp`` of the per-token cross-entropy over all validation tokens and ranks (:class:`TokenLoss`)."""
    return TokenLoss(perplexity=True, device=device)
