"""Training loss (docs/method.md §5.3) and validation pseudo-Dice counts (§5.6).

Hand-computed cases spell out their arithmetic; ``loss_reference.*`` holds nnunetv2's DC_and_CE_loss values on
fixed random tensors (see tests/fixtures/network/README.md).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnsnake.loss import (
    DeepSupervisionLoss,
    DiceCELoss,
    SoftDiceLoss,
    build_loss,
    downsample_target_for_deep_supervision,
    pseudo_dice_counts,
)
from nnsnake.network import deep_supervision_weights

SMOOTH = 1e-5
LN3 = math.log(3.0)


def two_class_logits(foreground: list[float]) -> torch.Tensor:
    """Background logit 0, so p_fg = sigmoid(foreground logit): ln3 -> 0.75, 0 -> 0.5, -ln3 -> 0.25."""
    fg = torch.tensor(foreground, dtype=torch.float32)
    return torch.stack([torch.zeros_like(fg), fg])[None]  # (1, 2, n)


# Sample A: p_fg = [0.75, 0.75, 0.5, 0.25], target [1, 0, 1, 0]
LOGITS_A = two_class_logits([LN3, LN3, 0.0, -LN3])
TARGET_A = torch.tensor([[[1, 0, 1, 0]]])
# I = 0.75 + 0.5 = 1.25, P = 0.75 + 0.75 + 0.5 + 0.25 = 2.25, G = 2
DICE_A = (2 * 1.25 + SMOOTH) / (2 + 2.25 + SMOOTH)
# CE = mean(-ln 0.75, -ln 0.25, -ln 0.5, -ln 0.75)
CE_A = (2 * math.log(4 / 3) + math.log(4) + math.log(2)) / 4
# Sample B: p_fg = 0.5 everywhere, target all 1: I = 2, P = 2, G = 4
LOGITS_B = two_class_logits([0.0, 0.0, 0.0, 0.0])
TARGET_B = torch.tensor([[[1, 1, 1, 1]]])
DICE_B = (2 * 2 + SMOOTH) / (4 + 2 + SMOOTH)
CE_B = math.log(2)


def test_soft_dice_single_sample_by_hand():
    loss = SoftDiceLoss(batch_dice=False)(LOGITS_A, TARGET_A)
    assert loss.item() == pytest.approx(-DICE_A, rel=1e-6)


def test_batch_dice_pools_sums_per_sample_dice_averages():
    logits = torch.cat([LOGITS_A, LOGITS_B])
    target = torch.cat([TARGET_A, TARGET_B])
    per_sample = SoftDiceLoss(batch_dice=False)(logits, target)
    assert per_sample.item() == pytest.approx(-(DICE_A + DICE_B) / 2, rel=1e-6)
    # batch: I = 1.25 + 2, P = 2.25 + 2, G = 2 + 4
    batch = SoftDiceLoss(batch_dice=True)(logits, target)
    assert batch.item() == pytest.approx(-(2 * 3.25 + SMOOTH) / (6 + 4.25 + SMOOTH), rel=1e-6)
    assert batch.item() != pytest.approx(per_sample.item(), rel=1e-3)


def test_dice_ce_by_hand():
    logits = torch.cat([LOGITS_A, LOGITS_B])
    target = torch.cat([TARGET_A, TARGET_B])
    value = DiceCELoss(batch_dice=False)(logits, target)
    ce = (CE_A * 4 + CE_B * 4) / 8  # mean over all 8 voxels
    assert value.item() == pytest.approx(ce - (DICE_A + DICE_B) / 2, rel=1e-6)
    # the (B, *spatial) target form is accepted too
    assert DiceCELoss(batch_dice=False)(logits, target[:, 0]).item() == pytest.approx(value.item(), rel=1e-7)


def test_ignore_label_excluded_from_dice_and_ce():
    # target [1, ignore, 1, 0] with ignore label 2 -> voxel 1 (p_fg 0.75) drops out of every sum:
    # I = 0.75 + 0.5 = 1.25, P = 0.75 + 0.5 + 0.25 = 1.5, G = 2; CE over voxels 0, 2, 3
    target = torch.tensor([[[1, 2, 1, 0]]])
    dice = (2 * 1.25 + SMOOTH) / (2 + 1.5 + SMOOTH)
    ce = (math.log(4 / 3) + math.log(2) + math.log(4 / 3)) / 3
    value = DiceCELoss(batch_dice=True, ignore_label=2)(LOGITS_A, target)
    assert value.item() == pytest.approx(ce - dice, rel=1e-6)


def test_no_annotated_voxel_gives_zero_ce_and_dice_of_smoothing_only():
    target = torch.full((1, 1, 4), 2)
    logits = LOGITS_A.clone().requires_grad_(True)
    value = DiceCELoss(batch_dice=True, ignore_label=2)(logits, target)
    assert value.item() == pytest.approx(-1.0, abs=1e-7)  # CE 0, dice = smooth / smooth
    value.backward()
    assert torch.isfinite(logits.grad).all() and torch.count_nonzero(logits.grad) == 0


def test_gradient_matches_separate_softmax_and_cross_entropy():
    """Sharing one log-softmax must not change the gradient of nnU-Net's separate CE and softmax Dice."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=gen)
    target = torch.randint(0, 5, (2, 1, 5, 6), generator=gen)  # 4 = ignore label

    def naive(x):
        mask = (target != 4).float()
        t = torch.where(target == 4, 0, target)
        p = torch.softmax(x, 1)
        y = F.one_hot(t[:, 0], 4).movedim(-1, 1).float() * mask
        inter, pred, gt = (
            (p[:, 1:] * y[:, 1:]).sum((2, 3)),
            (p[:, 1:] * mask).sum((2, 3)),
            y[:, 1:].sum((2, 3)),
        )
        dice = (2 * inter + SMOOTH) / (gt + pred + SMOOTH)
        return F.cross_entropy(x, target[:, 0], ignore_index=4) - dice.mean()

    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = DiceCELoss(batch_dice=False, ignore_label=4)(a, target)
    ref = naive(b)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def nnunet_reference(fixtures_dir):
    folder = fixtures_dir / "network"
    values = json.loads((folder / "loss_reference.json").read_text())
    with np.load(folder / "loss_reference.npz", allow_pickle=False) as data:
        arrays = {k: torch.from_numpy(data[k]) for k in data.files}
    return values, arrays


