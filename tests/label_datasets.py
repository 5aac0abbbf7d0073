"""Small region and ignore-label datasets derived from the embedded demo, for the end-to-end workflow tests.

The images are symbolic links to the demo's; only ``dataset.json`` and the label files are new. The derived
label maps keep the demo's geometry, so every other rule (verification, geometry checks) applies unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .conftest import REPO

DEMO = REPO / "examples" / "Dataset104_HippocampusDemo"

REGIONS_IGNORE_LABELS: dict[str, Any] = {
    "labels": {"background": 0, "hippocampus": [1, 2], "posterior": 2, "ignore": 3},
    "regions_class_order": [1, 2],
}
IGNORE_LABELS: dict[str, Any] = {"labels": {"background": 0, "Anterior": 1, "Posterior": 2, "ignore": 3}}


def sparse_slices(seg: np.ndarray, ignore: int = 3) -> np.ndarray:
    """Partial annotation: every second slice of the first axis is left unannotated (the ignore label)."""
    out = seg.copy()
    out[1::2] = ignore
    return out


def unannotated_border(seg: np.ndarray, ignore: int = 3) -> np.ndarray:
    """Partial annotation: a band of 4 voxels along the last axis is left unannotated (the ignore label)."""
    out = seg.copy()
    out[..., :4] = ignore
    return out


def derived_dataset(
    root: Path,
    labels: dict[str, Any],
    relabel: Callable[[np.ndarray], np.ndarray],
    source: Path = DEMO,
    n_cases: int | None = None,
    with_test_images: bool = True,
) -> Path:
    """A copy of ``source`` with new ``labels`` (and ``regions_class_order``) and label maps ``relabel(seg)``."""
    import SimpleITK as sitk

    dataset_json = json.loads((source / "dataset.json").read_text())
    dataset_json = {k: v for k, v in dataset_json.items() if k not in ("labels", "regions_class_order")}
    dataset_json.update(labels)
    label_files = sorted((source / "labelsTr").glob("*.nii.gz"))[:n_cases]
    dataset_json["numTraining"] = len(label_files)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for label_file in label_files:
        case = label_file.name.removesuffix(".nii.gz")
        (root / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(source / "imagesTr" / f"{case}_0000.nii.gz")
        image = sitk.ReadImage(str(label_file))
        seg = relabel(sitk.GetArrayFromImage(image)).astype(np.uint8)
        out = sitk.GetImageFromArray(seg)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(root / "labelsTr" / label_file.name), True)
    if with_test_images and (source / "imagesTs").is_dir():
        (root / "imagesTs").symlink_to(source / "imagesTs")
    for extra in ("nnsnake.yaml",):
        if (source / extra).exists():
            (root / extra).write_text((source / extra).read_text())
    (root / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return root


def two_fold_splits(dataset: Path, path: Path) -> Path:
    """A user splits file with 2 folds (every other case validates in fold 0, the rest in fold 1)."""
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (dataset / "labelsTr").glob("*.nii.gz"))
    splits = [{"train": [c for c in cases if c not in cases[k::2]], "val": cases[k::2]} for k in range(2)]
    path.write_text(json.dumps(splits))
    return path
