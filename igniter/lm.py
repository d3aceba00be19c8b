"""The built-in causal language model ``causal_lm``, backed by Hugging Face ``transformers``.

``transformers`` is imported only when the model is built (``pip install 'igniter[lm]'``):
igniter itself works without it. The model is built from config keys with random
initialisation (no download); ``model.weights`` loads a state dict as for any model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from igniter.registry import model_registry

__all__ = ["CausalLM", "causal_lm", "LM_EXTRA"]

#: How to install what the model needs.
LM_EXTRA = "pip install 'igniter[lm]'"
_ARCHS = ("gpt2", "llama")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(f"the causal_lm model needs Hugging Face transformers: {LM_EXTRA}") from None
    return transformers


class CausalLM(nn.Module):
    """A Hugging Face causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``) that returns logits only.

    Shapes: input token ids ``[B, T]`` (int64, ``T <= block_size``) -> logits ``[B, T, vocab_size]``.
    The Hugging Face model is ``self.lm`` (its ``config`` is ``self.lm.config``).
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


@model_registry("causal_lm")
def causal_lm(
    vocab_size: int,
    block_size: int = 1024,
    n_layer: int = 12,
    n_head: int = 12,
    n_embd: int = 768,
    dropout: float = 0.0,
    arch: str = "gpt2",
    activation: str | None = None,
    intermediate_size: int | None = None,
    n_kv_head: int | None = None,
    attn_implementation: str = "sdpa",
    bias: bool = True,
) -> CausalLM:
    """A randomly initialised causal LM from ``transformers``, configured by nanoGPT's key names.

    Args:
        vocab_size: tokens in the vocabulary (``meta.json``'s ``vocab_size`` of the shards).
        block_size: the longest sequence (GPT-2's ``n_positions``, Llama's ``max_position_embeddings``).
        n_layer, n_head, n_embd: transformer blocks, attention heads, model width.
        dropout: GPT-2's residual, embedding and attention dropout (Llama's attention dropout).
        arch: ``gpt2`` (learned positions, LayerNorm, tied input/output embeddings, the GPT-2
            initialisation) or ``llama`` (rotary positions, RMSNorm, SwiGLU).
        activation: GPT-2's ``activation_function`` (default ``gelu_new``, GPT-2's tanh
            approximation; nanoGPT uses ``gelu``), Llama's ``hidden_act`` (default ``silu``).
        intermediate_size: Llama's MLP width (default ``4 * n_embd``; GPT-2's is ``4 * n_embd``).
        n_kv_head: Llama's key/value heads (grouped-query attention; default ``n_head``).
        attn_implementation: ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``) or ``eager``.
        bias: GPT-2's biases in its linear layers and LayerNorms. ``False`` (nanoGPT's default)
            sets them to zero and freezes them (``requires_grad=False``): the model computes
            exactly a bias-free GPT; the frozen zeros stay in the state dict. Llama has none.

    Returns:
        A :class:`CausalLM`: ``[B, T]`` token ids -> ``[B, T, vocab_size]`` logits.

    Raises:
        ImportError: ``transformers`` is not installed (the message says ``pip install 'igniter[lm]'``).
        ValueError: an unknown ``arch``, or ``n_embd`` not divisible by ``n_head``.
    """
    if arch not in _ARCHS:
        raise ValueError(f"causal_lm: arch must be one of {', '.join(_ARCHS)}, got '{arch}'")
    if n_embd % n_head:
        raise ValueError(f"causal_lm: n_embd {n_embd} is not divisible by n_head {n_head}")
    tf = _transformers()
    if arch == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, activation_function=activation or "gelu_new",
            n_inner=intermediate_size, bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        config._attn_implementation = attn_implementation
        model = tf.GPT2LMHeadModel(config)
        if not bias:
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.requires_grad_(False).zero_()
        return CausalLM(model)
    config = tf.LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=block_size, hidden_size=n_embd, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv_head or n_head, attention_dropout=dropout,
        intermediate_size=intermediate_size or 4 * n_embd, hidden_act=activation or "silu",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    return CausalLM(tf.LlamaForCausalLM(config))