@pytest.mark.parametrize(
    ("key", "batch_dice", "ignore_label", "target_key"),
    [
        ("dice_ce_batch", True, None, "target"),
        ("dice_ce_per_sample", False, None, "target"),
        ("dice_ce_batch_ignore3", True, 3, "target_ignore3"),
        ("dice_ce_per_sample_ignore3", False, 3, "target_ignore3"),
    ],
)
def test_dice_ce_equals_nnunetv2(nnunet_reference, key, batch_dice, ignore_label, target_key):
    values, arrays = nnunet_reference
    ours = build_loss(batch_dice, ignore_label, None)(arrays["logits"], arrays[target_key])
    assert ours.item() == pytest.approx(values[key], rel=1e-5)


def test_all_ignored_batch_equals_nnunetv2(nnunet_reference):
    values, arrays = nnunet_reference
    target = torch.full_like(arrays["target"], 3)
    ours = DiceCELoss(batch_dice=True, ignore_label=3)(arrays["logits"], target)
    assert ours.item() == pytest.approx(values["dice_ce_batch_all_ignored"], abs=1e-7)


def test_deep_supervision_targets_and_loss_equal_nnunetv2(nnunet_reference):
    values, arrays = nnunet_reference
    scales = values["deep_supervision_scales"]
    targets = downsample_target_for_deep_supervision(arrays["target_ignore3"], scales)
    for k, t in enumerate(targets):
        expected = arrays[f"ds_target_{k}"]
        assert t.dtype == expected.dtype and t.shape == expected.shape  # (9,10,13)/4 -> round: 2, 2, 3
        assert torch.equal(t, expected)
    weights = deep_supervision_weights(len(scales))
    np.testing.assert_allclose(weights, values["deep_supervision_weights"])
    logits = [arrays[f"ds_logits_{k}"] for k in range(len(scales))]
    ours = build_loss(True, 3, weights)(logits, targets)
    assert ours.item() == pytest.approx(values["deep_supervision_batch_ignore3"], rel=1e-5)


