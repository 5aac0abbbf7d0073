"""The nnU-Net v2 training loss (docs/method.md §5.3) and the validation pseudo-Dice counts (§5.6).

Label mode: cross-entropy + soft Dice (both weight 1) on every deep-supervision head, heads weighted
``1/2^k`` with the lowest-resolution head at 0. The Dice is nnU-Net's memory-efficient variant: softmax,
background dropped, intersection / prediction / reference sums over space (and batch with ``batch_dice``),
smoothing 1e-5, so the loss is negative (about -0.8 once the network segments well).

Region mode (dataset.json labels that are lists): BCE-with-logits + sigmoid soft Dice over every region channel.
The target is then the boolean region map built by the augmentation pipeline, with the ignore mask as an extra
last channel when the dataset has an ignore label.

The loss variants of nnU-Net's trainers (``training.loss``, docs/method.md §5.12): ``ce``
(nnUNetTrainerCELoss), ``dice`` (nnUNetTrainerDiceLoss), ``topk10`` (nnUNetTrainerTopk10Loss) and ``dice_topk10``
(nnUNetTrainerDiceTopK10Loss), with the same deep-supervision weights; combinations nnU-Net refuses (CE or
TopK with regions, Dice alone with an ignore label) are refused with a :class:`~nnsnake.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

LOSSES = ("dice_ce", "ce", "dice", "topk10", "dice_topk10")
TOPK_PERCENT = 10


def _soft_dice(
    probs: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor | None,
    batch_dice: bool,
    smooth: float,
) -> torch.Tensor:
    """``-mean((2I + s) / max(G + P + s, 1e-8))``; ``reference`` must already be masked (it carries no gradient)."""
    axes = tuple(range(2, probs.ndim))
    with torch.no_grad():
        sum_gt = reference.sum(axes, dtype=torch.float32)
    if mask is not None:
        probs = probs * mask
    intersect = (probs * reference).sum(axes, dtype=torch.float32)
    sum_pred = probs.sum(axes, dtype=torch.float32)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dice = (2 * intersect + smooth) / (sum_gt + sum_pred + smooth).clamp_min(1e-8)
    return -dice.mean()


def _label_dice(
    probs: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    batch_dice: bool,
    smooth: float,
    do_bg: bool,
) -> torch.Tensor:
    """Soft Dice of class probabilities (B, C, *sp) against an integer label map (B, 1, *sp) in [0, C)."""
    with torch.no_grad():
        onehot = torch.zeros_like(probs, dtype=torch.float32).scatter_(1, labels.long(), 1.0)
        if mask is not None:
            onehot *= mask
    if not do_bg:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    return _soft_dice(probs, onehot, mask, batch_dice, smooth)


class SoftDiceLoss(nn.Module):
    """Soft Dice of softmax probabilities; returns ``-mean(dice)`` over classes (and samples without batch Dice).

    ``loss_mask`` (B, 1, *sp), 1 where annotated, removes ignore-label voxels from all three sums.
    """

    def __init__(self, batch_dice: bool, smooth: float = 1e-5, do_bg: bool = False) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.do_bg = do_bg

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        target = _with_channel_axis(target, logits)
        probs = torch.softmax(logits.float(), dim=1)
        return _label_dice(probs, target, loss_mask, self.batch_dice, self.smooth, self.do_bg)


class DiceCELoss(nn.Module):
    """``CE + Dice`` with weights 1 each; voxels equal to ``ignore_label`` count in neither term.

    Softmax is computed once (as log-softmax) and shared by both terms, which is mathematically the same as
    nnU-Net's separate softmax and cross-entropy but one pass cheaper. CE is 0 if no voxel is annotated.
    """

    def __init__(
        self,
        batch_dice: bool,
        ignore_label: int | None = None,
        smooth: float = 1e-5,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
    ) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.ignore_label = ignore_label
        self.smooth = smooth
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _with_channel_axis(target, logits)
        if target.shape[1] != 1:
            raise ValueError(
                f"DiceCELoss expects a label map (B, 1, *spatial), got target shape {tuple(target.shape)}; "
                "region targets need build_loss(..., regions=...)"
            )
        target = target.long()
        log_probs = torch.log_softmax(logits.float(), dim=1)
        if self.ignore_label is None:
            mask = None
            target_dice = target
            ce = F.nll_loss(log_probs, target[:, 0])
        else:
            annotated = target != self.ignore_label
            mask = annotated.to(log_probs.dtype)
            target_dice = torch.where(annotated, target, 0)
            # Mean over annotated voxels, 0 when there are none; no host sync, so it stays compile-friendly.
            ce_sum = F.nll_loss(log_probs, target[:, 0], ignore_index=self.ignore_label, reduction="sum")
            ce = ce_sum / mask.sum().clamp_min(1.0)
        dice = _label_dice(log_probs.exp(), target_dice, mask, self.batch_dice, self.smooth, do_bg=False)
        return self.weight_ce * ce + self.weight_dice * dice


class DiceBCELoss(nn.Module):
    """Region mode: ``BCE-with-logits + sigmoid soft Dice`` (background kept, every channel is a region).

    ``target`` is (B, R, *sp) region membership, or (B, R + 1, *sp) with the ignore mask as the last channel when
    ``use_ignore_label``. With the mask, BCE is summed over regions and unmasked voxels and divided by the number
    of unmasked voxels, exactly as nnU-Net v2 does (so it is R times the per-element mean).
    """

    def __init__(
        self,
        batch_dice: bool,
        use_ignore_label: bool = False,
        smooth: float = 1e-5,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
    ) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.use_ignore_label = use_ignore_label
        self.smooth = smooth
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        regions, mask = _split_region_target(target, self.use_ignore_label)
        if regions.shape != logits.shape:
            raise ValueError(
                f"DiceBCELoss: logits {tuple(logits.shape)} and region target {tuple(regions.shape)} differ; "
                f"the target needs one channel per region{' plus the ignore channel' if self.use_ignore_label else ''}"
            )
        reference = regions.float() if mask is None else regions.float() * mask
        dice = _soft_dice(torch.sigmoid(logits), reference, mask, self.batch_dice, self.smooth)
        if mask is None:
            bce = F.binary_cross_entropy_with_logits(logits, regions.float())
        else:
            per_element = F.binary_cross_entropy_with_logits(logits, regions.float(), reduction="none")
            bce = (per_element * mask).sum() / mask.sum().clamp_min(1e-8)
        return self.weight_ce * bce + self.weight_dice * dice


class CrossEntropyLoss(nn.Module):
    """nnUNetTrainerCELoss: cross-entropy of a label map, the mean over annotated voxels.

    The one difference to nnU-Net: with no annotated voxel at all, torch's mean (nnU-Net's value) is NaN, which
    would poison every weight through the gradient; here the loss is 0 and has no gradient, as nnU-Net's DC+CE
    loss does in that case.
    """

    def __init__(self, ignore_label: int | None = None) -> None:
        super().__init__()
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = _label_target(target, logits, "CrossEntropyLoss")
        if self.ignore_label is None:
            return F.cross_entropy(logits.float(), labels)
        total = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_label, reduction="sum")
        return total / (labels != self.ignore_label).sum().clamp_min(1)


class TopKLoss(nn.Module):
    """nnUNetTrainerTopk10Loss: the mean of the ``k`` % largest voxel cross-entropies of the batch.

    The count is ``int(N * k / 100)`` with ``N`` every voxel of the batch, ignored ones included (their
    cross-entropy is 0, so they only enter the mean when fewer annotated voxels than that are left). At least one
    voxel is kept (nnU-Net's mean over none would be NaN, for batches of fewer than 10 voxels).
    """

    def __init__(self, k: float = TOPK_PERCENT, ignore_label: int | None = None) -> None:
        super().__init__()
        self.k = k
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = _label_target(target, logits, "TopKLoss")
        ignore_index = -100 if self.ignore_label is None else self.ignore_label
        per_voxel = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
        count = max(1, int(per_voxel.numel() * self.k / 100))
        return torch.topk(per_voxel.reshape(-1), count, sorted=False).values.mean()


class DiceLoss(nn.Module):
    """nnUNetTrainerDiceLoss: the memory-efficient soft Dice alone.

    Labels: softmax, background left out. Regions (``regions=True``): sigmoid, every region channel kept. No
    ignore label (nnU-Net's Dice-only trainer has no mask; :func:`build_loss` refuses the combination).
    """

    def __init__(self, batch_dice: bool, regions: bool = False, smooth: float = 1e-5) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.regions = regions
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.regions:
            if target.shape != logits.shape:
                raise ValueError(
                    f"DiceLoss: logits {tuple(logits.shape)} and region target {tuple(target.shape)} differ"
                )
            return _soft_dice(
                torch.sigmoid(logits.float()), target.float(), None, self.batch_dice, self.smooth
            )
        labels = _with_channel_axis(target, logits)
        probs = torch.softmax(logits.float(), dim=1)
        return _label_dice(probs, labels, None, self.batch_dice, self.smooth, do_bg=False)


class DiceTopKLoss(nn.Module):
    """nnUNetTrainerDiceTopK10Loss: soft Dice (softmax, background left out) + TopK cross-entropy, weights 1.

        nnU-Net uses its classic soft Dice here, ``(2TP + s) / max(2TP + FP + FN + s, 1e-8)``; since
        ``2TP + FP + FN = P + G`` that is the same value as the memory-efficient form used elsewhere. An ignore label
        masks the Dice as in DC+CE; TopK gets the ignore index (so it is 0 when no voxel is annotated, the value
    nnU-Net sets in that case).
    """

    def __init__(
        self, batch_dice: bool, ignore_label: int | None = None, k: float = TOPK_PERCENT, smooth: float = 1e-5
    ) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.ignore_label = ignore_label
        self.smooth = smooth
        self.topk = TopKLoss(k, ignore_label)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = _with_channel_axis(target, logits).long()
        probs = torch.softmax(logits.float(), dim=1)
        if self.ignore_label is None:
            dice = _label_dice(probs, labels, None, self.batch_dice, self.smooth, do_bg=False)
            return self.topk(logits, labels) + dice
        annotated = labels != self.ignore_label
        mask = annotated.to(probs.dtype)
        dice = _label_dice(
            probs, torch.where(annotated, labels, 0), mask, self.batch_dice, self.smooth, False
        )
        return self.topk(logits, labels) + dice  # ignored voxels add 0 to the TopK sum: 0 with none annotated


class DeepSupervisionLoss(nn.Module):
    """``sum_k w_k * loss(output_k, target_k)``; heads with weight 0 are not evaluated at all."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        weights = [float(w) for w in weights]
        if not any(w != 0 for w in weights):
            raise ValueError("DeepSupervisionLoss: at least one head weight must be non-zero")
        self.loss = loss
        self.weights = weights

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if not len(outputs) == len(targets) == len(self.weights):
            raise ValueError(
                f"DeepSupervisionLoss: {len(outputs)} outputs, {len(targets)} targets and "
                f"{len(self.weights)} weights do not match; build the targets with deep_supervision_scales"
            )
        total: torch.Tensor | None = None
        for weight, output, target in zip(self.weights, outputs, targets, strict=True):
            if weight == 0:
                continue
            term = weight * self.loss(output, target)
            total = term if total is None else total + term
        assert total is not None, "DeepSupervisionLoss: every weight is 0"
        return total


def check_loss_supported(name: str, has_regions: bool, has_ignore_label: bool) -> None:
    """Refuse what nnU-Net's loss trainers refuse, naming the setting: CE, TopK and Dice+TopK with regions (they
    assert label mode), Dice alone with an ignore label (it has no mask, and the ignore value breaks the one-hot)."""
    if name not in LOSSES:
        raise ConfigError(f"training.loss must be one of {list(LOSSES)} (got {name!r})")
    if has_regions and name in ("ce", "topk10", "dice_topk10"):
        raise ConfigError(
            f"training.loss {name!r} does not support region-based training (dataset.json labels with lists), "
            "as nnU-Net's trainer for it does not; use dice_ce or dice for this dataset or configuration"
        )
    if has_ignore_label and name == "dice":
        raise ConfigError(
            "training.loss 'dice' does not support an ignore label (dataset.json 'ignore'), as nnU-Net's "
            "nnUNetTrainerDiceLoss does not; use dice_ce, ce, topk10 or dice_topk10 for this dataset"
        )


def build_loss(
    batch_dice: bool,
    ignore_label: int | None,
    deep_supervision_weights: Sequence[float] | np.ndarray | None,
    regions: Sequence[Any] | None = None,
    loss: str = "dice_ce",
) -> nn.Module:
    """The training loss: Dice + CE for labels, Dice + BCE when ``regions`` is given (§5.3), or the variant
    named by ``loss`` (``ce``, ``dice``, ``topk10``, ``dice_topk10``; see :func:`check_loss_supported`).

    ``None`` weights give the plain single-output loss; otherwise one weight per deep-supervision head.
    """
    check_loss_supported(loss, regions is not None, ignore_label is not None)
    term: nn.Module
    if loss == "ce":
        term = CrossEntropyLoss(ignore_label)
    elif loss == "topk10":
        term = TopKLoss(TOPK_PERCENT, ignore_label)
    elif loss == "dice_topk10":
        term = DiceTopKLoss(batch_dice, ignore_label)
    elif loss == "dice":
        term = DiceLoss(batch_dice, regions=regions is not None)
    elif regions is not None:
        term = DiceBCELoss(batch_dice=batch_dice, use_ignore_label=ignore_label is not None)
    else:
        term = DiceCELoss(batch_dice=batch_dice, ignore_label=ignore_label)
    if deep_supervision_weights is None:
        return term
    return DeepSupervisionLoss(term, list(np.asarray(deep_supervision_weights, dtype=np.float64)))


def downsample_target_for_deep_supervision(
    target: torch.Tensor, scales: Sequence[Sequence[float]]
) -> list[torch.Tensor]:
    """One target per head: nearest-exact resize of (B, C, *sp) to ``round(shape * scale)`` (§5.3).

    Works for label maps (C = 1) and boolean region maps alike. Scale 1 returns the input itself (no copy).
    Shapes are rounded with Python's ``round`` as nnU-Net does.
    """
    spatial = target.shape[2:]
    results = []
    for scale in scales:
        if len(scale) != len(spatial):
            raise ValueError(
                f"deep-supervision scale {list(scale)} does not match the target's spatial shape {tuple(spatial)}"
            )
        if all(s == 1 for s in scale):
            results.append(target)
            continue
        size = [round(n * s) for n, s in zip(spatial, scale, strict=True)]
        # Labels are small integers: float32 holds them exactly, and nearest-exact only copies values.
        resized = F.interpolate(target.float(), size=size, mode="nearest-exact")
        results.append(resized.to(target.dtype))
    return results


@torch.no_grad()
def pseudo_dice_counts(
    logits_top: torch.Tensor,
    target: torch.Tensor,
    ignore_label: int | None = None,
    regions: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN of the hard prediction, summed over batch and space (§5.6), as int64 arrays.

    Labels: argmax against the label map, one entry per foreground class (C - 1), ``ignore_label`` voxels left
    out. Regions (``regions`` given): ``sigmoid > 0.5`` per channel against the region target, one entry per
    region; with an ignore label the target's last channel is the ignore mask.
    """
    if regions is not None:
        reference, mask = _split_region_target(target, ignore_label is not None)
        predicted = torch.sigmoid(logits_top.float()) > 0.5
        reference = reference.bool()
        if mask is not None:
            keep = mask.bool()
            predicted, reference = predicted & keep, reference & keep
        axes = [0, *range(2, logits_top.ndim)]
        tp = (predicted & reference).sum(axes)
        fp = (predicted & ~reference).sum(axes)
        fn = (~predicted & reference).sum(axes)
        tp_np, fp_np, fn_np = (t.cpu().numpy().astype(np.int64) for t in (tp, fp, fn))
        return tp_np, fp_np, fn_np
    target = _with_channel_axis(target, logits_top)
    num_classes = logits_top.shape[1]
    # max(dim).indices is ~10x faster than argmax(dim) over the channel axis on CPU; ties go to the lower class.
    prediction = logits_top.max(1).indices.reshape(-1)
    reference = target[:, 0].reshape(-1).long()
    if ignore_label is not None:
        keep = reference != ignore_label
        prediction, reference = prediction[keep], reference[keep]
    # Confusion matrix in one bincount: row = predicted class, column = reference class.
    flat = torch.bincount(prediction * num_classes + reference, minlength=num_classes**2)
    confusion = flat.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)
    true_positives = np.diag(confusion)
    false_positives = confusion.sum(1) - true_positives
    false_negatives = confusion.sum(0) - true_positives
    return true_positives[1:], false_positives[1:], false_negatives[1:]


def _split_region_target(
    target: torch.Tensor, has_ignore_channel: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Region map and float mask (1 = annotated, shape (B, 1, *sp)) from a region target."""
    if not has_ignore_channel:
        return target, None
    ignored = target[:, -1:].bool()
    return target[:, :-1], (~ignored).float()


def _label_target(target: torch.Tensor, logits: torch.Tensor, who: str) -> torch.Tensor:
    """The (B, *sp) long label map of a (B, 1, *sp) or (B, *sp) target."""
    target = _with_channel_axis(target, logits)
    if target.shape[1] != 1:
        raise ValueError(
            f"{who} expects a label map (B, 1, *spatial), got target shape {tuple(target.shape)}"
        )
    return target[:, 0].long()


def _with_channel_axis(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Accept (B, *sp) label maps as well as (B, 1, *sp)."""
    return target if target.ndim == logits.ndim else target.unsqueeze(1)
