"""Fingerprint, plans and preprocessing of region and ignore-label datasets equal nnunetv2 2.8.1's.

The datasets are built from ../shared/data by tests/fixtures/regions/make_datasets.py (BraTS as whole tumour /
tumour core / enhancing regions; sparsely annotated Hippocampus with an ignore label, as labels and as regions);
tests/fixtures/regions/make_reference.py stored nnunetv2's plans, fingerprints and summaries of its preprocessed
cases. The plan tests need only the fixtures; the others build the datasets and skip without the shared data.
Class locations are where region and ignore mode change preprocessing: which keys exist (regions as tuples, the
annotated key ``(-1, 0, 1, ..)``), how many voxels each holds and which ones were drawn (one RandomState over
the keys in order, so any difference in keys, order or enumeration changes the hashes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nnsnake.dataset import discover_cases, load_dataset_json, verify_dataset
from nnsnake.fingerprint import extract_fingerprint
from nnsnake.labels import LabelModel
from nnsnake.planning import plan_experiment
from nnsnake.preprocessing import load_case, preprocess_case, save_case

from .fixtures.regions.make_datasets import (
    BRATS_REGIONS_NAME,
    IGNORE,
    IGNORE_NAME,
    REGIONS_IGNORE_NAME,
    make_brats_regions_dataset,
    make_ignore_dataset,
    make_regions_ignore_dataset,
)
from .test_planning import assert_plans_equal_nnunetv2  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "regions"
DATASETS = [BRATS_REGIONS_NAME, IGNORE_NAME, REGIONS_IGNORE_NAME]
N_CASES = 20  # as make_reference.py built them


def reference(dataset: str, name: str) -> Any:
    return json.loads((FIXTURES / dataset / name).read_text())


def preprocessed_cases() -> list[tuple[str, str, str]]:
    return [
        (dataset, configuration, case)
        for dataset in DATASETS
        for configuration, cases in reference(dataset, "preprocessed.json").items()
        for case in cases
    ]


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def location_summary(class_locations: dict) -> dict:
    """Keys as nnU-Net's ``str(key)``, count, hash and first coordinates (as make_reference.py stores them)."""
    out = {}
    for key, coords in class_locations.items():
        coords = np.asarray(coords, dtype=np.int64)
        out[str(key)] = {
            "count": int(len(coords)),
            "sha256": sha256(coords) if len(coords) else None,
            "first": coords[:5].tolist(),
        }
    return out