def test_deep_supervision_loss_weights_heads_and_skips_zero_weight():
    calls = []

    def head_loss(output, target):
        calls.append(output.shape[-1])
        return (output - target).sum()

    weights = deep_supervision_weights(5)  # [8, 4, 2, 1, 0] / 15
    outputs = [torch.full((1, 1, 2**k), 1.0) for k in (4, 3, 2, 1, 0)]
    targets = [torch.zeros(1, 1, 2**k) for k in (4, 3, 2, 1, 0)]
    total = DeepSupervisionLoss(head_loss, weights)(outputs, targets)
    # head losses are the voxel counts 16, 8, 4, 2 (1 is never evaluated)
    assert total.item() == pytest.approx((8 * 16 + 4 * 8 + 2 * 4 + 1 * 2) / 15, rel=1e-7)
    assert calls == [16, 8, 4, 2]
    with pytest.raises(ValueError, match="do not match"):
        DeepSupervisionLoss(head_loss, weights)(outputs[:3], targets)
    with pytest.raises(ValueError, match="non-zero"):
        DeepSupervisionLoss(head_loss, [0, 0])


def test_downsample_target_nearest_exact_by_hand():
    # nearest-exact at scale 1/2 samples source index floor((i + 0.5) * 2) = 2i + 1
    target = torch.arange(16, dtype=torch.int16).reshape(1, 1, 4, 4)
    full, half = downsample_target_for_deep_supervision(target, [[1.0, 1.0], [0.5, 0.5]])
    assert full is target
    assert half.dtype == torch.int16
    assert half[0, 0].tolist() == [[5, 7], [13, 15]]
    # anisotropic scale and Python rounding of odd shapes: 5 * 0.5 = 2.5 -> 2, 7 * 0.5 = 3.5 -> 4
    (odd,) = downsample_target_for_deep_supervision(torch.zeros(2, 1, 5, 7, 3), [[0.5, 0.5, 1.0]])
    assert odd.shape == (2, 1, 2, 4, 3)
    with pytest.raises(ValueError, match="spatial shape"):
        downsample_target_for_deep_supervision(target, [[0.5, 0.5, 0.5]])


def test_pseudo_dice_counts_by_hand():
    # predicted [1, 1, 2, 0, 2], reference [1, 2, 2, 0, 3]; label 3 is ignored (voxel 4 drops out)
    predicted = torch.tensor([1, 1, 2, 0, 2])
    logits = F.one_hot(predicted, 3).T[None].float()  # (1, 3, 5)
    reference = torch.tensor([[[1, 2, 2, 0, 3]]])
    tp, fp, fn = pseudo_dice_counts(logits, reference, ignore_label=3)
    # class 1: voxel 0 TP, voxel 1 FP; class 2: voxel 2 TP, voxel 1 FN
    assert tp.tolist() == [1, 1] and fp.tolist() == [1, 0] and fn.tolist() == [0, 1]
    tp, fp, fn = pseudo_dice_counts(logits, torch.tensor([[[1, 2, 2, 0, 2]]]))
    assert tp.tolist() == [1, 2] and fp.tolist() == [1, 0] and fn.tolist() == [0, 1]


def test_pseudo_dice_counts_match_one_hot_definition():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 6, 7, 5, generator=gen)
    reference = torch.randint(0, 5, (3, 1, 6, 7, 5), generator=gen)  # 4 = ignore
    tp, fp, fn = pseudo_dice_counts(logits, reference, ignore_label=4)
    mask = (reference != 4).float()
    pred = F.one_hot(logits.argmax(1), 4).movedim(-1, 1).float() * mask
    ref = F.one_hot(torch.where(reference == 4, 0, reference)[:, 0], 4).movedim(-1, 1).float() * mask
    axes = (0, 2, 3, 4)
    np.testing.assert_array_equal(tp, (pred * ref).sum(axes)[1:].numpy())
    np.testing.assert_array_equal(fp, (pred * (1 - ref)).sum(axes)[1:].numpy())
    np.testing.assert_array_equal(fn, ((1 - pred) * ref).sum(axes)[1:].numpy())
    assert tp.dtype == np.int64 and tp.shape == (3,)
    # exact ties go to the lower class, as argmax does: all-zero logits predict background everywhere
    tp, fp, fn = pseudo_dice_counts(torch.zeros(1, 3, 4), torch.tensor([[[0, 1, 2, 2]]]))
    assert tp.tolist() == [0, 0] and fp.tolist() == [0, 0] and fn.tolist() == [1, 2]


