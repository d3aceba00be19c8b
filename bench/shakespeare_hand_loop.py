"""nanoGPT's Shakespeare CPU recipe as a hand-written loop around igniter's ``causal_lm`` model:
random training offsets drawn with replacement, nanoGPT's learning-rate function, AdamW with
decay on matrices, clipping 1.0; then the exact validation loss over every non-overlapping
window of the val split (as igniter's ``token_loss``). Prints the training time and that loss.

    igniter prepare-text ../shared/data/tinyshakespeare/input.txt data/shakespeare_char
    python bench/shakespeare_hand_loop.py data/shakespeare_char --seed 1337   # ~3-8 min on 2 cores

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

from igniter.lm import causal_lm

BLOCK, BATCH, ITERS, WARMUP, LR, MIN_LR = 64, 12, 2000, 100, 1e-3, 1e-4


def nanogpt_lr(it: int) -> float:
    """nanoGPT's ``get_lr``: linear warm-up over ``WARMUP + 1`` steps, cosine to ``MIN_LR`` at ``ITERS``."""
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (ITERS - WARMUP)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path, help="the directory igniter prepare-text wrote")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--without-replacement", action="store_true", help="offsets from one permutation (igniter's sampler) instead"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load = lambda split: torch.from_numpy(
        np.fromfile(args.shards / f"{split}_000000.bin", dtype="<u2").astype(np.int64)
    )
    train, val = load("train"), load("val")
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
    print(
        f"seed {args.seed}: {ITERS} iterations in {seconds:.1f} s ({seconds / ITERS * 1e3:.0f} ms each); "
        f"validation loss {total / (n * BLOCK):.4f} over {n * BLOCK:,} tokens"
    )


if __name__ == "__main__":
    main()
