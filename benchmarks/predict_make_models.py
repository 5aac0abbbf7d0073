"""Five fold checkpoints of one network, written for both tools (run with the anchor venv's python).

    /tmp/venv-nnunet/bin/python benchmarks/predict_make_models.py PLANS_JSON DATASET_JSON CONFIGURATION \
        NNUNET_MODEL_DIR NNSNAKE_RESULTS_DIR [N_FOLDS]

Prediction speed does not depend on what the weights learned, only on the architecture, so each fold gets the
network of the plans built by nnunetv2 itself with its own He initialisation (seed = fold). The same weights go
to both sides, so the two tools' segmentations can be compared as well as timed:

* ``NNUNET_MODEL_DIR/fold_k/checkpoint_final.pth`` in the layout ``nnUNetPredictor`` loads (``network_weights``,
  ``init_args.configuration``, ``trainer_name``, ``inference_allowed_mirroring_axes``), plus ``plans.json`` and
  ``dataset.json`` beside the folds;
* ``NNSNAKE_RESULTS_DIR/training/<configuration>/fold_k/model_final.pt``: the same tensors under nnsnake's
  parameter names (a plain dict of tensors and JSON-like metadata, loadable with ``weights_only=True``).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

# nnunetv2 PlainConvUNet parameter name -> nnsnake.network name (first match wins)
RENAMES = [
    (r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.conv\.", r"encoder.\1.\2.0."),
    (r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.norm\.", r"encoder.\1.\2.1."),
    (r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.conv\.", r"decoder.\1.\2.0."),
    (r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.norm\.", r"decoder.\1.\2.1."),
    (r"^decoder\.transpconvs\.(\d+)\.", r"upsamplers.\1."),
    (r"^decoder\.seg_layers\.(\d+)\.", r"heads.\1."),
]


def nnsnake_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename; drop the aliases nnunetv2's state dict repeats (``all_modules``, the decoder's encoder)."""
    out = {}
    for key, value in weights.items():
        if ".all_modules." in key or key.startswith("decoder.encoder."):
            continue
        for pattern, replacement in RENAMES:
            new, n = re.subn(pattern, replacement, key)
            if n:
                out[new] = value.clone()
                break
        else:
            raise KeyError(f"no nnsnake name for nnunetv2 parameter {key}")
    return out


def main() -> None:
    plans_path, dataset_json_path, configuration, nnunet_dir, nnsnake_dir = sys.argv[1:6]
    n_folds = int(sys.argv[6]) if len(sys.argv) > 6 else 5
    plans = json.loads(Path(plans_path).read_text())
    dataset_json = json.loads(Path(dataset_json_path).read_text())
    config = plans["configurations"][configuration]
    while "architecture" not in config:  # inherits_from
        config = {**plans["configurations"][config["inherits_from"]], **config}
        config.pop("inherits_from", None)
    arch = config["architecture"]
    n_in = len(dataset_json["channel_names"])
    n_out = len(dataset_json["labels"])
    mirror_axes = tuple(range(len(config["patch_size"])))
    nnunet_dir, nnsnake_dir = Path(nnunet_dir), Path(nnsnake_dir)
    nnunet_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(plans_path, nnunet_dir / "plans.json")
    shutil.copy(dataset_json_path, nnunet_dir / "dataset.json")
    for fold in range(n_folds):
        torch.manual_seed(fold)
        network = get_network_from_plans(
            arch["network_class_name"],
            arch["arch_kwargs"],
            arch["_kw_requires_import"],
            n_in,
            n_out,
            allow_init=True,
            deep_supervision=True,
        )
        weights = network.state_dict()  # aliases share storage, saved once as in a trained checkpoint
        (nnunet_dir / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(
            {
                "network_weights": weights,
                "trainer_name": "nnUNetTrainer",
                "init_args": {
                    "plans": plans,
                    "configuration": configuration,
                    "fold": fold,
                    "dataset_json": dataset_json,
                },
                "inference_allowed_mirroring_axes": mirror_axes,
                "current_epoch": 0,
            },
            nnunet_dir / f"fold_{fold}" / "checkpoint_final.pth",
        )
        target = nnsnake_dir / "training" / configuration / f"fold_{fold}"
        target.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "network_weights": nnsnake_state_dict(weights),
                "init": {
                    "configuration": configuration,
                    "fold": str(fold),
                    "num_input_channels": n_in,
                    "num_outputs": n_out,
                    "inference_allowed_mirroring_axes": list(mirror_axes),
                },
            },
            target / "model_final.pt",
        )
    print(f"wrote {n_folds} folds of {configuration} to {nnunet_dir} and {nnsnake_dir}")


if __name__ == "__main__":
    main()
