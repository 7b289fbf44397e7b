"""Diagnostics for simulation-based inference (placeholder, filled in below)."""
from sbiflows.diagnostics.c2st import C2STResult, c2st

__all__ = ["C2STResult", "c2st"]
