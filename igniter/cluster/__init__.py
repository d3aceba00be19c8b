"""Cluster submission: Hydra's submitit launchers, igniter's SLURM launcher
(``hydra/launcher=slurm``) and what igniter remembers of the jobs it submitted."""
