"""Sliding-window prediction, fold ensembling and export to raw geometry (docs/method.md §7.1–7.3, §9)."""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from nnsnake import inference
from nnsnake.errors import ConfigError
from nnsnake.inference import (
    compute_gaussian,
    convert_logits_to_raw_geometry,
    export_prediction,
    load_checkpoint,
    load_fold_networks,
    mirror_combinations,
    predict_from_raw,
    predict_sliding_window,
    sliding_window_steps,
)
from nnsnake.inference.export import export_probabilities_streamed
from nnsnake.labels import LabelModel

# --------------------------------------------------------------------------------------------------------------
# Gaussian and steps


def test_gaussian_matches_nnunetv2(fixtures_dir):
    reference = np.load(fixtures_dir / "inference" / "nnunetv2_gaussians.npz")
    assert len(reference.files) == 5
    for key in reference.files:
        patch = [int(s) for s in key.split("x")]
        ours = compute_gaussian(patch).numpy()
        assert ours.dtype == np.float16 and ours.shape == tuple(patch)
        np.testing.assert_array_equal(ours, reference[key], err_msg=key)


@pytest.mark.parametrize("patch", [(40, 56, 40), (7, 5, 9), (64, 64), (1, 3, 4)])
def test_gaussian_properties(patch):
    g16 = compute_gaussian(patch)
    g32 = compute_gaussian(patch, dtype=torch.float32)
    assert g16.dtype == torch.float16 and g32.dtype == torch.float32
    for g in (g16, g32):
        assert float(g.max()) == pytest.approx(10.0, rel=1e-3)
        assert float(g.min()) > 0
        centre = tuple(s // 2 for s in patch)
        assert float(g[centre]) == float(g.max())
        # symmetric about the centre voxel wherever the mirror image lies inside the patch
        for axis, size in enumerate(patch):
            c = size // 2
            k = min(c, size - 1 - c)
            lo = g.narrow(axis, c - k, k)
            hi = g.narrow(axis, c + 1, k)
            torch.testing.assert_close(lo, torch.flip(hi, [axis]), rtol=0, atol=0)


def test_gaussian_zero_tails_replaced_by_min_nonzero():
    # in fp16 the corners of a large patch underflow to 0 before the replacement
    g = compute_gaussian((128, 128, 128))
    assert float(g.min()) > 0
    raw = torch.from_numpy(np.array(inference._gaussian_map((128, 128, 128), 1 / 8, 10.0))).half()
    assert int((raw == 0).sum()) > 0
    assert float(g.min()) == float(raw[raw > 0].min())


def test_steps_match_nnunetv2(fixtures_dir):
    cases = json.loads((fixtures_dir / "inference" / "nnunetv2_steps.json").read_text())
    assert len(cases) == 9
    for case in cases:
        assert (
            sliding_window_steps(case["image_size"], case["patch_size"], case["step_size"]) == case["steps"]
        )


@pytest.mark.parametrize("dim", [3, 2])
@pytest.mark.parametrize("accumulation_dtype", [torch.float16, torch.float32])
def test_sliding_window_matches_nnunetv2_predictor(fixtures_dir, dim, accumulation_dtype):
    """Two folds of a conv net, mirroring on, 3d patch and 2d patch on 3D data; see make_reference.py."""
    reference = np.load(fixtures_dir / "inference" / "nnunetv2_sliding_window.npz")
    networks = []
    for fold in range(2):
        conv = (nn.Conv3d if dim == 3 else nn.Conv2d)(1, 3, 3, padding=1)
        conv.load_state_dict(
            {
                "weight": torch.from_numpy(reference[f"{dim}d_fold{fold}_weight"]),
                "bias": torch.from_numpy(reference[f"{dim}d_fold{fold}_bias"]),
            }
        )
        networks.append(conv)
    data, patch = reference[f"{dim}d_data"], [int(p) for p in reference[f"{dim}d_patch"]]
    ours = predict_sliding_window(
        networks, data, patch, tuple(range(dim)), accumulation_dtype=accumulation_dtype
    )
    error = (ours.float() - torch.from_numpy(reference[f"{dim}d_logits"]).float()).abs().amax(0)
    # total Gaussian weight per voxel: voxels reached only by tile corners have fp16-subnormal weights, where
    # nnU-Net's fp16 blending is coarse (its order of summation then decides); everywhere else fp16 precision
    spatial = data.shape[1:]
    weight = torch.zeros(spatial[-len(patch) :])
    gaussian = compute_gaussian(patch, dtype=torch.float32)
    for starts in itertools.product(*sliding_window_steps(spatial[-len(patch) :], patch)):
        weight[tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True))] += gaussian
    well_covered = (weight >= 1e-4).expand_as(error)
    assert float(well_covered.float().mean()) > 0.9
    assert float(error[well_covered].max()) < 0.01
    assert bool(torch.isfinite(ours).all())


