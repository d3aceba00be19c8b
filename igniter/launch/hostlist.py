"""SLURM's compressed lists: host lists (``SLURM_JOB_NODELIST``) and task counts per node
(``SLURM_TASKS_PER_NODE``). Pure string parsing; :mod:`igniter.launch.environment`
reads the variables."""

from __future__ import annotations

import re

__all__ = ["expand_nodelist", "tasks_per_node"]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list expanded, in order: ``node[01-03,07],gpu5`` ->
    ``node01 node02 node03 node07 gpu5`` (zero padding kept; several bracket groups
    in one name give every combination, as ``scontrol show hostnames`` does).

    Raises:
        ValueError: an unbalanced bracket or a malformed range.
    """
    names, depth, start = [], 0, 0
    for i, c in enumerate(nodelist + ","):  # split on the commas outside brackets
        depth += (c == "[") - (c == "]")
        if depth < 0 or depth > 1:
            raise ValueError(f"malformed SLURM node list: {nodelist!r}")
        if c == "," and depth == 0:
            names.append(nodelist[start:i].strip())
            start = i + 1
    if depth:
        raise ValueError(f"malformed SLURM node list: {nodelist!r}")
    hosts: list[str] = []
    for name in filter(None, names):
        expanded = [""]
        for m in re.finditer(r"([^\[]*)(?:\[([^\]]*)\])?", name):
            literal, group = m.group(1), m.group(2)
            choices = [literal] if group is None else [literal + n for n in _numbers(group, nodelist)]
            expanded = [e + c for e in expanded for c in choices]
        hosts.extend(expanded)
    return hosts


def _numbers(group: str, nodelist: str) -> list[str]:
    """``01-03,07`` -> ``01 02 03 07`` (the width of the lower bound is kept)."""
    out = []
    for part in group.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"malformed range {part!r} in SLURM node list {nodelist!r}")
        out.extend(str(n).zfill(len(low)) for n in range(int(low), int(high or low) + 1))
    return out


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's ``2(x3),1`` -> ``[2, 2, 2, 1]``; ``[]`` if malformed."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return []
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts
