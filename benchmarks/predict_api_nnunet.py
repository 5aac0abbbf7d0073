"""In-process nnunetv2 prediction time per case, all folds at once (run with the anchor venv's python).

    /tmp/venv-nnunet/bin/python benchmarks/predict_api_nnunet.py MODEL_DIR N_FOLDS THREADS DEVICE IMAGE [IMAGE ...]

Like ../shared/anchor/predict_api_timing.py, but with the folds ensembled: each case goes through
``nnUNetPredictor.predict_single_npy_array`` (preprocessing, sliding window with mirroring, resampling back,
argmax) in this process, images read beforehand. Prints one JSON line ``{"seconds": [...], "cpu_seconds": [...]}``
(the first case includes warm-up). DEVICE is cpu or cuda; on cuda everything stays on the GPU, nnunetv2's
default there.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


def main() -> None:
    model_dir, n_folds, threads, device = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        torch.device(sys.argv[4]),
    )
    files = sys.argv[5:]
    torch.set_num_threads(threads)
    cases = [SimpleITKIO().read_images([f]) for f in files]
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(
        model_dir, use_folds=tuple(range(n_folds)), checkpoint_name="checkpoint_final.pth"
    )
    wall, cpu = [], []
    for image, properties in cases:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        predictor.predict_single_npy_array(image, properties, None, None, False)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    print(json.dumps({"seconds": wall, "cpu_seconds": cpu}))


if __name__ == "__main__":
    main()