def test_steps_formula():
    # n = ceil((size - patch) / (patch * step)) + 1, evenly spread, first 0, last flush
    assert sliding_window_steps([64], [64]) == [[0]]
    assert sliding_window_steps([110], [64]) == [[0, 23, 46]]
    assert sliding_window_steps([65], [64]) == [[0, 1]]
    for size, patch in [(300, 40), (97, 80), (1000, 37)]:
        (steps,) = sliding_window_steps([size], [patch])
        assert len(steps) == math.ceil((size - patch) / (patch * 0.5)) + 1
        assert steps[0] == 0 and steps[-1] == size - patch
        assert max(np.diff(steps)) <= patch * 0.5 + 1  # the float stride is <= patch/2 before rounding
    with pytest.raises(ValueError, match="smaller than the patch"):
        sliding_window_steps([30, 60], [32, 32])
    with pytest.raises(ValueError, match="step_size"):
        sliding_window_steps([64], [32], 0)


def test_mirror_combinations():
    assert mirror_combinations(None) == [()]
    assert mirror_combinations((0, 1)) == [(), (0,), (1,), (0, 1)]
    assert len(mirror_combinations((0, 1, 2))) == 8


# --------------------------------------------------------------------------------------------------------------
# sliding window


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class AddRamp(nn.Module):
    """Not flip-equivariant: adds the voxel index along one patch axis."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[self.axis + 2]
        shape = [1] * x.ndim
        shape[self.axis + 2] = n
        return x + torch.arange(n, dtype=x.dtype).reshape(shape)


class RecordingIdentity(Identity):
    def __init__(self) -> None:
        super().__init__()
        self.input_shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_shapes.append(tuple(x.shape))
        return x


@pytest.mark.parametrize(
    "shape, patch",
    [
        ((2, 9, 11, 7), (12, 12, 8)),  # smaller than the patch on every axis (odd padding)
        ((1, 40, 33, 21), (16, 12, 8)),  # larger, not multiples
        ((1, 16, 24, 8), (16, 12, 8)),  # exact multiples
        ((3, 37, 50), (16, 24)),  # 2D
        ((1, 5, 30), (8, 16)),  # 2D, padded on one axis only
    ],
)
def test_identity_network_recovers_input(shape, patch):
    data = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    exact = predict_sliding_window(Identity(), data, patch, accumulation_dtype=torch.float32)
    assert exact.shape == data.shape and exact.dtype == torch.float32
    torch.testing.assert_close(exact, data, rtol=1e-6, atol=1e-6)
    no_gaussian = predict_sliding_window(
        Identity(), data, patch, use_gaussian=False, tile_batch=1, accumulation_dtype=torch.float32
    )
    torch.testing.assert_close(no_gaussian, data, rtol=1e-6, atol=1e-6)
    fp16 = predict_sliding_window(
        Identity(), data.numpy(), patch, mirror_axes=tuple(range(len(patch))), use_gaussian=False
    )
    assert fp16.dtype == torch.float16
    torch.testing.assert_close(fp16.float(), data, rtol=2e-3, atol=2e-3)
    # nnU-Net's fp16 accumulators: where a voxel is covered only by tile corners its Gaussian weight is subnormal
    # in fp16 and the blended value coarse; elsewhere it is exact to fp16 precision
    fp16_gaussian = predict_sliding_window(Identity(), data, patch).float()
    close = torch.isclose(fp16_gaussian, data, rtol=2e-3, atol=2e-3)
    assert bool(torch.isfinite(fp16_gaussian).all()) and close.float().mean() > 0.9


def test_position_dependent_network_sees_padding_and_tiles():
    # AddRamp's output depends on where a voxel sits inside its tile, so a wrong tile offset, padding or crop-back
    # changes the result; with one tile and padding the expectation is easy to write down.
    data = torch.zeros((1, 6, 10))
    out = predict_sliding_window(
        AddRamp(0), data, (8, 10), use_gaussian=False, accumulation_dtype=torch.float32
    )
    # 6 rows padded to 8: one row above (odd extra goes below), so row i of the image is row i + 1 of the tile
    expected = (torch.arange(6, dtype=torch.float32) + 1)[:, None].expand(6, 10)
    torch.testing.assert_close(out[0], expected)


def test_mirroring_flip_equivariant_network_unchanged():
    torch.manual_seed(0)
    conv = nn.Conv3d(2, 3, 3, padding=1)
    with torch.no_grad():  # a kernel symmetric under every flip makes the conv flip-equivariant
        w = conv.weight
        w.copy_(
            (
                w
                + w.flip(2)
                + w.flip(3)
                + w.flip(4)
                + w.flip(2, 3)
                + w.flip(2, 4)
                + w.flip(3, 4)
                + w.flip(2, 3, 4)
            )
            / 8
        )
    data = torch.randn((2, 20, 17, 13))
    plain = predict_sliding_window(conv, data, (12, 10, 8), accumulation_dtype=torch.float32)
    mirrored = predict_sliding_window(
        conv, data, (12, 10, 8), mirror_axes=(0, 1, 2), accumulation_dtype=torch.float32
    )
    torch.testing.assert_close(mirrored, plain, rtol=1e-5, atol=1e-5)


def test_mirroring_averages_every_flip_combination():
    data = torch.zeros((1, 8, 6, 4))
    # one tile; the ramp along axis 1 is flipped back for combinations containing axis 1 -> mean of ramp and
    # reversed ramp = (n - 1) / 2 everywhere, while mirroring only axes 0 and 2 leaves the ramp as it is
    out = predict_sliding_window(
        AddRamp(1),
        data,
        (8, 6, 4),
        mirror_axes=(0, 1, 2),
        use_gaussian=False,
        accumulation_dtype=torch.float32,
    )
    torch.testing.assert_close(out, torch.full_like(data, 2.5))
    out = predict_sliding_window(
        AddRamp(1), data, (8, 6, 4), mirror_axes=(0, 2), use_gaussian=False, accumulation_dtype=torch.float32
    )
    torch.testing.assert_close(out[0, 0, :, 0], torch.arange(6, dtype=torch.float32))


@pytest.mark.parametrize("tile_batch", [1, 3, 8, 100])
def test_fold_average_and_batching_do_not_change_result(tile_batch):
    data = torch.randn((1, 30, 20, 10), generator=torch.Generator().manual_seed(1))
    nets = [Scale(1.0), Scale(3.0), AddRamp(2)]
    out = predict_sliding_window(
        nets, data, (16, 12, 8), mirror_axes=(1, 2), tile_batch=tile_batch, accumulation_dtype=torch.float32
    )
    one_by_one = [
        predict_sliding_window(
            n, data, (16, 12, 8), mirror_axes=(1, 2), tile_batch=1, accumulation_dtype=torch.float32
        )
        for n in nets
    ]
    torch.testing.assert_close(out, sum(one_by_one) / 3, rtol=1e-5, atol=1e-5)
    # AddRamp mirrored over axis 2 (length 8) adds 3.5 everywhere
    torch.testing.assert_close(out, (data * 4 + data + 3.5) / 3, rtol=1e-5, atol=1e-5)
    out += one_by_one[0]  # a normal tensor: ensembling code may accumulate into it in place


def test_2d_configuration_tiles_each_slice():
    net = RecordingIdentity()
    data = torch.randn((2, 5, 20, 9), generator=torch.Generator().manual_seed(2))
    out = predict_sliding_window(
        net, data, (16, 8), mirror_axes=(0, 1), tile_batch=4, accumulation_dtype=torch.float32
    )
    torch.testing.assert_close(out, data, rtol=1e-6, atol=1e-6)
    assert all(len(s) == 4 and s[1:] == (2, 16, 8) for s in net.input_shapes)  # (B, C, 16, 8): 2D patches
    n_tiles = (
        5 * len(sliding_window_steps([20, 9], [16, 8])[0]) * len(sliding_window_steps([20, 9], [16, 8])[1])
    )
    assert sum(s[0] for s in net.input_shapes) == n_tiles * 4  # every tile, each in 4 mirrorings


def test_inf_logits_are_an_error():
    data = torch.ones((1, 8, 8))
    with pytest.raises(RuntimeError, match="inf"):
        predict_sliding_window(Scale(1e5), data, (8, 8))  # 1e5 * gaussian max 10 overflows fp16
    out = predict_sliding_window(Scale(1e5), data, (8, 8), accumulation_dtype=torch.float32)
    torch.testing.assert_close(out, torch.full_like(data, 1e5))


def test_cpu_autocast_runs_in_bfloat16_and_stays_close():
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            out = self.conv(x)
            seen.append(out.dtype)
            return out

    torch.manual_seed(0)
    net = Probe()
    data = torch.randn((1, 20, 30))
    exact = predict_sliding_window(net, data, (16, 16), accumulation_dtype=torch.float32)
    assert seen[-1] == torch.float32  # nnU-Net's default: no autocast on the CPU
    fast = predict_sliding_window(net, data, (16, 16), accumulation_dtype=torch.float32, autocast=True)
    assert seen[-1] == torch.bfloat16
    torch.testing.assert_close(fast, exact, rtol=0, atol=0.02 * float(exact.abs().max()))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="mirror axes"):
        predict_sliding_window(Identity(), torch.zeros((1, 8, 8)), (8, 8), mirror_axes=(2,))
    with pytest.raises(ValueError, match="patch"):
        predict_sliding_window(Identity(), torch.zeros((1, 8, 8, 8, 8)), (8, 8))


# --------------------------------------------------------------------------------------------------------------
# checkpoints


TINY_ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 2,
        "features_per_stage": [4, 8],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [2, 2, 2]],
        "n_conv_per_stage": [1, 1],
        "n_conv_per_stage_decoder": [1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
DATASET_JSON = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "a": 1, "b": 2},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


def _config(spacing, patch, arch=TINY_ARCH):
    return {
        "data_identifier": "nnsnakeTest",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(patch),
        "median_image_size_in_voxels": list(patch),
        "spacing": list(spacing),
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "architecture": arch,
        "batch_dice": False,
    }


def _plans(transpose_forward=(2, 0, 1)):
    backward = [int(i) for i in np.argsort(transpose_forward)]
    arch_2d = json.loads(
        json.dumps(TINY_ARCH)
        .replace("Conv3d", "Conv2d")
        .replace("InstanceNorm3d", "InstanceNorm2d")
        .replace("[3, 3, 3]", "[3, 3]")
        .replace("[1, 1, 1]", "[1, 1]")
        .replace("[2, 2, 2]", "[2, 2]")
    )
    return {
        "dataset_name": "Dataset999_Geometry",
        "plans_name": "nnUNetPlans",
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose_forward),
        "transpose_backward": backward,
        "original_median_spacing_after_transp": [2.5, 0.8, 0.9],
        "original_median_shape_after_transp": [30, 20, 24],
        "configurations": {
            "3d_fullres": _config([2.0, 1.0, 1.0], [16, 16, 16]),
            "2d": _config([1.0, 1.0], [16, 16], arch_2d),
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 2.0,
                "mean": 1.0,
                "median": 1.0,
                "min": 0.0,
                "percentile_00_5": 0.0,
                "percentile_99_5": 2.0,
                "std": 0.5,
            }
        },
    }


def _tiny_network():
    from nnsnake.network import build_network

    torch.manual_seed(3)
    return build_network(TINY_ARCH, 1, 3, deep_supervision=True)


def test_load_fold_networks_roundtrip(tmp_path):
    plans = _plans()
    trained = _tiny_network()
    paths = []
    for fold in range(2):
        for p in trained.parameters():
            p.data.add_(0.1 * fold)
        path = tmp_path / f"fold_{fold}" / "model_final.pt"
        path.parent.mkdir()
        torch.save(
            {
                "network_weights": {f"_orig_mod.{k}": v for k, v in trained.state_dict().items()},
                "init": {"inference_allowed_mirroring_axes": [0, 1, 2]},
            },
            path,
        )
        paths.append(path)
    networks, mirror_axes = load_fold_networks(paths, plans, "3d_fullres", DATASET_JSON)
    assert mirror_axes == (0, 1, 2) and len(networks) == 2
    trained.set_deep_supervision(False)
    trained.eval()
    x = torch.randn((1, 1, 16, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(networks[1](x), trained(x))
        assert not torch.allclose(networks[0](x), trained(x))
    # on the CPU the weights are channels-last (faster oneDNN kernels); the sliding window hands the tiles over in
    # that layout and the result is the contiguous network's
    conv_weight = next(p for p in networks[1].parameters() if p.dim() == 5 and p.shape[1] > 1)
    assert conv_weight.is_contiguous(memory_format=torch.channels_last_3d) and not conv_weight.is_contiguous()
    data = torch.randn((1, 20, 18, 23))
    torch.testing.assert_close(
        predict_sliding_window(networks[1], data, (16, 16, 16), (0, 1, 2), accumulation_dtype=torch.float32),
        predict_sliding_window(trained, data, (16, 16, 16), (0, 1, 2), accumulation_dtype=torch.float32),
        rtol=1e-4,
        atol=1e-4,
    )
    bad = tmp_path / "bad.pt"
    torch.save({"state": {}}, bad)
    with pytest.raises(ValueError, match="network_weights"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="train this fold"):
        load_checkpoint(tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------------------------
# export to raw geometry


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = math.cos(ax), math.sin(ax), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


def _write_case(folder):
    """A raw case with anisotropic spacing (largest along SimpleITK x, so the plan transposes), a non-zero origin,
    a rotated direction, a zero border (so cropping happens) and two labelled blobs."""
    import SimpleITK as sitk

    shape = (20, 24, 30)  # numpy (z, y, x)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    image = np.zeros(shape, np.float32)
    image[2:18, 3:22, 4:27] = 1.0 + 0.01 * (xx + yy + zz)[2:18, 3:22, 4:27]
    seg = np.zeros(shape, np.uint8)
    seg[((zz - 9) / 5.0) ** 2 + ((yy - 11) / 6.0) ** 2 + ((xx - 10) / 4.0) ** 2 <= 1] = 1
    seg[((zz - 10) / 5.0) ** 2 + ((yy - 12) / 5.0) ** 2 + ((xx - 20) / 3.5) ** 2 <= 1] = 2
    geometry = {
        "spacing": (2.5, 0.9, 0.8),
        "origin": (-12.5, 40.0, 7.25),
        "direction": tuple(_rotation(0.35, 0.52).flatten()),
    }
    paths = {}
    for name, array in (("case_0000.nii.gz", image), ("case_seg.nii.gz", seg)):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(geometry["spacing"])
        img.SetOrigin(geometry["origin"])
        img.SetDirection(geometry["direction"])
        sitk.WriteImage(img, str(folder / name))
        paths[name] = folder / name
    return paths["case_0000.nii.gz"], paths["case_seg.nii.gz"], seg


def _read_array(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _assert_same_geometry(path_a, path_b):
    import SimpleITK as sitk

    a, b = sitk.ReadImage(str(path_a)), sitk.ReadImage(str(path_b))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_export_restores_raw_geometry_and_labels(tmp_path, configuration):
    from nnsnake.preprocessing import preprocess_case

    image_path, seg_path, seg_raw = _write_case(tmp_path)
    plans = _plans()
    data, seg, properties = preprocess_case(
        [str(image_path)], str(seg_path), plans, configuration, DATASET_JSON
    )
    assert list(properties["shape_before_cropping"]) == [30, 20, 24]  # transposed (x, z, y)
    if configuration == "3d_fullres":
        assert data.shape[1:] != tuple(properties["shape_after_cropping_and_before_resampling"])  # resampled
    labels = np.clip(np.asarray(seg[0]), 0, None)
    logits = torch.from_numpy(np.stack([(labels == k) for k in range(3)]).astype(np.float32) * 4 - 2).half()
    logits_before = logits.clone()
    written = export_prediction(
        logits,
        properties,
        plans,
        configuration,
        DATASET_JSON,
        tmp_path / "out" / "case",
        save_probabilities=True,
    )
    assert torch.equal(logits, logits_before)
    out = written["segmentation"]
    assert out.name == "case.nii.gz"
    _assert_same_geometry(out, image_path)
    predicted = _read_array(out)
    assert predicted.shape == seg_raw.shape
    assert np.mean(predicted == seg_raw) >= 0.99
    for label in (1, 2):
        dice = (
            2
            * np.sum((predicted == label) & (seg_raw == label))
            / (np.sum(predicted == label) + np.sum(seg_raw == label))
        )
        assert dice > 0.85, (label, dice)
    probabilities = np.load(written["probabilities"])["probabilities"]
    assert probabilities.shape == (3, *seg_raw.shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(0), predicted)
    assert probabilities[0, 0, 0, 0] == 1.0  # outside the crop: background with probability 1
    saved_properties = json.loads(written["properties"].read_text())
    assert saved_properties["bbox_used_for_cropping"] == [
        list(b) for b in properties["bbox_used_for_cropping"]
    ]
    # without probabilities the streamed argmax writes the same label map
    seg_only, none = convert_logits_to_raw_geometry(logits, properties, plans, configuration, DATASET_JSON)
    assert none is None
    np.testing.assert_array_equal(seg_only, predicted)
    assert torch.equal(logits, logits_before)


def test_export_matches_nnunetv2(fixtures_dir):
    """Same logits and case properties as nnunetv2's export (3d with separate-z resampling, 2d; labels and
    regions), see fixtures/inference/make_export_reference.py."""
    meta = json.loads((fixtures_dir / "inference" / "export_reference.json").read_text())
    arrays = np.load(fixtures_dir / "inference" / "export_reference.npz")
    assert len(meta["cases"]) == 4
    for key, case in meta["cases"].items():
        dataset_json = meta["datasets"][case["dataset"]]
        logits = torch.from_numpy(arrays[f"{key}_logits"])
        seg, probabilities = convert_logits_to_raw_geometry(
            logits,
            case["properties"],
            meta["plans"],
            case["configuration"],
            dataset_json,
            return_probabilities=True,
        )
        reference_seg = arrays[f"{key}_seg"]
        assert seg.shape == reference_seg.shape, key
        np.testing.assert_array_equal(seg, reference_seg, err_msg=key)
        np.testing.assert_allclose(
            probabilities, arrays[f"{key}_probabilities"], rtol=0, atol=1e-6, err_msg=key
        )
        streamed, _ = convert_logits_to_raw_geometry(
            logits, case["properties"], meta["plans"], case["configuration"], dataset_json
        )
        np.testing.assert_array_equal(streamed, reference_seg, err_msg=key)


def test_streamed_probabilities_equal_whole_array(fixtures_dir, tmp_path):
    """export_probabilities_streamed writes, class by class, exactly the probabilities (and label map) of the
    whole-array path, for labels (softmax through the scratch file) and regions (sigmoid)."""
    meta = json.loads((fixtures_dir / "inference" / "export_reference.json").read_text())
    arrays = np.load(fixtures_dir / "inference" / "export_reference.npz")
    for key in ("3d_fullres_labels", "3d_fullres_regions", "2d_labels"):
        case = meta["cases"][key]
        args = (case["properties"], meta["plans"], case["configuration"], meta["datasets"][case["dataset"]])
        logits = torch.from_numpy(arrays[f"{key}_logits"])
        seg, probabilities = convert_logits_to_raw_geometry(logits, *args, return_probabilities=True)
        path = tmp_path / f"{key}.npz"
        streamed_seg = export_probabilities_streamed(logits, *args, path)
        np.testing.assert_array_equal(streamed_seg, seg, err_msg=key)
        with np.load(path) as npz:
            assert npz.files == ["probabilities"]
            np.testing.assert_array_equal(npz["probabilities"], probabilities, err_msg=key)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch left


def _many_class_case(n_classes: int = 40):
    """Smooth logits of many classes at a coarse grid whose export resamples to 2x the voxels in-plane."""
    shape, cropped, raw = (12, 20, 20), [12, 40, 40], [14, 44, 42]
    grids = np.meshgrid(*[np.linspace(0, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    logits = np.stack(
        [np.sin((3 + k % 7) * grids[1] + k * grids[2] + grids[0] * k / 5) for k in range(n_classes)]
    )
    labels = {"background": 0, **{f"c{k}": k for k in range(1, n_classes)}}
    plans = {
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {"spacing": [1.0, 1.0, 1.0]}},
    }
    properties = {
        "spacing": [1.0, 0.5, 0.5],
        "shape_before_cropping": raw,
        "bbox_used_for_cropping": [[1, 13], [2, 42], [1, 41]],
        "shape_after_cropping_and_before_resampling": cropped,
    }
    return logits.astype(np.float32), properties, plans, {"labels": labels, "file_ending": ".nii.gz"}


def _traced_export_peaks(n_classes: int, tmp_path) -> tuple[int, int, int]:
    """Peak traced numpy allocation of the label-map export and of the streamed-probabilities export, after a
    whole-array run (which warms imports and caches and must agree exactly); and one raw channel's bytes."""
    import tracemalloc

    logits, properties, plans, dataset_json = _many_class_case(n_classes)
    args = (properties, plans, "3d_fullres", dataset_json)
    whole_seg, whole_probabilities = convert_logits_to_raw_geometry(logits, *args, return_probabilities=True)
    assert whole_probabilities is not None and len(np.unique(whole_seg)) > n_classes // 4
    tracemalloc.start()
    try:
        seg, _ = convert_logits_to_raw_geometry(logits, *args)
        _, peak_seg = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        streamed_seg = export_probabilities_streamed(logits, *args, tmp_path / "p.npz")
        _, peak_probabilities = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(seg, whole_seg)
    np.testing.assert_array_equal(streamed_seg, whole_seg)
    with np.load(tmp_path / "p.npz") as npz:
        np.testing.assert_array_equal(npz["probabilities"], whole_probabilities)
    return peak_seg, peak_probabilities, 4 * math.prod(properties["shape_before_cropping"])


