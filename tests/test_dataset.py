"""Dataset layout and verification: every bad-input class gets a problem that names the file (issue 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnsnake.dataset import DatasetError, discover_cases, load_dataset_json, training_cases, verify_dataset

SHAPE = (6, 8, 7)  # z, y, x


def _write(
    path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None
) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


def make_dataset(root: Path, n_cases: int = 3, n_channels: int = 2) -> Path:
    """A tiny valid 3D dataset with two channels and labels {0, 1, 2}."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        for c in range(n_channels):
            _write(
                root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz",
                rng.normal(size=SHAPE).astype(np.float32) + 5,
            )
        seg = np.zeros(SHAPE, np.uint8)
        seg[2:4, 2:5, 2:4] = 1
        seg[4, 5, 5] = 2
        _write(root / "labelsTr" / f"case_{i:03d}.nii.gz", seg)
    dataset_json = {
        "channel_names": {str(c): f"MR{c}" for c in range(n_channels)},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(dataset_json))
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "Dataset900_Tiny")


def problems_of(root: Path) -> list[str]:
    report = verify_dataset(root, processes=1)
    return [str(p) for p in report.problems]


def assert_one_problem(root: Path, file_part: str, words: str) -> None:
    problems = problems_of(root)
    assert len(problems) == 1, problems
    assert file_part in problems[0], problems
    assert words in problems[0], problems
    assert "fix:" in problems[0]


def test_valid_dataset_has_no_problem(dataset: Path) -> None:
    report = verify_dataset(dataset, processes=2)
    assert report.ok and report.n_cases == 3
    dataset_json, cases = training_cases(dataset)
    assert list(cases) == ["case_000", "case_001", "case_002"]
    assert [p.name for p in cases["case_001"].images] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]


def test_missing_channel_file(dataset: Path) -> None:
    (dataset / "imagesTr" / "case_001_0001.nii.gz").unlink()
    assert_one_problem(dataset, "case_001_0001.nii.gz", "missing channel file")


def test_undeclared_channel_file(dataset: Path) -> None:
    _write(dataset / "imagesTr" / "case_001_0002.nii.gz", np.ones(SHAPE, np.float32))
    assert_one_problem(dataset, "case_001_0002.nii.gz", "not declared in channel_names")


def test_missing_label(dataset: Path) -> None:
    (dataset / "labelsTr" / "case_002.nii.gz").unlink()
    assert_one_problem(dataset, "labelsTr/case_002.nii.gz", "label file is missing")


def test_label_without_image(dataset: Path) -> None:
    _write(dataset / "labelsTr" / "case_009.nii.gz", np.zeros(SHAPE, np.uint8))
    assert_one_problem(dataset, "labelsTr/case_009.nii.gz", "label file has no image")


def test_label_shape_mismatch(dataset: Path) -> None:
    _write(dataset / "labelsTr" / "case_000.nii.gz", np.zeros((6, 8, 6), np.uint8))
    assert_one_problem(dataset, "labelsTr/case_000.nii.gz", "shape [6, 8, 6] differs from image")


def test_channel_shape_mismatch(dataset: Path) -> None:
    _write(dataset / "imagesTr" / "case_000_0001.nii.gz", np.ones((5, 8, 7), np.float32))
    assert_one_problem(dataset, "case_000_0001.nii.gz", "shape [5, 8, 7] differs from case_000_0000.nii.gz")


def test_spacing_mismatch(dataset: Path) -> None:
    _write(dataset / "labelsTr" / "case_001.nii.gz", np.zeros(SHAPE, np.uint8), spacing=(1.0, 1.0, 3.0))
    assert_one_problem(dataset, "labelsTr/case_001.nii.gz", "spacing")


def test_origin_mismatch(dataset: Path) -> None:
    _write(dataset / "labelsTr" / "case_001.nii.gz", np.zeros(SHAPE, np.uint8), origin=(10.0, 0.0, 0.0))
    assert_one_problem(dataset, "labelsTr/case_001.nii.gz", "origin/direction")


