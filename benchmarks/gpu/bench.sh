#!/bin/bash
# Copied from the carried .gpubench/ folder of the 2026-11-22 run (see benchmarks/gpu_bench.md): the device
# command ran `bash .gpubench/bench.sh` with .gpubench/{whl,stub,nnsnake_pre,nnunet_pre} prepared on this machine.
# GPU benchmark entry point (run from the repo root on the device machine). Args: ITERATIONS WORKERS DEADLINE_S
set -o pipefail
ITERS=${1:-200}; WORKERS=${2:-12}; DEADLINE=${3:-270}
OUT=${OUT:-/tmp/gpubench_out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L; python3 --version
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpubench/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/.gpubench/stub
  rm -rf /tmp/gpubench_nnsnake_pre; mkdir -p /tmp/gpubench_nnsnake_pre
  cp -r .gpubench/nnsnake_pre/3d_fullres /tmp/gpubench_nnsnake_pre/3d_fullres
  cp -r .gpubench/nnsnake_pre/3d_fullres /tmp/gpubench_nnsnake_pre/2d
  cp .gpubench/nnsnake_pre/2d_json/*.json /tmp/gpubench_nnsnake_pre/2d/
  python3 -c "import torch, nnunetv2, blosc2, batchgeneratorsv2; print('torch', torch.__version__, torch.cuda.get_device_name())"
  python3 .gpubench/run_all.py cuda $ITERS $WORKERS $DEADLINE $OUT
} 2>&1 | tee $OUT/log