def test_export_memory_is_bounded_by_a_few_channels(tmp_path):
    """Peak allocation of the export grows with the image, not with image x classes: 40 classes cost no more
    than 8 (within two channels), far below the 40 resampled channels of a whole-array export."""
    seg_8, probabilities_8, channel = _traced_export_peaks(8, tmp_path)
    seg_40, probabilities_40, _ = _traced_export_peaks(40, tmp_path)
    assert seg_40 < seg_8 + 2 * channel, (seg_8 / channel, seg_40 / channel)
    assert probabilities_40 < probabilities_8 + 2 * channel, (
        probabilities_8 / channel,
        probabilities_40 / channel,
    )
    assert max(seg_40, probabilities_40) < 12 * channel


def test_streamed_argmax_equals_argmax_with_ties():
    layout = LabelModel.from_dataset_json({"labels": {"background": 0, "a": 1, "b": 2, "c": 3}})
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 3, size=(4, 7, 9, 5)).astype(np.float32)  # many ties
    streamed = inference._segmentation_streaming(iter(list(logits)), layout, logits.shape[1:])
    np.testing.assert_array_equal(streamed, logits.argmax(0))


def test_regions_are_painted_in_order():
    dataset_json = {
        "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]},
        "regions_class_order": [1, 2, 3],
    }
    layout = LabelModel.from_dataset_json(dataset_json)
    assert (
        layout.has_regions
        and layout.num_outputs == 3
        and layout.foreground_regions == ((1, 2, 3), (2, 3), (3,))
    )
    logits = np.full((3, 4), -5.0, np.float32)
    logits[0, 1:] = 5  # whole in voxels 1..3
    logits[1, 2:] = 5  # core in 2..3
    logits[2, 3] = 5  # enhancing in 3
    seg = inference._segmentation_streaming(iter(list(logits)), layout, (4,))
    np.testing.assert_array_equal(seg, [0, 1, 2, 3])
    probabilities = inference._probabilities(logits.copy(), layout)
    np.testing.assert_array_equal(
        inference.segmentation_from_probabilities(probabilities, layout), [0, 1, 2, 3]
    )
    with pytest.raises(ValueError, match="regions_class_order"):
        LabelModel.from_dataset_json({"labels": dataset_json["labels"]})