def test_direction_mismatch(dataset: Path) -> None:
    flipped = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    _write(dataset / "imagesTr" / "case_002_0001.nii.gz", np.ones(SHAPE, np.float32), direction=flipped)
    assert_one_problem(dataset, "case_002_0001.nii.gz", "origin/direction")


def test_undeclared_label_values(dataset: Path) -> None:
    seg = np.zeros(SHAPE, np.uint8)
    seg[0, 0, 0] = 7
    _write(dataset / "labelsTr" / "case_001.nii.gz", seg)
    assert_one_problem(dataset, "labelsTr/case_001.nii.gz", "label value(s) [7] are not declared")


def test_nan_and_inf_intensities(dataset: Path) -> None:
    image = np.ones(SHAPE, np.float32)
    image[0, 0, :2] = np.nan
    image[1, 1, 1] = np.inf
    _write(dataset / "imagesTr" / "case_000_0000.nii.gz", image)
    assert_one_problem(dataset, "case_000_0000.nii.gz", "contains 2 NaN and 1 inf")


def test_corrupt_file(dataset: Path) -> None:
    (dataset / "imagesTr" / "case_002_0000.nii.gz").write_bytes(b"\x1f\x8b this is not a nifti file")
    assert_one_problem(dataset, "case_002_0000.nii.gz", "unreadable or corrupt")


def test_truncated_label_file_is_reported_not_zero_filled(dataset: Path) -> None:
    """SimpleITK alone reads a truncated .nii.gz as if the lost voxels were 0 (background here): verify names it."""
    label = dataset / "labelsTr" / "case_001.nii.gz"
    content = label.read_bytes()
    label.write_bytes(content[: len(content) * 2 // 3])
    assert_one_problem(dataset, "labelsTr/case_001.nii.gz", "gzip data ends too early")


def test_nan_counts_come_from_the_one_read(dataset: Path, monkeypatch) -> None:
    """A .nii.gz is inflated once: its NaN/inf are counted from that read, nibabel does not open it again."""
    import nibabel

    def no_second_read(*args, **kwargs):
        raise AssertionError("the file was read a second time")

    monkeypatch.setattr(nibabel, "load", no_second_read)
    monkeypatch.setattr(nibabel.Nifti1Image, "from_bytes", no_second_read)
    test_nan_and_inf_intensities(dataset)


def test_num_training_mismatch(dataset: Path) -> None:
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    dataset_json["numTraining"] = 5
    (dataset / "dataset.json").write_text(json.dumps(dataset_json))
    assert_one_problem(dataset, "dataset.json", "numTraining is 5 but 3 cases were found")


def test_wrong_file_ending(dataset: Path) -> None:
    _write(dataset / "imagesTr" / "case_003_0000.nii", np.ones(SHAPE, np.float32))
    assert_one_problem(dataset, "case_003_0000.nii", "file ending is not the dataset's file_ending")


def test_bad_channel_file_name(dataset: Path) -> None:
    _write(dataset / "imagesTr" / "case_003.nii.gz", np.ones(SHAPE, np.float32))
    assert_one_problem(dataset, "imagesTr/case_003.nii.gz", "name does not follow")


def test_empty_dataset(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "Dataset901_Empty", n_cases=0)
    problems = problems_of(root)
    assert any("imagesTr" in p and "no training cases" in p for p in problems), problems


def test_missing_dataset_json(tmp_path: Path) -> None:
    problems = problems_of(tmp_path)
    assert len(problems) == 1 and "dataset.json" in problems[0] and "not found" in problems[0]
    with pytest.raises(DatasetError, match="dataset.json not found"):
        load_dataset_json(tmp_path)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"labels": {"background": 0, "a": [1, 2], "b": 2}}, "'regions_class_order' is missing"),
        (
            {"labels": {"background": 0, "a": [1, 2], "b": 2}, "regions_class_order": [1]},
            "must list one label per region ['a', 'b'] (2 entries",
        ),
        (
            {"labels": {"background": 0, "a": [1, 2], "b": 2}, "regions_class_order": [1, 7]},
            "paints region 'b' with 7, which is not a foreground label [1, 2]",
        ),
        ({"labels": {"background": 0, "a": [1, 4]}, "regions_class_order": [1]}, "'a' -> 4"),
        ({"labels": {"background": 0, "a": [1, "x"]}}, "a region must be a non-empty list of integer"),
        ({"labels": {"background": 0, "a": 1, "ignore": 5}}, "must be the highest label value, 2"),
        ({"labels": {"background": 0, "a": 1, "ignore": [2]}}, "the ignore label must be one integer"),
        (
            {"labels": {"background": 0, "a": [1, 2], "b": 2, "ignore": 2}, "regions_class_order": [1, 2]},
            "the ignore value 2 is part of ['a', 'b']",
        ),
        ({"labels": {"background": 0, "a": 2}}, "consecutive"),
        ({"labels": {"bg": 0, "a": 1}}, '"background": 0'),
        ({"file_ending": ".jpg"}, "lossy"),
        ({"file_ending": ".xyz"}, "not supported"),
    ],
)
def test_dataset_json_problems(dataset: Path, change: dict, words: str) -> None:
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    dataset_json.update(change)
    (dataset / "dataset.json").write_text(json.dumps(dataset_json))
    problems = problems_of(dataset)
    assert any("dataset.json" in p and words in p for p in problems), problems
    with pytest.raises(DatasetError, match="dataset.json"):
        load_dataset_json(dataset)


