"""Hang supervision: every rank's progress, the watchdog that names a hung rank, and a timed-out
collective that names the ranks that did not join."""