def test_predict_from_raw_end_to_end(tmp_path):
    image_path, _, seg_raw = _write_case(tmp_path)
    plans = _plans()
    ckpt = tmp_path / "model_final.pt"
    torch.save({"network_weights": _tiny_network().state_dict(), "init": {}}, ckpt)
    out_dir = tmp_path / "pred"
    cases = {"case": [image_path], "copy": [image_path], "other": [image_path]}
    written = predict_from_raw(
        cases,
        out_dir,
        [ckpt, ckpt],
        plans,
        "3d_fullres",
        DATASET_JSON,
        save_probabilities=True,
        progress=False,
    )
    assert [w["segmentation"].name for w in written] == ["case.nii.gz", "copy.nii.gz", "other.nii.gz"]
    sequential = predict_from_raw(
        cases,
        tmp_path / "sequential",
        [ckpt, ckpt],
        plans,
        "3d_fullres",
        DATASET_JSON,
        overlap=False,
        progress=False,
    )
    for w, q in zip(written, sequential, strict=True):
        np.testing.assert_array_equal(_read_array(w["segmentation"]), _read_array(q["segmentation"]))
    broken = tmp_path / "broken_0000.nii.gz"
    broken.write_bytes(b"not an image")
    with pytest.raises(Exception, match="broken_0000"):
        predict_from_raw(
            {"case": [image_path], "broken": [broken]},
            tmp_path / "b",
            [ckpt],
            plans,
            "3d_fullres",
            DATASET_JSON,
            progress=False,
        )
    _assert_same_geometry(out_dir / "case.nii.gz", image_path)
    predicted = _read_array(out_dir / "case.nii.gz")
    assert set(np.unique(predicted)) <= {0, 1, 2}
    mtime = os.stat(out_dir / "case.nii.gz").st_mtime_ns
    again = predict_from_raw(
        [[image_path]],
        out_dir,
        [ckpt],
        plans,
        "3d_fullres",
        DATASET_JSON,
        save_probabilities=True,
        continue_prediction=True,
        progress=False,
    )
    assert again == [] and os.stat(out_dir / "case.nii.gz").st_mtime_ns == mtime


