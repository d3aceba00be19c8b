"""``trainer.activation_checkpointing``: peak memory and step time of a GPT with and without it, on the CPU.

    python bench/activation_checkpointing.py                       # ~1 min on 2 cores
    python bench/activation_checkpointing.py --layers 12 --width 384 --batch 8 --seq 512

Each variant runs in a fresh process (``--one VARIANT``): igniter's ``causal_lm`` (GPT-2,
``--layers`` blocks of ``--width``, ``--seq`` positions, vocabulary 256), built, then
``--steps`` training steps (forward, cross-entropy, backward, AdamW) on random tokens, batch
``--batch``; ``plain`` as built, ``checkpointed`` with every ``GPT2Block`` wrapped by
:func:`igniter.parallel.strategy.checkpoint_activations` (what ``trainer.activation_checkpointing=[GPT2Block]``
does). Reported per variant:

* ``peak_rss_mb``: the process's peak resident memory (``ru_maxrss``) after the steps;
* ``step_peak_mb``: that peak less the resident memory before the first step (the model,
  the interpreter, the libraries): what the steps added, activations above all (the
  optimizer's state, created at the first step, is the same in both);
* ``estimate_mb``: ``igniter check``'s estimate of the saved activations for this batch
  (:class:`igniter.activation_memory.ActivationMeter`, one more forward of the plain model,
  after its peak was read);
* ``step_s``: median seconds per step after the first (the recomputation's cost).

Writes ``bench/results/activation_checkpointing.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("plain", "checkpointed")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one(variant: str, args: argparse.Namespace) -> dict:
    import torch

    from igniter.activation_memory import ActivationMeter
    from igniter.lm import causal_lm
    from igniter.parallel.strategy import checkpoint_activations, checkpointed_modules

    torch.manual_seed(0)
    model = causal_lm(256, block_size=args.seq, n_layer=args.layers, n_head=args.width // 64, n_embd=args.width)
    x = torch.randint(0, 256, (args.batch, args.seq))
    blocks = checkpointed_modules(model, ["GPT2Block"])
    if variant == "checkpointed":
        checkpoint_activations(model, ["GPT2Block"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = _rss_mb()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    estimate = None
    if variant == "plain":  # after the peak was read: the meter's own pass does not count
        with ActivationMeter(model, blocks) as meter:
            model(x).float().mean().backward()
        estimate = {"without": meter.without / 2**20, "with": meter.with_checkpointing / 2**20}
    return {
        "variant": variant,
        "peak_rss_mb": round(peak, 1),
        "rss_before_steps_mb": round(before, 1),
        "step_peak_mb": round(peak - before, 1),
        "step_s": round(statistics.median(times[1:] or times), 3),
        "estimate_mb": {k: round(v, 1) for k, v in estimate.items()} if estimate else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "activation_checkpointing.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--one", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("layers", "width", "seq", "batch", "steps")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    setup = {k: getattr(args, k) for k in ("layers", "width", "seq", "batch", "steps")}
    print(f"GPT-2 {setup}, CPU ({platform.processor() or platform.machine()}), one process per variant")
    print(f"{'variant':<14}{'peak RSS MB':>12}{'steps added MB':>16}{'s/step':>9}")
    for r in results:
        print(f"{r['variant']:<14}{r['peak_rss_mb']:>12.1f}{r['step_peak_mb']:>16.1f}{r['step_s']:>9.3f}")
    estimate = results[0]["estimate_mb"]
    print(
        f"igniter check's estimate of saved activations: {estimate['without']:.1f} MB without, "
        f"{estimate['with']:.1f} MB with"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
