#!/usr/bin/env bash
# The checks to run on a machine with a CUDA GPU, as one script: pytest's gpu-marked tests, then training on
# the GPU against one CPU core of the same machine (examples/benchmark_npe_training.py, same rows and seed).
#
# Usage (from the repository root, the package and its dependencies importable):
#     OUT=runs/gpu bash examples/gpu_check.sh
# DEVICE=cpu SIMULATIONS=500 TEST_SIZE=200 runs the same steps without a GPU (a dry run of this script).
# Every step has a time limit, so whatever finished is in $OUT when the machine's time is short.
set -u
out=${OUT:-runs/gpu}
device=${DEVICE:-cuda}
simulations=${SIMULATIONS:-10000}
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/examples${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
bench=(python3 examples/benchmark_npe_training.py --simulations "$simulations" --seeds 0
       --test-size "${TEST_SIZE:-2000}")

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  nproc
} > "$out/machine.txt" 2>&1

# 1. The gpu-marked tests (the files that have them; -m gpu selects them and nothing else); the dry run runs
#    them on the CPU (tests/gpu_device.py).
[ "$device" = cpu ] && export SBIFLOWS_GPU_TESTS_ON_CPU=1
timeout 180 python3 -m pytest -p no:cacheprovider -m gpu -q -rs $(grep -l "mark.gpu" tests/*.py) \
  > "$out/pytest_gpu.log" 2>&1
echo "pytest exit $?" >> "$out/pytest_gpu.log"

# 2. One CPU core per task (in the background: the slow side) beside the GPU, same simulations and seed.
(timeout 330 "${bench[@]}" --task two_moons --settings "" --json "$out/train.jsonl" > "$out/cpu.log" 2>&1) &
(timeout 330 "${bench[@]}" --task slcp_distractors --settings "" --json "$out/train.jsonl" > "$out/cpu2.log" 2>&1) &
timeout 150 "${bench[@]}" --task two_moons --settings "device=$device" "device=$device,ensemble=5" \
  --json "$out/train.jsonl" > "$out/gpu.log" 2>&1
timeout 120 "${bench[@]}" --task slcp_distractors --settings "device=$device" --json "$out/train.jsonl" \
  >> "$out/gpu.log" 2>&1
timeout 100 "${bench[@]}" --task two_moons --settings "device=$device,compile=True" --json "$out/train.jsonl" \
  >> "$out/gpu.log" 2>&1
echo "gpu steps done $(date -u)" >> "$out/gpu.log"
wait
echo "all done $(date -u)" >> "$out/gpu.log"