@pytest.fixture(scope="session")
def region_datasets(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("region_datasets")
    return {
        BRATS_REGIONS_NAME: make_brats_regions_dataset(root, shared_data),
        IGNORE_NAME: make_ignore_dataset(root, shared_data, N_CASES),
        REGIONS_IGNORE_NAME: make_regions_ignore_dataset(root, shared_data, N_CASES),
    }


# ---- the fixtures themselves -------------------------------------------------------------------------------
def test_fixtures_cover_regions_and_ignore():
    """Guard against a regenerated fixture losing what it is for."""
    brats = LabelModel.from_dataset_json(reference(BRATS_REGIONS_NAME, "dataset.json"))
    assert brats.has_regions and not brats.has_ignore_label
    assert brats.class_location_keys == [(1, 2, 3, 4), (1, 3, 4), (4,)]
    ignore = LabelModel.from_dataset_json(reference(IGNORE_NAME, "dataset.json"))
    assert not ignore.has_regions and ignore.ignore_label == IGNORE
    both = LabelModel.from_dataset_json(reference(REGIONS_IGNORE_NAME, "dataset.json"))
    assert both.has_regions and both.ignore_label == IGNORE
    assert both.class_location_keys == [(1, 2), 2, (-1, 0, 1, 2)]
    for dataset in (IGNORE_NAME, REGIONS_IGNORE_NAME):
        for cases in reference(dataset, "preprocessed.json").values():
            for case in cases.values():
                counts = case["seg"]["value_counts"]
                assert {"-1", "0", "3"} <= set(counts), counts  # outside the mask, annotated, ignored
                assert case["class_locations"]["(-1, 0, 1, 2)"]["count"] > 0
    assert set(reference(BRATS_REGIONS_NAME, "preprocessed.json")) == {"2d", "3d_fullres"}


def test_built_datasets_are_the_fixtures_datasets(region_datasets):
    """The generator still builds what the references were made from (dataset.json in file order, labels)."""
    for dataset, root in region_datasets.items():
        assert (root / "dataset.json").read_text() == (FIXTURES / dataset / "dataset.json").read_text()
        assert list(json.loads((root / "dataset.json").read_text())["labels"]) == list(
            reference(dataset, "dataset.json")["labels"]
        )


@pytest.mark.parametrize("dataset", DATASETS)
def test_datasets_pass_verification(region_datasets, dataset):
    report = verify_dataset(region_datasets[dataset])
    assert not report.problems, report.problems
    assert load_dataset_json(region_datasets[dataset]) == reference(dataset, "dataset.json")


# ---- plans (fixtures only) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", DATASETS)
def test_plans_equal_nnunetv2(dataset):
    expected = reference(dataset, "nnUNetPlans.json")
    ours = plan_experiment(
        reference(dataset, "dataset_fingerprint.json"),
        reference(dataset, "dataset.json"),
        dataset,
        image_reader_writer=expected["image_reader_writer"],
    )
    assert_plans_equal_nnunetv2(ours, expected)


# ---- fingerprint and preprocessing (shared data) -----------------------------------------------------------------
@pytest.mark.shared
@pytest.mark.parametrize("dataset", DATASETS)
def test_fingerprint_equals_nnunetv2(region_datasets, dataset):
    """Ignore voxels count as foreground (``seg > 0``) for the intensity statistics, as in nnU-Net."""
    expected = reference(dataset, "dataset_fingerprint.json")
    ours = extract_fingerprint(region_datasets[dataset], processes=2)
    assert ours["spacings"] == expected["spacings"]
    assert ours["shapes_after_crop"] == expected["shapes_after_crop"]
    assert ours["median_relative_size_after_cropping"] == pytest.approx(
        expected["median_relative_size_after_cropping"], rel=1e-12
    )
    ref_props = expected["foreground_intensity_properties_per_channel"]
    assert sorted(ours["foreground_intensity_properties_per_channel"]) == sorted(ref_props)
    for channel, props in ours["foreground_intensity_properties_per_channel"].items():
        for key, value in ref_props[channel].items():
            tolerance = (
                1e-6 if key in ("mean", "std") else 1e-7
            )  # nnU-Net's float32 sums (test_fingerprint.py)
            assert props[key] == pytest.approx(value, rel=tolerance, abs=1e-9), (channel, key)


@pytest.mark.shared
@pytest.mark.parametrize(("dataset", "configuration", "case_id"), preprocessed_cases())
def test_preprocessing_equals_nnunetv2(region_datasets, tmp_path, dataset, configuration, case_id):
    raw = region_datasets[dataset]
    dataset_json = load_dataset_json(raw)
    plans = reference(dataset, "nnUNetPlans.json")
    files = discover_cases(raw, dataset_json)[0][case_id]
    _, seg, properties = preprocess_case(files.images, files.label, plans, configuration, dataset_json)
    expected = reference(dataset, "preprocessed.json")[configuration][case_id]

    assert list(seg.shape) == expected["seg"]["shape"]
    values, counts = np.unique(seg, return_counts=True)
    assert {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)} == expected["seg"][
        "value_counts"
    ]
    assert sha256(seg.astype(np.int8)) == expected["seg"]["sha256_int8"]
    for key, value in expected["properties"].items():
        assert np.asarray(properties[key], dtype=float).tolist() == np.asarray(value, dtype=float).tolist(), (
            key
        )
    locations = properties["class_locations"]
    assert [str(k) for k in locations] == [
        str(k) for k in LabelModel.from_dataset_json(dataset_json).class_location_keys
    ]
    assert location_summary(locations) == expected["class_locations"]

    # the store keeps them (tuple keys for regions, also single-element ones; the annotated key)
    save_case(tmp_path, case_id, np.zeros((1, *seg.shape[1:]), np.float32), seg, properties)
    stored = load_case(tmp_path, case_id)[2]["class_locations"]
    assert location_summary(stored) == expected["class_locations"]