# --------------------------------------------------------------------------------------------------------------
# CUDA (run where a GPU is present)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_matches_cpu_and_falls_back_to_cpu_accumulation(monkeypatch):
    torch.manual_seed(0)
    network = _tiny_network()
    network.set_deep_supervision(False)
    data = torch.randn((1, 30, 21, 25))
    reference = predict_sliding_window(
        network, data, (16, 16, 16), (0, 1, 2), accumulation_dtype=torch.float32
    )
    network.cuda()
    on_gpu = predict_sliding_window(network, data, (16, 16, 16), (0, 1, 2), device="cuda")  # fp16 autocast
    assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.float16
    tolerance = 0.02 * float(reference.abs().max())

    def assert_close_enough(result):
        # fp16 autocast + fp16 accumulators: a few voxels covered only by tile corners (subnormal fp16 weights)
        # are coarse, as in nnU-Net; all others agree to fp16 precision
        error = (result.float() - reference).abs()
        assert bool(torch.isfinite(result).all())
        assert float((error <= tolerance).float().mean()) > 0.98
        assert float(error.median()) < tolerance / 10

    assert_close_enough(on_gpu)
    assert_close_enough(
        predict_sliding_window(
            network, data, (16, 16, 16), (0, 1, 2), device="cuda", accumulate_on_device=False
        )
    )
    real = inference._sliding_window_accumulate
    used = []

    def out_of_memory_on_gpu(*args, results_device, **kwargs):
        used.append(results_device.type)
        if results_device.type == "cuda":
            raise torch.OutOfMemoryError("simulated")
        return real(*args, results_device=results_device, **kwargs)

    monkeypatch.setattr(inference.sliding_window, "_sliding_window_accumulate", out_of_memory_on_gpu)
    fallback = predict_sliding_window(network, data, (16, 16, 16), (0, 1, 2), device="cuda")
    assert used == ["cuda", "cpu"]
    assert_close_enough(fallback)