@pytest.mark.parametrize(
    "labels",
    [
        {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2]},
        {"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}},
        {"labels": {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, "regions_class_order": [1, 2]},
        {"labels": {"background": 0, "a": [1], "b": [2]}},  # one-element lists stay label mode
    ],
)
def test_regions_and_ignore_label_are_accepted(dataset: Path, labels: dict) -> None:
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    dataset_json.update(labels)
    (dataset / "dataset.json").write_text(json.dumps(dataset_json))
    assert problems_of(dataset) == []
    assert list(load_dataset_json(dataset)["labels"]) == list(labels["labels"])  # file order kept


def test_label_files_may_hold_the_ignore_label_but_nothing_undeclared(dataset: Path) -> None:
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "a": 1, "ignore": 2}
    (dataset / "dataset.json").write_text(json.dumps(dataset_json))
    seg = np.zeros(SHAPE, np.uint8)
    seg[0] = 2
    _write(dataset / "labelsTr" / "case_000.nii.gz", seg)
    assert problems_of(dataset) == []
    seg[1] = 3
    _write(dataset / "labelsTr" / "case_000.nii.gz", seg)
    assert_one_problem(dataset, "labelsTr/case_000.nii.gz", "label value(s) [3] are not declared")


def test_missing_required_key(dataset: Path) -> None:
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    del dataset_json["file_ending"]
    (dataset / "dataset.json").write_text(json.dumps(dataset_json))
    problems = problems_of(dataset)
    assert len(problems) == 1 and "'file_ending' is missing" in problems[0]


def test_every_problem_reported_in_one_run(dataset: Path) -> None:
    """Several broken files at once: all of them are reported, not just the first."""
    (dataset / "imagesTr" / "case_001_0001.nii.gz").unlink()
    (dataset / "labelsTr" / "case_002.nii.gz").unlink()
    seg = np.full(SHAPE, 9, np.uint8)
    _write(dataset / "labelsTr" / "case_000.nii.gz", seg)
    report = verify_dataset(dataset, processes=2)
    text = "\n".join(map(str, report.problems))
    assert len(report.problems) == 3, text
    for name in ("case_001_0001.nii.gz", "labelsTr/case_002.nii.gz", "labelsTr/case_000.nii.gz"):
        assert name in text
    with pytest.raises(DatasetError, match="3 problem"):
        report.raise_if_failed()


