"""Checkpoints: what they hold, where they live (local disk or object storage), their two formats
(one ``torch`` file, a ``torch.distributed.checkpoint`` directory) and how a run resumes from one."""