class OneHotOfLastChannels(nn.Module):
    """Cascade stand-in: logits = background + the previous stage's one-hot channels appended to the image."""

    def __init__(self) -> None:
        super().__init__()
        self.n_channels_seen: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n_channels_seen.add(x.shape[1])
        foreground = x[:, 1:]
        background = 1 - foreground.sum(1, keepdim=True)
        return torch.cat([background, foreground], 1) * 10


def test_predict_preprocessed_cascade_and_next_stage(tmp_path):
    from nnsnake.preprocessing import preprocess_case, save_case

    image_path, seg_path, seg_raw = _write_case(tmp_path)
    plans = _plans()
    data, seg, properties = preprocess_case(
        [str(image_path)], str(seg_path), plans, "3d_fullres", DATASET_JSON
    )
    save_case(tmp_path / "pre", "case", data, seg, properties)
    next_shape = (40, 18, 22)
    save_case(
        tmp_path / "next",
        "case",
        np.zeros((1, *next_shape), np.float32),
        np.zeros((1, *next_shape), np.int8),
        properties,
    )
    network = OneHotOfLastChannels()
    written = inference.predict_preprocessed(
        tmp_path / "pre",
        ["case"],
        tmp_path / "val",
        network,
        plans,
        "3d_fullres",
        DATASET_JSON,
        mirror_axes=(0, 1, 2),
        save_probabilities=True,
        previous_stage_segs=lambda case_id: seg,
        next_stage=(tmp_path / "next", tmp_path / "next_out"),
        progress=False,
    )
    assert network.n_channels_seen == {3}  # image + one-hot of labels 1 and 2
    (out,) = written
    assert {k: p.name for k, p in out.items()} == {
        "segmentation": "case.nii.gz",
        "probabilities": "case.npz",
        "properties": "case.json",
        "next_stage": "case.npy",
    }
    _assert_same_geometry(out["segmentation"], image_path)
    assert (
        np.mean(_read_array(out["segmentation"]) == seg_raw) >= 0.99
    )  # the previous stage's labels come back
    next_seg = np.load(out["next_stage"])
    assert next_seg.shape == (1, *next_shape) and next_seg.dtype == np.uint8
    assert set(np.unique(next_seg)) == {0, 1, 2}


