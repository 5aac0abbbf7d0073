"""Trainer variants as settings (docs/method.md §5.12) against nnunetv2 2.8.1's trainer classes.

``fixtures/variants/reference.json`` and ``loss_inputs.npz`` come from ``fixtures/variants/make_reference.py``,
which runs nnU-Net's own trainers: loss values on fixed tensors, the learning rate of every epoch (warm-up
resume included), optimisers, training pipelines and mirror axes, probabilistic oversampling. The trainer-level
tests reuse test_training's tiny data and settings (a few iterations of a 3-stage U-Net).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nnsnake import training
from nnsnake.augmentation import deep_supervision_scales, training_pipeline
from nnsnake.errors import ConfigError
from nnsnake.inference import load_fold_networks
from nnsnake.jsonio import read_json
from nnsnake.labels import LabelModel
from nnsnake.loss import DeepSupervisionLoss, build_loss
from nnsnake.network import build_network, deep_supervision_weights
from nnsnake.sampling import PatchDataLoader, probabilistic_oversampling_p
from nnsnake.training import (
    SignatureMismatchError,
    TrainingSettings,
    build_optimizer,
    learning_rate,
    nnunet_trainer_name,
    signature_differences,
    training_mirror_axes,
    training_signature,
)

from .test_training import (
    CASES,
    CONFIGURATION,
    DATASET_JSON,
    PLANS,
    SPLITS,
    SimulatedKill,
    assert_same_weights,
    final_weights,
    kill_after_epoch,
    make_preprocessed,
    run,
    tiny_settings,
)

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "variants" / "reference.json").read_text())
INPUTS = dict(np.load(FIXTURES / "variants" / "loss_inputs.npz", allow_pickle=False))
HIPPOCAMPUS_PLANS = read_json(FIXTURES / "nnunetv2" / "Dataset004_Hippocampus" / "nnUNetPlans.json")
LABELS = {"background": 0, "a": 1, "b": 2}
DATASETS: dict[str, dict[str, Any]] = {
    "labels": {"labels": LABELS},
    "labels_ignore": {"labels": {**LABELS, "ignore": 3}},
    "regions": {"labels": {"background": 0, "whole": [1, 2], "inner": 2}, "regions_class_order": [1, 2]},
    "regions_ignore": {
        "labels": {"background": 0, "whole": [1, 2], "inner": 2, "ignore": 3},
        "regions_class_order": [1, 2],
    },
}
for _dataset in DATASETS.values():
    _dataset.update(channel_names={"0": "MRI"}, numTraining=2, file_ending=".nii.gz")


# ----------------------------------------------------------------------------------------------------------
# losses


def _loss_case(key: str) -> tuple[str, str, bool, bool]:
    loss, dataset, batch_dice, ds = key.split("|")
    return loss, dataset, batch_dice.endswith("1"), ds.endswith("1")


@pytest.mark.parametrize("key", sorted(REFERENCE["losses"]))
def test_loss_equals_nnunet_trainer_or_is_refused_like_it(key: str) -> None:
    loss_name, dataset, batch_dice, ds = _loss_case(key)
    expected = REFERENCE["losses"][key]
    labels = LabelModel.from_dataset_json(DATASETS[dataset])
    kwargs: dict[str, Any] = dict(
        batch_dice=batch_dice,
        ignore_label=labels.ignore_label,
        deep_supervision_weights=deep_supervision_weights(3) if ds else None,
        loss=loss_name,
    )
    if labels.regions is not None:
        kwargs["regions"] = labels.regions
    if isinstance(expected, str) or (loss_name == "dice" and dataset == "regions_ignore"):
        # nnU-Net asserts (CE/TopK with regions) or breaks (Dice alone with an ignore label; with regions + ignore
        # it even returns a number of a mangled one-hot); nnsnake refuses all of them up front
        with pytest.raises(ConfigError, match=r"training\.loss"):
            build_loss(**kwargs)
        return
    loss = build_loss(**kwargs)
    logits_key = "logits2" if dataset.startswith("regions") else "logits3"
    logits = [torch.from_numpy(INPUTS[f"{logits_key}_{k}"]) for k in range(3)]
    targets = [torch.from_numpy(INPUTS[f"{dataset}_{k}"]) for k in range(3)]
    value = loss(logits, targets) if ds else loss(logits[0], targets[0])
    assert isinstance(loss, DeepSupervisionLoss) == ds
    assert float(value) == pytest.approx(expected, rel=2e-6, abs=1e-6)


def test_deep_supervision_weights_of_every_loss_variant() -> None:
    for loss_name, weights in REFERENCE["ds_weights"].items():
        loss = build_loss(False, None, deep_supervision_weights(3), loss=loss_name)
        assert isinstance(loss, DeepSupervisionLoss)
        assert loss.weights == pytest.approx(weights, abs=1e-15), loss_name
        assert weights[-1] == 0


def test_all_ignored_cross_entropy_is_zero_where_nnunet_would_give_nan() -> None:
    logits = torch.randn(1, 3, 4, 4)
    target = torch.full((1, 1, 4, 4), 3)
    for name in ("ce", "topk10", "dice_topk10"):
        value = build_loss(False, 3, None, loss=name)(logits, target)
        assert torch.isfinite(value)
        if name != "dice_topk10":
            assert float(value) == 0.0


def test_unsupported_loss_names_the_dataset_setting() -> None:
    with pytest.raises(ConfigError, match="region-based"):
        build_loss(False, None, None, regions=[(1, 2), 2], loss="topk10")
    with pytest.raises(ConfigError, match="ignore label"):
        build_loss(False, 3, None, loss="dice")


# ----------------------------------------------------------------------------------------------------------
# learning rates and optimisers


@pytest.mark.parametrize("schedule", ["poly", "cosine", "warmup_poly"])
@pytest.mark.parametrize("epochs", [1000, 120])
def test_learning_rate_of_every_epoch_equals_nnunet(schedule: str, epochs: int) -> None:
    expected = REFERENCE["lrs"][f"{schedule}|{epochs}"]
    assert [learning_rate(schedule, e, epochs, 0.01) for e in range(epochs)] == expected


def test_schedules_at_the_spec_checkpoints() -> None:
    for schedule, checks in {
        "poly": {1: 9.991e-3, 500: 5.3589e-3, 999: 1.995e-5},
        "cosine": {1: 9.99998e-3, 500: 5e-3, 999: 2.47e-8},
        "warmup_poly": {0: 2e-4, 49: 1e-2, 51: 9.9905e-3, 500: 5.612e-3, 999: 2.09e-5},
    }.items():
        for epoch, value in checks.items():
            # the spec's values have 3 to 5 significant digits
            assert learning_rate(schedule, epoch, 1000) == pytest.approx(value, rel=2e-3), (schedule, epoch)


def test_warmup_resume_in_nnunet_continues_the_same_schedule_and_optimizer() -> None:
    """nnU-Net's warm-up trainer resumed after 30 (warm-up stage) or 70 epochs (poly stage) sets the rates of an
    uninterrupted run and restores the momentum; the optimiser it has when epoch 0 starts is the fresh one, kept
    (momentum and all) through the switch at epoch 50. nnsnake keeps one optimiser and restores its state on
    every resume, and its rates are a function of the epoch alone: the same behaviour."""
    lrs = REFERENCE["lrs"]
    uninterrupted = lrs["warmup_poly|120"]
    for start in (30, 70):
        assert lrs[f"warmup_poly|120|resumed_at_{start}"] == uninterrupted[start:]
        assert [learning_rate("warmup_poly", e, 120) for e in range(start, 120)] == uninterrupted[start:]
        assert lrs[f"warmup_poly|120|resumed_at_{start}|facts"]["momentum_restored"]
    facts = lrs["warmup_poly|1000|facts"]
    assert facts == {
        "new_optimizer_at_epoch_0": False,
        "same_optimizer_at_epoch_50": True,
        "momentum_kept_at_epoch_50": True,
    }
    assert lrs["warmup_poly|120|resumed_at_30|facts"]["momentum_kept_at_epoch_50"]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_class_and_hyperparameters_equal_nnunet(name: str) -> None:
    expected = dict(REFERENCE["optimizers"][name])
    cls, trainer = expected.pop("class"), expected.pop("trainer")
    optimizer = build_optimizer(TrainingSettings(optimizer=name), torch.nn.Linear(2, 2).parameters())
    assert isinstance(optimizer, getattr(torch.optim, cls)) and type(optimizer).__name__ == cls
    group = optimizer.param_groups[0]
    for key, value in expected.items():
        actual = group[key]
        assert (list(actual) if isinstance(actual, tuple) else actual) == value, key
    assert nnunet_trainer_name(TrainingSettings(optimizer=name)) == (trainer, True)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_steps_and_state_equal_the_torch_class(name: str) -> None:
    """The subclass that skips torch's dynamo wrappers updates weights bit for bit like the torch class, and the
    state dicts load into each other (a checkpoint of either resumes in the other)."""
    settings = TrainingSettings(optimizer=name)
    torch_class = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    kwargs = {"sgd": {"momentum": 0.99, "nesterov": True}, "adam": {}, "adamw": {"amsgrad": True}}[name]
    torch.manual_seed(0)
    ours_net, theirs_net = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    theirs_net.load_state_dict(ours_net.state_dict())
    ours = build_optimizer(settings, ours_net.parameters())
    theirs = torch_class(
        theirs_net.parameters(), lr=settings.initial_lr, weight_decay=settings.weight_decay, **kwargs
    )
    for step in range(4):
        x = torch.randn(5, 4)
        for net, optimizer in ((ours_net, ours), (theirs_net, theirs)):
            optimizer.zero_grad(set_to_none=True)
            (net(x) ** 2).mean().backward()
            optimizer.param_groups[0]["lr"] = settings.initial_lr * (1 - step / 10)
            optimizer.step()
        for a, b in zip(ours_net.parameters(), theirs_net.parameters(), strict=True):
            assert torch.equal(a, b)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state["param_groups"] == theirs_state["param_groups"]
    for key, state in ours_state["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs_state["state"][key][field]))
    fresh = build_optimizer(settings, torch.nn.Linear(4, 3).parameters())
    fresh.load_state_dict(theirs_state)
    assert fresh.state_dict()["param_groups"] == theirs_state["param_groups"]
    assert type(pickle.loads(pickle.dumps(ours))) is type(ours)  # the class is found by its module name


def test_optimizer_does_not_import_dynamo() -> None:
    """torch's optimiser wrappers import torch._dynamo (1.2 s per training process); ours must not."""
    code = (
        "import sys, torch\n"
        "from nnsnake.training.settings import TrainingSettings\n"
        "from nnsnake.training.variants import build_optimizer\n"
        "for name in ('sgd', 'adam', 'adamw'):\n"
        "    net = torch.nn.Linear(2, 2)\n"
        "    opt = build_optimizer(TrainingSettings(optimizer=name), net.parameters())\n"
        "    opt.zero_grad(); net(torch.ones(1, 2)).sum().backward()\n"
        "    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)\n"
        "    opt.step(); opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr


# ----------------------------------------------------------------------------------------------------------
# augmentation, mirroring, deep supervision, oversampling


@pytest.mark.parametrize("key", sorted(REFERENCE["pipelines"]))
def test_training_pipeline_and_mirror_axes_equal_nnunet(key: str) -> None:
    variant, configuration, dataset = key.split("|")
    expected = REFERENCE["pipelines"][key]
    config = HIPPOCAMPUS_PLANS["configurations"][configuration]
    patch = config["patch_size"]
    deep_supervision = variant != "no_deep_supervision"
    augmentation = variant if variant in ("none", "no_mirroring") else "default"
    scales = deep_supervision_scales(config["architecture"]["arch_kwargs"]["strides"])
    sampling_patch, transforms = training_pipeline(
        augmentation,
        patch,
        scales if deep_supervision else None,
        config["use_mask_for_norm"],
        False,
        LabelModel.from_dataset_json(DATASETS[dataset]),
    )
    names = [
        f"{type(t).__name__}({type(t.transform).__name__})" if hasattr(t, "transform") else type(t).__name__
        for t in transforms.transforms
    ]
    assert names == expected["transforms"]
    assert list(sampling_patch) == expected["initial_patch_size"]
    axes = training_mirror_axes(augmentation, patch)
    assert list(axes) == (expected["mirror_axes"] or [])
    assert list(axes) == (expected["inference_allowed_mirroring_axes"] or [])


def test_probabilistic_oversampling_probability_equals_nnunet() -> None:
    for batch_size, p in REFERENCE["probabilistic_oversampling"].items():
        assert probabilistic_oversampling_p(int(batch_size)) == p
    assert probabilistic_oversampling_p(58) == 19 / 58


def test_probabilistic_loader_forces_each_sample_with_probability_p() -> None:
    def loader(p: float, probabilistic: bool) -> PatchDataLoader:
        return PatchDataLoader(
            ["a"],
            lambda case: (np.zeros((1, 4, 4, 4), np.float32), np.zeros((1, 4, 4, 4), np.int8), {}),
            2,
            [4, 4, 4],
            oversample_foreground_percent=p,
            probabilistic_oversampling=probabilistic,
            seed=3,
        )

    last_k = loader(0.33, False)
    assert [last_k.force_foreground(i) for i in range(2)] == [False, True]
    sampled = loader(0.5, True)
    with sampled._random_state.active():  # type: ignore[union-attr]
        draws = [sampled.force_foreground(0) for _ in range(4000)]
    assert abs(np.mean(draws) - 0.5) < 0.03
    assert not any(loader(0.0, True).force_foreground(1) for _ in range(50))


# ----------------------------------------------------------------------------------------------------------
# settings, trainer names, signature


def test_bad_variant_values_are_config_errors_naming_the_key() -> None:
    for key, value in [
        ("loss", "focal"),
        ("optimizer", "rmsprop"),
        ("lr_schedule", "step"),
        ("augmentation", "da5"),
        ("deep_supervision", "no"),
        ("probabilistic_oversampling", 1),
        ("oversample_foreground_percent", 1.5),
    ]:
        with pytest.raises(ConfigError, match=key):
            TrainingSettings.from_mapping({key: value})


def test_nnunet_trainer_names() -> None:
    def name(**kw: Any) -> tuple[str, bool]:
        return nnunet_trainer_name(TrainingSettings(**kw))

    assert name() == ("nnUNetTrainer", True)
    assert name(loss="topk10") == ("nnUNetTrainerTopk10Loss", True)
    assert name(loss="dice_topk10") == ("nnUNetTrainerDiceTopK10Loss", True)
    assert name(lr_schedule="warmup_poly") == ("nnUNetTrainer_warmup", True)
    assert name(lr_schedule="cosine") == ("nnUNetTrainerCosAnneal", True)
    assert name(augmentation="none") == ("nnUNetTrainerNoDA", True)
    assert name(deep_supervision=False) == ("nnUNetTrainerNoDeepSupervision", True)
    assert name(probabilistic_oversampling=True) == ("nnUNetTrainer_probabilisticOversampling", True)
    assert name(optimizer="adamw", initial_lr=1e-3) == ("nnUNetTrainerAdam1en3", True)
    assert name(optimizer="adam", initial_lr=3e-4) == ("nnUNetTrainerVanillaAdam3en4", True)
    assert name(epochs=1) == ("nnUNetTrainer_1epoch", True)
    assert name(epochs=250, augmentation="no_mirroring") == ("nnUNetTrainer_250epochs_NoMirroring", True)
    # no nnU-Net class trains these; the name that builds the same network stands in
    assert name(loss="ce", optimizer="adamw") == ("nnUNetTrainer", False)
    assert name(epochs=7) == ("nnUNetTrainer", False)
    assert name(initial_lr=0.02) == ("nnUNetTrainer", False)


def test_default_variants_keep_the_signature_of_earlier_states() -> None:
    args = (CONFIGURATION, PLANS["configurations"][CONFIGURATION], DATASET_JSON, 0, CASES[:4], CASES[4:])
    default = training_signature(*args, TrainingSettings(), 1)
    assert not set(default) & set(training.VARIANT_DEFAULTS)  # states written before the variants resume
    topk = training_signature(*args, TrainingSettings(loss="topk10"), 1)
    assert topk == {**default, "loss": "topk10"}
    assert signature_differences(default, topk) == ["loss: 'dice_ce' -> 'topk10'"]
    assert signature_differences({**default, "loss": "dice_ce"}, default) == []


# ----------------------------------------------------------------------------------------------------------
# the trainer


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_preprocessed(tmp_path_factory.mktemp("preprocessed") / CONFIGURATION)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """progress.png costs ~1 s per drawing on a busy CI core and is not what these tests are about."""
    monkeypatch.setattr(
        "nnsnake.training.trainer.plot_progress", lambda history, path: Path(path).write_bytes(b"")
    )


VARIANT = dict(
    loss="dice_topk10",
    optimizer="adamw",
    lr_schedule="warmup_poly",
    augmentation="no_mirroring",
    probabilistic_oversampling=True,
)


def test_variant_run_resumes_bit_exactly_and_inference_honours_it(preprocessed: Path, tmp_path: Path) -> None:
    settings = tiny_settings(epochs=3, iterations_per_epoch=1, **VARIANT)
    run(preprocessed, tmp_path / "whole", settings)
    with pytest.raises(SimulatedKill):
        run(preprocessed, tmp_path / "killed", settings, epoch_callback=kill_after_epoch(0))
    with pytest.raises(SignatureMismatchError, match="loss: 'dice_topk10' -> 'dice_ce'"):
        run(
            preprocessed,
            tmp_path / "killed",
            tiny_settings(epochs=3, iterations_per_epoch=1, **{**VARIANT, "loss": "dice_ce"}),
        )
    summary = run(preprocessed, tmp_path / "killed", settings)
    assert summary["resumed_from_epoch"] == 1
    assert_same_weights(final_weights(tmp_path / "killed"), final_weights(tmp_path / "whole"))
    log = read_json(tmp_path / "killed" / "out" / "log.json")
    assert [e["lr"] for e in log] == [learning_rate("warmup_poly", e, 3) for e in range(3)]
    assert [e["lr"] for e in log] == pytest.approx([2e-4, 4e-4, 6e-4])

    model = tmp_path / "killed" / "out" / "model_final.pt"
    init = torch.load(model, weights_only=True)["init"]
    assert init["inference_allowed_mirroring_axes"] == []
    assert init["training_variant"] == {**training.VARIANT_DEFAULTS, **VARIANT}
    assert (init["trainer_name"], init["trainer_name_exact"]) == ("nnUNetTrainer", False)
    _, mirror_axes = load_fold_networks([model], PLANS, CONFIGURATION, DATASET_JSON)
    assert mirror_axes == ()  # validation and prediction mirror nothing


def test_without_deep_supervision_one_output_one_target(
    preprocessed: Path, tmp_path: Path, monkeypatch
) -> None:
    seen: list[tuple[bool, bool]] = []
    original = training._Trainer.train_step

    def recording_step(self, batch):
        with torch.no_grad():
            output = self.model(batch["data"].contiguous(memory_format=self._memory_format()))
        seen.append((isinstance(output, torch.Tensor), isinstance(batch["target"], torch.Tensor)))
        assert not isinstance(self.loss, DeepSupervisionLoss)
        assert type(self.optimizer).__name__ == "Adam"
        return original(self, batch)

    monkeypatch.setattr(training._Trainer, "train_step", recording_step)
    settings = tiny_settings(
        epochs=2,
        iterations_per_epoch=1,
        deep_supervision=False,
        augmentation="none",
        loss="dice",
        optimizer="adam",
        lr_schedule="cosine",
    )
    run(preprocessed, tmp_path, settings)
    assert seen == [(True, True), (True, True)]
    log = read_json(tmp_path / "out" / "log.json")
    assert [e["lr"] for e in log] == [0.01, learning_rate("cosine", 1, 2)] == [0.01, 0.005]
    init = torch.load(tmp_path / "out" / "model_final.pt", weights_only=True)["init"]
    assert init["inference_allowed_mirroring_axes"] == []
    # the heads of the lower resolutions exist as with deep supervision: the same checkpoint layout
    network = build_network(PLANS["configurations"][CONFIGURATION]["architecture"], 1, 3, True)
    assert final_weights(tmp_path).keys() == network.state_dict().keys()


def test_region_dataset_refuses_a_label_only_loss_before_training(preprocessed: Path, tmp_path: Path) -> None:
    regions = {
        **DATASET_JSON,
        "labels": {"background": 0, "whole": [1, 2], "rim": 2},
        "regions_class_order": [1, 2],
    }
    with pytest.raises(ConfigError, match="region-based"):
        training.train_fold(
            preprocessed,
            PLANS,
            CONFIGURATION,
            regions,
            SPLITS,
            0,
            tmp_path / "out",
            tmp_path / "state",
            tiny_settings(loss="ce"),
        )
    assert not (tmp_path / "out").exists()
