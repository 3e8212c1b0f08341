"""Iteration-level scheduler (plain Python, no torch)."""
from orca_serve.scheduler.policies import make_policy
from orca_serve.scheduler.scheduler import Scheduler

__all__ = ["Scheduler", "make_policy"]
