#!/bin/bash
# GPU prediction benchmark on the lent device machine (run from the repo root there; see benchmarks/gpu_bench.md).
# Needs the git-ignored, carried folder .gpupred/ prepared on the development machine:
#   whl/            nnunetv2 2.8.1 and the dependencies the device image lacks (cp312 / abi3 wheels)
#   sitk.tar.xz     SimpleITK 2.5.7 unpacked and xz-compressed (28 MB; its 53 MB wheel does not fit the carry)
#   anchor_pre/Dataset004_Hippocampus/{nnUNetPlans.json,dataset.json}   the anchor's plans
#   shared/data/Dataset004_Hippocampus/imagesTr/   the first 40 images
# Args: CASES REPEATS API_CASES THREADS [extra args for benchmarks/predict.py]
# With REPLICATE=N in the environment, the inputs are N copies of the 40 images under new case names (a longer run
# makes the per-case cost (T(N) - T(1)) / (N - 1) less noisy when a case takes tens of milliseconds).
set -o pipefail
CASES=${1:-40}; REPEATS=${2:-2}; API=${3:-10}; THREADS=${4:-16}; shift 4
OUT=${OUT:-/tmp/predict_bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L; python3 --version
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpupred/whl/*.whl || exit 1
  tar -xJf .gpupred/sitk.tar.xz -C /tmp/site || exit 1
  export PYTHONPATH=/tmp/site
  # benchmarks/common.py finds nnunetv2's python and CLI in $VENV/bin: wrappers around the image's python3
  mkdir -p /tmp/fv/bin
  printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/fv/bin/python
  printf '#!/bin/sh\nexec python3 -c "import sys; from nnunetv2.inference.predict_from_raw_data import predict_entry_point as m; sys.exit(m())" "$@"\n' \
    > /tmp/fv/bin/nnUNetv2_predict
  chmod +x /tmp/fv/bin/*
  python3 -c "import torch, SimpleITK, nnunetv2, psutil; print('torch', torch.__version__, torch.cuda.get_device_name(), 'SimpleITK', SimpleITK.__version__)" || exit 1
  SHARED_DIR=$PWD/.gpupred/shared
  if [ -n "$REPLICATE" ]; then
    SHARED_DIR=/tmp/replicated; dest=$SHARED_DIR/data/Dataset004_Hippocampus/imagesTr; mkdir -p $dest
    images=(.gpupred/shared/data/Dataset004_Hippocampus/imagesTr/*_0000.nii.gz)
    for ((i = 0; i < REPLICATE; i++)); do cp "${images[i % ${#images[@]}]}" $(printf "$dest/copy_%04d_0000.nii.gz" $i); done
  fi
  VENV=/tmp/fv NNSNAKE_SHARED=$SHARED_DIR python3 benchmarks/predict.py --device cuda --threads "$THREADS" \
    --cases "$CASES" --repeats "$REPEATS" --api "$API" --work /tmp/predict_bench --anchor-pre .gpupred/anchor_pre "$@"
} 2>&1 | tee "$OUT/log"
