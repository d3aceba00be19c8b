"""nanoGPT's Shakespeare CPU recipe as a hand-written loop around igniter's ``causal_lm`` model
(or, with ``--model nanogpt``, nanoGPT's architecture written out here in plain PyTorch):
random training offsets drawn with replacement, nanoGPT's learning-rate function, AdamW with
decay on matrices, clipping 1.0; then the exact validation loss over every non-overlapping
window of the val split (as igniter's ``token_loss``). Prints the training time and that loss.

    igniter prepare-text ../shared/data/tinyshakespeare/input.txt data/shakespeare_char
    python bench/shakespeare_hand_loop.py data/shakespeare_char --seed 1337   # ~3-8 min on 2 cores
    python bench/shakespeare_hand_loop.py data/shakespeare_char --model nanogpt

Also prints nanoGPT's own estimate of the final validation loss (``estimate_loss``: the mean
over ``--eval-iters`` random batches of 12 windows), beside the exact figure.

With ``--model nanogpt --nanogpt-stream`` it follows nanoGPT's ``train.py`` on this recipe: random
numbers drawn in its order (the initialisation, the first batch before the loop, each next one
after the forward pass, its estimate of both splits every 250 iterations), so that a seed gives
the batches and the estimates its script prints (checked at seeds 1337 and 4 against a copy of it)::

    python bench/shakespeare_hand_loop.py data/shakespeare_char --model nanogpt --nanogpt-stream --threads 2

Against ``igniter experiment=shakespeare_char data.root=data/shakespeare_char trainer.seed=...``
(README, "nanoGPT's Shakespeare recipe on CPU").
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from igniter.lm import causal_lm

BLOCK, BATCH, ITERS, WARMUP, LR, MIN_LR = 64, 12, 2000, 100, 1e-3, 1e-4


def nanogpt_lr(it: int) -> float:
    """nanoGPT's ``get_lr``: linear warm-up over ``WARMUP + 1`` steps, cosine to ``MIN_LR`` at ``ITERS``."""
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (ITERS - WARMUP)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


class NanoBlock(nn.Module):
    """nanoGPT's transformer block with ``bias=False``: pre-LayerNorm causal self-attention and
    a 4x MLP with exact GELU, residual around each."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.c_attn(self.ln_1(x)).split(c, 2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT (``bias=False``, dropout 0): token and position embeddings, blocks, a final
    LayerNorm, the output layer tied to the token embedding; weights N(0, 0.02), the two
    residual projections N(0, 0.02 / sqrt(2 x layers)), as its ``_init_weights`` does."""

    def __init__(self, vocab: int, block: int, layers: int, heads: int, d: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(NanoBlock(d, heads) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d, bias=False), nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
        for name, p in self.named_parameters():
            if name.endswith(("attn_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def batch(data: torch.Tensor, ix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows at offsets ``ix`` (shape ``(B,)``): inputs and targets, each ``(B, BLOCK)``."""
    return torch.stack([data[i : i + BLOCK] for i in ix]), torch.stack([data[i + 1 : i + 1 + BLOCK] for i in ix])


def nanogpt_estimate(model: nn.Module, data: torch.Tensor, eval_iters: int) -> float:
    """nanoGPT's ``estimate_loss`` for one split: the mean loss of ``eval_iters`` batches of
    ``BATCH`` random windows (offsets with replacement, from the global generator)."""
    model.eval()
    with torch.no_grad():
        losses = []
        for _ in range(eval_iters):
            x, y = batch(data, torch.randint(len(data) - BLOCK, (BATCH,)))
            losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def exact_loss(model: nn.Module, val: torch.Tensor) -> tuple[float, int]:
    """The mean loss over every non-overlapping window of ``val`` (as igniter's ``token_loss``),
    and the number of predicted tokens."""
    n = (len(val) - BLOCK - 1) // BLOCK + 1
    x, y = batch(val, torch.arange(n) * BLOCK)
    model.eval()
    with torch.no_grad():
        total = sum(
            F.cross_entropy(model(x[i : i + 64]).flatten(0, 1), y[i : i + 64].flatten(), reduction="sum").item()
            for i in range(0, n, 64)
        )
    return total / (n * BLOCK), n * BLOCK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path, help="the directory igniter prepare-text wrote")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--without-replacement", action="store_true", help="offsets from one permutation (igniter's sampler) instead"
    )
    parser.add_argument("--model", choices=["causal_lm", "nanogpt"], default="causal_lm")
    parser.add_argument(
        "--eval-iters", type=int, default=20, help="batches of nanoGPT's estimate (its CPU command: 20)"
    )
    parser.add_argument(
        "--nanogpt-stream",
        action="store_true",
        help="draw random numbers in the order nanoGPT's train.py does: the first batch before the loop, "
        "each next one right after the forward pass, and its estimate of both splits at iterations 0, "
        "250, ..., 2000 (printed), so that a seed gives the batches nanoGPT's script gives",
    )
    args = parser.parse_args()
    if args.nanogpt_stream and args.without_replacement:
        parser.error("--nanogpt-stream draws offsets with replacement, as nanoGPT does")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load = lambda split: torch.from_numpy(
        np.fromfile(args.shards / f"{split}_000000.bin", dtype="<u2").astype(np.int64)
    )
    train, val = load("train"), load("val")
    if args.model == "nanogpt":
        model: nn.Module = NanoGPT(65, BLOCK, 4, 4, 128)
    else:
        model = causal_lm(65, BLOCK, 4, 4, 128, activation="gelu", bias=False)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99))
    order = torch.randperm(len(train) - BLOCK) if args.without_replacement else None

    def next_batch(it: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix = order[it * BATCH : (it + 1) * BATCH] if order is not None else torch.randint(len(train) - BLOCK, (BATCH,))
        return batch(train, ix)

    def nanogpt_eval(it: int) -> float:
        estimates = [nanogpt_estimate(model, data, args.eval_iters) for data in (train, val)]
        print(f"step {it}: train loss {estimates[0]:.4f}, val loss {estimates[1]:.4f} (nanoGPT's estimate)", flush=True)
        return estimates[1]

    x, y = next_batch(0)
    start = time.perf_counter()
    for it in range(ITERS):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it)
        if args.nanogpt_stream and it % 250 == 0:
            nanogpt_eval(it)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        x, y = next_batch(it + 1)  # as nanoGPT: the next batch right after the forward pass
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    # with --nanogpt-stream its last estimate (both splits, at iteration 2000); exact_loss draws no random numbers
    estimate = nanogpt_eval(ITERS) if args.nanogpt_stream else nanogpt_estimate(model, val, args.eval_iters)
    exact, tokens = exact_loss(model, val)
    print(
        f"{args.model}, seed {args.seed}: {ITERS} iterations in {seconds:.1f} s ({seconds / ITERS * 1e3:.0f} ms each); "
        f"validation loss {exact:.4f} over {tokens:,} tokens; nanoGPT's estimate "
        f"({args.eval_iters} random batches) {estimate:.4f}"
    )


if __name__ == "__main__":
    main()
