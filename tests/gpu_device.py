"""The device of the ``gpu``-marked tests: CUDA, or the CPU for a dry run of them.

``SBIFLOWS_GPU_TESTS_ON_CPU=1 python -m pytest -m gpu`` runs every ``gpu``-marked test on the CPU, so a change
that breaks one (a wrong assertion, a warning the suite turns into an error) shows on a machine without a GPU;
what only CUDA can show (a CPU tensor mixed into a CUDA computation) still needs the GPU
(``examples/gpu_check.sh``).
"""

from __future__ import annotations

import os

#: True when the ``gpu``-marked tests run on the CPU (``SBIFLOWS_GPU_TESTS_ON_CPU=1``).
DRY_RUN = os.environ.get("SBIFLOWS_GPU_TESTS_ON_CPU") == "1"
#: The device the ``gpu``-marked tests use.
GPU = "cpu" if DRY_RUN else "cuda"
