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
    args = parser.parse_args()
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
    start = time.perf_counter()
    for it in range(ITERS):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it)
        ix = order[it * BATCH : (it + 1) * BATCH] if order is not None else torch.randint(len(train) - BLOCK, (BATCH,))
        x = torch.stack([train[i : i + BLOCK] for i in ix])
        y = torch.stack([train[i + 1 : i + 1 + BLOCK] for i in ix])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    model.eval()
    n = (len(val) - BLOCK - 1) // BLOCK + 1
    x = torch.stack([val[i * BLOCK : i * BLOCK + BLOCK] for i in range(n)])
    y = torch.stack([val[i * BLOCK + 1 : i * BLOCK + BLOCK + 1] for i in range(n)])
    with torch.no_grad():
        total = sum(
            torch.nn.functional.cross_entropy(
                model(x[i : i + 64]).flatten(0, 1), y[i : i + 64].flatten(), reduction="sum"
            ).item()
            for i in range(0, n, 64)
        )
        estimate = []
        for _ in range(args.eval_iters):  # nanoGPT's estimate_loss: random windows, with replacement
            ix = torch.randint(len(val) - BLOCK, (BATCH,))
            xb = torch.stack([val[i : i + BLOCK] for i in ix])
            yb = torch.stack([val[i + 1 : i + 1 + BLOCK] for i in ix])
            estimate.append(F.cross_entropy(model(xb).flatten(0, 1), yb.flatten()).item())
    print(
        f"{args.model}, seed {args.seed}: {ITERS} iterations in {seconds:.1f} s ({seconds / ITERS * 1e3:.0f} ms each); "
        f"validation loss {total / (n * BLOCK):.4f} over {n * BLOCK:,} tokens; nanoGPT's estimate "
        f"({args.eval_iters} random batches) {sum(estimate) / len(estimate):.4f}"
    )


if __name__ == "__main__":
    main()
