"""``igniter doctor``: what the launcher sees on this machine. Always exits 0.

igniter doctor          # a readable report
igniter doctor --json   # the same, machine-readable
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

from igniter.launch.environment import NoLauncher, Slurm, detect
from igniter.launch.runners import default_backend

__all__ = ["report", "main"]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpus() -> dict[str, Any]:
    """GPUs through NVML (nvidia-ml-py): name, memory (bytes), driver; or why there are none."""
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py is not installed (pip install nvidia-ml-py)", "devices": []}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded...
        return {"available": False, "reason": f"NVML cannot start: {e}", "devices": []}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            devices.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_total_bytes": int(mem.total),
                }
            )
        return {
            "available": bool(devices),
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "devices": devices,
            "reason": None if devices else "NVML sees no device",
        }
    finally:
        pynvml.nvmlShutdown()


def distributed_environment(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The launch mode the environment implies and its world size, rank and rendezvous,
    as :func:`igniter.launch.environment.detect` reads it.

    Args:
        env: the environment variables (``None``: ``os.environ``).
    """
    found = detect(env)
    if isinstance(found, NoLauncher):
        return {
            "mode": "none (runner=single or runner=spawn)",
            "world_size": 1,
            "rank": 0,
            "variables": found.variables(),
        }
    info: dict[str, Any] = {
        "mode": _MODES[found.name],
        "world_size": found.world_size,
        "rank": found.rank,
        "local_rank": found.local_rank,
        "master_addr": found.master_addr,
        "master_port": found.master_port,
        "variables": found.variables(),
    }
    if isinstance(found, Slurm):
        info["node_rank"] = found.node_rank
        if not found.in_step:
            info["mode"] = "inside sbatch but not srun: use `srun igniter ...`"
    return info


#: What ``igniter doctor`` calls each launch environment (and the runner it takes).
_MODES = {
    "slurm": "slurm (runner=slurm)",
    "torchrun": "torchrun (runner=torchrun)",
    "submitit-local": "submitit local (runner=slurm)",
}


def slurm_tools() -> dict[str, Any]:
    """Whether sbatch/srun are on PATH and which partition a job would go to."""
    info: dict[str, Any] = {"sbatch": shutil.which("sbatch"), "srun": shutil.which("srun"), "default_partition": None}
    if info["sbatch"] and shutil.which("sinfo"):
        try:
            out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=5)
            default = [p.rstrip("*") for p in out.stdout.split() if p.endswith("*")]
            info["default_partition"] = default[0] if default else None
            info["partitions"] = [p.rstrip("*") for p in out.stdout.split()]
        except (subprocess.TimeoutExpired, OSError) as e:
            info["error"] = f"sinfo did not answer: {e}"
    return info


def report() -> dict[str, Any]:
    """Everything ``igniter doctor`` prints, as a dict."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    nccl_version = None
    if cuda:
        try:
            nccl_version = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            nccl_version = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            p: _version(p)
            for p in (
                "torch",
                "pytorch-ignite",
                "hydra-core",
                "omegaconf",
                "submitit",
                "hydra-submitit-launcher",
                "nvidia-ml-py",
                "igniter",
            )
        },
        "cuda": {
            "available": cuda,
            "version": torch.version.cuda,
            "device_count": torch.cuda.device_count() if cuda else 0,
        },
        "nccl": {"available": dist.is_available() and dist.is_nccl_available(), "version": nccl_version},
        "gloo": {"available": dist.is_available() and dist.is_gloo_available()},
        "default_backend": default_backend(),
        "gpus": gpus(),
        "cpu_count": os.cpu_count(),
        "distributed": distributed_environment(),
        "slurm": slurm_tools(),
    }


def _lines(r: dict[str, Any]) -> list[str]:
    v = r["versions"]
    g = r["gpus"]
    d = r["distributed"]
    s = r["slurm"]
    gpu_lines = [f"    [{x['index']}] {x['name']}, {x['memory_total_bytes'] / 2**30:.1f} GiB" for x in g["devices"]]
    return [
        f"python    {r['python']} ({r['platform']}), {r['cpu_count']} CPUs",
        "versions  " + ", ".join(f"{k} {val or '-'}" for k, val in v.items()),
        f"cuda      {'available, CUDA ' + str(r['cuda']['version']) + ', ' + str(r['cuda']['device_count']) + ' device(s)' if r['cuda']['available'] else 'not available'}",
        f"nccl      {'available ' + str(r['nccl']['version'] or '') if r['nccl']['available'] and r['cuda']['available'] else 'not usable (no CUDA)'}",
        f"gloo      {'available' if r['gloo']['available'] else 'NOT available'}; default backend {r['default_backend']}",
        f"gpus      {('driver ' + str(g.get('driver'))) if g['available'] else 'none: ' + str(g['reason'])}",
        *gpu_lines,
        f"launch    {d['mode']}: world size {d['world_size']}, rank {d['rank']}"
        + (f", master {d.get('master_addr')}:{d.get('master_port')}" if d.get("master_addr") else ""),
        f"slurm     sbatch {'at ' + s['sbatch'] if s['sbatch'] else 'not found'}, srun {'at ' + s['srun'] if s['srun'] else 'not found'}"
        + (f", default partition {s['default_partition']}" if s.get("default_partition") else ""),
    ]


def main(argv: list[str]) -> int:
    """``igniter doctor [--json]``."""
    r = report()
    print(json.dumps(r, indent=2, default=str) if "--json" in argv else "\n".join(_lines(r)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
