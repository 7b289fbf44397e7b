"""sbiflows: simulation-based inference with normalizing flows, built from first principles."""

__version__ = "0.1.0"