def test_pseudo_dice_counts_equal_nnunetv2_validation_step(nnunet_reference):
    values, arrays = nnunet_reference
    counts = pseudo_dice_counts(arrays["logits"], arrays["target_ignore3"], ignore_label=3)
    assert [c.tolist() for c in counts] == values["pseudo_dice_labels_ignore3"]
    counts = pseudo_dice_counts(
        arrays["region_logits"], arrays["region_target_ignore"], ignore_label=3, regions=[[1, 2], [2]]
    )
    assert [c.tolist() for c in counts] == values["pseudo_dice_regions_ignore"]


@pytest.mark.parametrize(
    ("key", "batch_dice", "with_ignore"),
    [
        ("dice_bce_batch", True, False),
        ("dice_bce_per_sample", False, False),
        ("dice_bce_batch_ignore", True, True),
        ("dice_bce_per_sample_ignore", False, True),
    ],
)
def test_region_dice_bce_equals_nnunetv2(nnunet_reference, key, batch_dice, with_ignore):
    values, arrays = nnunet_reference
    target = arrays["region_target_ignore"]
    if not with_ignore:
        target = target[:, :-1]
    loss = build_loss(batch_dice, 3 if with_ignore else None, None, regions=[[1, 2], [2]])
    assert loss(arrays["region_logits"], target).item() == pytest.approx(values[key], rel=1e-5)


def test_region_dice_bce_by_hand():
    # one region, 4 voxels, logits [ln3, 0, -ln3, 0] -> p = [0.75, 0.5, 0.25, 0.5]; target [1, 1, 0, 0]
    logits = torch.tensor([[[LN3, 0.0, -LN3, 0.0]]])
    target = torch.tensor([[[True, True, False, False]]])
    # Dice (background kept): I = 1.25, P = 2.0, G = 2; BCE = mean(-ln .75, -ln .5, -ln .75, -ln .5)
    dice = (2 * 1.25 + SMOOTH) / (2 + 2.0 + SMOOTH)
    bce = (2 * math.log(4 / 3) + 2 * math.log(2)) / 4
    assert build_loss(True, None, None, regions=[[1]])(logits, target).item() == pytest.approx(
        bce - dice, rel=1e-6
    )
    # ignore channel masks voxel 3: I = 1.25, P = 1.5, G = 2; BCE summed over kept voxels / 3
    with_ignore = torch.cat([target, torch.tensor([[[False, False, False, True]]])], dim=1)
    dice = (2 * 1.25 + SMOOTH) / (2 + 1.5 + SMOOTH)
    bce = (2 * math.log(4 / 3) + math.log(2)) / 3
    value = build_loss(True, 9, None, regions=[[1]])(logits, with_ignore)
    assert value.item() == pytest.approx(bce - dice, rel=1e-6)
    with pytest.raises(ValueError, match="region"):
        build_loss(True, None, None, regions=[[1]])(logits, torch.cat([target, target], 1))


def test_region_targets_downsample_as_booleans():
    target = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    target[0, 1, 1::2, 1::2] = True
    _, half = downsample_target_for_deep_supervision(target, [[1.0, 1.0], [0.5, 0.5]])
    assert half.dtype == torch.bool and half.shape == (1, 3, 2, 2)
    assert half[0, 1].all() and not half[0, 0].any()


def test_region_deep_supervision_with_ignore_equals_nnunetv2(nnunet_reference):
    """Region targets (ignore channel last) downsampled per head and the weighted Dice + BCE, as nnunetv2."""
    values, arrays = nnunet_reference
    scales = values["deep_supervision_scales"]
    targets = downsample_target_for_deep_supervision(torch.as_tensor(arrays["region_target_ignore"]), scales)
    for k, t in enumerate(targets):
        expected = arrays[f"region_ds_target_{k}"]
        assert t.shape == expected.shape and torch.equal(t.bool(), expected.bool())
    weights = deep_supervision_weights(len(scales))
    logits = [arrays[f"region_ds_logits_{k}"] for k in range(len(scales))]
    loss = build_loss(True, 3, weights, regions=[[1, 2], [2]])
    assert loss(logits, targets).item() == pytest.approx(
        values["deep_supervision_regions_batch_ignore"], rel=1e-5
    )