def test_cascade_one_hot_uses_foreground_labels_even_for_regions():
    regions = {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
        "regions_class_order": [1, 2, 3],
    }
    seg = np.array([[[-1, 0, 1, 2, 3]]], dtype=np.int8)
    one_hot = inference.one_hot_previous_stage(seg, regions)
    np.testing.assert_array_equal(one_hot[:, 0], [[0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]])
    plans = {"configurations": {"3d_lowres": {}, "3d_cascade_fullres": {"previous_stage": "3d_lowres"}}}
    assert inference.num_input_channels(plans, "3d_cascade_fullres", regions) == 4
    assert inference.num_input_channels(plans, "3d_lowres", regions) == 1


def test_parallel_passes_do_not_change_the_result():
    """CPU passes run side by side in threads; the sum keeps its order, so the result equals the serial one."""
    torch.manual_seed(0)
    networks = [
        nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1),
            nn.InstanceNorm3d(4, affine=True),
            nn.LeakyReLU(0.01),
            nn.Conv3d(4, 3, 1),
        ).eval()
        for _ in range(3)
    ]
    data = torch.randn(1, 14, 17, 12)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kwargs = dict(
            patch_size=(8, 8, 8), mirror_axes=(0, 1, 2), tile_batch=4, accumulation_dtype=torch.float32
        )
        serial = predict_sliding_window(networks, data, parallel_passes=1, **kwargs)
        parallel = predict_sliding_window(networks, data, parallel_passes=None, **kwargs)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous_threads)
    torch.testing.assert_close(parallel, serial, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# settings


def test_inference_settings_from_mapping_validates_and_names_the_key():
    settings = inference.InferenceSettings.from_mapping(
        {"mirroring": False, "step_size": 0.25, "tile_batch": 4}
    )
    assert (settings.mirroring, settings.step_size, settings.tile_batch, settings.device) == (
        False,
        0.25,
        4,
        "auto",
    )
    assert inference.InferenceSettings.from_mapping(None) == inference.InferenceSettings()
    assert settings.replace(threads=2).threads == 2 and settings.threads is None
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['use_mirroring'\].*known keys"):
        inference.InferenceSettings.from_mapping({"use_mirroring": False})
    for key, value in (
        ("step_size", 0),
        ("step_size", 1.5),
        ("autocast", "fp8"),
        ("tile_batch", 0),
        ("threads", 0),
    ):
        with pytest.raises(ConfigError, match=key):
            inference.InferenceSettings.from_mapping({key: value})
    with pytest.warns(DeprecationWarning, match="autocast True is deprecated"):
        assert inference.InferenceSettings.from_mapping({"autocast": True}).autocast is True


def test_loose_pipeline_keywords_still_work_with_a_deprecation_warning(tmp_path):
    image_path, _, _ = _write_case(tmp_path)
    ckpt = tmp_path / "model_final.pt"
    torch.save({"network_weights": _tiny_network().state_dict(), "init": {}}, ckpt)
    args = ({"case": [image_path]}, tmp_path / "old", [ckpt], _plans(), "3d_fullres", DATASET_JSON)
    with pytest.warns(DeprecationWarning, match=r"use_mirroring=\.\.\.\) is deprecated"):
        (old,) = predict_from_raw(*args, use_mirroring=False, progress=False)
    settings = inference.InferenceSettings(device="cpu", mirroring=False)
    (new,) = predict_from_raw(*args[:1], tmp_path / "new", *args[2:], settings=settings, progress=False)
    np.testing.assert_array_equal(_read_array(old["segmentation"]), _read_array(new["segmentation"]))
    with pytest.raises(TypeError, match="mirroring"):
        predict_from_raw(*args, mirroring=False)
