"""Parallel mechanics: how the model is wrapped (DDP, FSDP2) and how data is sharded across ranks."""