def test_dataset_key_layout(tmp_path: Path) -> None:
    """dataset.json may list each case's files instead of the folder layout (paths relative to the folder)."""
    root = make_dataset(tmp_path / "Dataset902_Listed", n_cases=2, n_channels=1)
    dataset_json = json.loads((root / "dataset.json").read_text())
    dataset_json["dataset"] = {
        f"case_{i:03d}": {
            "images": [f"imagesTr/case_{i:03d}_0000.nii.gz"],
            "label": f"labelsTr/case_{i:03d}.nii.gz",
        }
        for i in range(2)
    }
    cases, problems = discover_cases(root, dataset_json)
    assert not problems and sorted(cases) == ["case_000", "case_001"]


def test_png_dataset(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "Dataset903_Png"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(2):
        Image.fromarray(np.full((12, 10), 100 + i, np.uint8)).save(root / "imagesTr" / f"im{i}_0000.png")
        Image.fromarray(np.eye(12, 10, dtype=np.uint8)).save(root / "labelsTr" / f"im{i}.png")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "EM"},
                "labels": {"background": 0, "m": 1},
                "numTraining": 2,
                "file_ending": ".png",
            }
        )
    )
    assert verify_dataset(root).ok


def test_shared_datasets_verify(shared_data: Path) -> None:
    for name in ("Dataset009_SpleenCTCrop", "Dataset201_ISBI2012EM", "Dataset902_TotalSegExampleCT"):
        report = verify_dataset(shared_data / name)
        assert report.ok, report.problems


def test_integer_voxels_are_not_read_again_for_non_finite_values(tmp_path: Path, monkeypatch) -> None:
    """Only files SimpleITK reads as floating point (float voxels, or integers with a scale) can hold NaN/inf, so
    an integer file is not opened a second time; a scaled integer file is, and is finite."""
    import nibabel
    import SimpleITK as sitk

    from nnsnake.dataset import nonfinite_counts
    from nnsnake.imageio import read_file

    voxels = np.arange(120, dtype=np.int16).reshape(4, 5, 6)
    plain, scaled = tmp_path / "plain_0000.nii.gz", tmp_path / "scaled_0000.nii.gz"
    nibabel.save(nibabel.Nifti1Image(voxels, np.eye(4)), plain)
    image = nibabel.Nifti1Image(voxels, np.eye(4))
    image.header.set_slope_inter(2.0, 1.0)
    nibabel.save(image, scaled)
    scaled_array = read_file(scaled)[0]
    assert sitk.ReadImage(str(plain)).GetPixelID() == sitk.sitkInt16 and scaled_array.dtype == np.float32
    assert nonfinite_counts(scaled, scaled_array) == (0, 0)

    def no_second_read(*args, **kwargs):
        raise AssertionError("an integer file was read again")

    monkeypatch.setattr(nibabel, "load", no_second_read)
    assert nonfinite_counts(plain, read_file(plain)[0]) == (0, 0)


@pytest.mark.parametrize("ending", ["nii.gz", "nii"])
def test_non_finite_values_found_compressed_or_not(tmp_path: Path, ending: str) -> None:
    """SimpleITK reads NaN/inf as 0; the second read finds them in .nii.gz and .nii files."""
    import nibabel

    from nnsnake.dataset import nonfinite_counts
    from nnsnake.imageio import read_file

    voxels = np.ones((4, 5, 6), np.float32)
    voxels[0, 0, :3] = np.nan
    voxels[1, 1, 1] = -np.inf
    path = tmp_path / f"case_0000.{ending}"
    nibabel.save(nibabel.Nifti1Image(voxels, np.eye(4)), path)
    array = read_file(path)[0]
    assert not np.isnan(array).any()  # why the second read exists
    assert nonfinite_counts(path, array) == (3, 1)
