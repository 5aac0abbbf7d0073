"""Fine-tuning and plans transfer (docs/method.md §3.11, §5.11): pretrained weights, moved plans, fold ``all``.

The pretrained model is the tiny nnunetv2-trained 2d model of the demo (tests/fixtures/nnunet_model); nnsnake
fine-tunes it on 8 demo cases preprocessed with its plans. The moved plans are nnunetv2's own
``nnUNetv2_move_plans_between_datasets`` outputs (tests/fixtures/finetune/make_fixture.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnsnake.errors import ConfigError, UnsafeCheckpointError
from nnsnake.network import build_network
from nnsnake.plans_transfer import transfer_plans, transfer_plans_from_file
from nnsnake.training import TrainingSettings, train_fold, training_signature
from nnsnake.training.pretrained import is_head, load_pretrained_weights

from .test_nnunet_models import _crafted_checkpoint

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEMO = REPO / "examples" / "Dataset104_HippocampusDemo"
MODEL = (
    FIXTURES / "nnunet_model" / "Dataset104_HippocampusDemo" / "nnUNetTrainer_anchorBench__nnUNetPlans__2d"
)
CHECKPOINT = MODEL / "fold_0" / "checkpoint_final.pth"
PLANS = json.loads((MODEL / "plans.json").read_text())
DATASET_JSON = json.loads((DEMO / "dataset.json").read_text())
ARCHITECTURE = PLANS["configurations"]["2d"]["architecture"]
CASES = [f"hippocampus_{i:03d}" for i in (1, 19, 37, 49, 65, 88, 98, 114)]  # the first 8 demo cases


def _settings(**overrides) -> TrainingSettings:
    values = dict(
        epochs=1,
        iterations_per_epoch=4,
        val_iterations=1,
        device="cpu",
        threads=1,
        workers=0,
        deterministic=True,
        seed=3,
        save_best=False,
    )
    values.update(overrides)
    return TrainingSettings(**values)


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> Path:
    """8 demo cases preprocessed for the pretrained model's 2d configuration."""
    from nnsnake.preprocessing import preprocess_dataset

    folder = tmp_path_factory.mktemp("finetune") / "2d"
    preprocess_dataset(DEMO, DATASET_JSON, PLANS, "2d", folder, CASES, processes=1, progress=False)
    return folder


@pytest.fixture(scope="module")
def runs(preprocessed, tmp_path_factory) -> dict[str, Path]:
    """One short epoch of fold all from scratch and one from the nnU-Net checkpoint, same data and seed.

    Batches of 4 instead of the plans' 12 (the architecture is what matters) and no progress plots (a second each).
    """
    plans = json.loads(json.dumps(PLANS))
    plans["configurations"]["2d"]["batch_size"] = 4
    splits = [{"train": CASES[:2], "val": CASES[2:3]}]  # fold all ignores them: every stored case trains
    folders = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("nnsnake.training.trainer.plot_progress", lambda history, path: Path(path).touch())
        for name, weights in (("scratch", None), ("tuned", str(CHECKPOINT))):
            out = tmp_path_factory.mktemp(name)
            settings = _settings(iterations_per_epoch=24, pretrained_weights=weights)
            train_fold(
                preprocessed, plans, "2d", DATASET_JSON, splits, "all", out / "out", out / "state", settings
            )
            folders[name] = out
    return folders


def _first_epoch_loss(folder: Path) -> float:
    return float(json.loads((folder / "out" / "log.json").read_text())[0]["train_loss"])


# --------------------------------------------------------------------------------------------------------------
# pretrained weights


def test_pretrained_weights_lower_the_first_epoch_loss(runs):
    scratch, tuned = _first_epoch_loss(runs["scratch"]), _first_epoch_loss(runs["tuned"])
    # fresh heads on trained features start above scratch for a few steps, then the pretrained encoder and
    # decoder pay off: measured 0.41 vs 0.76 (24 iterations, CPU, torch 2.13)
    assert tuned < 0.8 * scratch, (tuned, scratch)
    signature = torch.load(runs["tuned"] / "state" / "checkpoint_latest.pt", weights_only=True)["signature"]
    assert signature["pretrained_weights"] == str(CHECKPOINT)


def test_only_the_heads_keep_their_initialisation():
    torch.manual_seed(0)
    network = build_network(ARCHITECTURE, 1, 3, True)
    fresh = {k: v.clone() for k, v in network.state_dict().items()}
    summary = load_pretrained_weights(network, CHECKPOINT)
    assert summary["source"] == "nnU-Net"
    pretrained = torch.load(CHECKPOINT, map_location="cpu", weights_only=False)["network_weights"]
    after = network.state_dict()
    heads = [k for k in after if is_head(k)]
    assert heads and sorted(heads) == sorted(summary["heads_initialised"])
    for key in heads:  # nnU-Net's decoder.seg_layers are not loaded
        assert torch.equal(after[key], fresh[key]), key
    # every other layer equals the file's (stem and bottleneck checked under nnU-Net's names)
    assert torch.equal(after["encoder.0.0.0.weight"], pretrained["encoder.stages.0.0.convs.0.conv.weight"])
    assert torch.equal(after["upsamplers.0.weight"], pretrained["decoder.transpconvs.0.weight"])
    assert all(not torch.equal(after[k], fresh[k]) for k in after if not is_head(k) and k.endswith("weight"))
    assert summary["layers_loaded"] == len(after) - len(heads)


def test_nnsnake_model_and_resenc_weights(tmp_path):
    """An nnsnake model_final.pt and an nnU-Net ResEnc checkpoint (DNA's names) load the same way; another
    class count changes only the heads."""
    resenc = json.loads(
        (FIXTURES / "nnunetv2" / "Dataset004_Hippocampus" / "nnUNetResEncUNetMPlans.json").read_text()
    )
    architecture = resenc["configurations"]["2d"]["architecture"]
    architecture["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 32]  # small, same topology
    torch.manual_seed(1)
    source = build_network(architecture, 1, 3, True)
    nnunet_file = tmp_path / "checkpoint_final.pth"
    weights = source.state_dict()
    aliased = {
        **weights,
        **{
            f"decoder.encoder.{k[len('encoder.') :]}": v
            for k, v in weights.items()
            if k.startswith("encoder.")
        },
    }
    aliased.update({k.replace(".conv.", ".all_modules.0."): v for k, v in weights.items() if ".conv." in k})
    torch.save(  # nnU-Net's state dicts carry DNA's aliases
        {
            "network_weights": aliased,
            "init_args": {"configuration": "2d", "fold": 0},
            "trainer_name": "nnUNetTrainer",
        },
        nnunet_file,
    )
    nnsnake_file = tmp_path / "model_final.pt"
    torch.save(
        {"format": "nnsnake-model-1", "network_weights": source.state_dict(), "init": {}}, nnsnake_file
    )
    for path, kind in ((nnunet_file, "nnU-Net"), (nnsnake_file, "nnsnake")):
        torch.manual_seed(2)
        target = build_network(architecture, 1, 5, True)  # five classes instead of three
        summary = load_pretrained_weights(target, path)
        assert summary["source"] == kind
        for key, value in target.state_dict().items():
            assert torch.equal(value, source.state_dict()[key]) != is_head(key), key


def test_mismatching_architecture_names_layer_shapes_and_plans_transfer(tmp_path):
    two_channels = build_network(ARCHITECTURE, 2, 3, True)
    with pytest.raises(ConfigError) as err:
        load_pretrained_weights(two_channels, CHECKPOINT)
    message = str(err.value)
    assert "encoder.0.0.0.weight" in message and "encoder.stages.0.0.convs.0.conv.weight" in message
    assert "[8, 1, 3, 3]" in message and "[8, 2, 3, 3]" in message
    assert "planning.transfer_plans_from" in message and str(CHECKPOINT) in message
    wider = json.loads(json.dumps(ARCHITECTURE))
    wider["arch_kwargs"]["features_per_stage"] = [16, 32, 64, 128]
    with pytest.raises(ConfigError, match=r"\[8, 1, 3, 3\].*\[16, 1, 3, 3\].*transfer_plans_from"):
        load_pretrained_weights(build_network(wider, 1, 3, True), CHECKPOINT)


def test_mismatch_fails_before_training(preprocessed, tmp_path):
    plans = json.loads(json.dumps(PLANS))
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 32]
    with pytest.raises(ConfigError, match="encoder.3.0.0.weight"):
        train_fold(
            preprocessed, plans, "2d", DATASET_JSON, [], "all", tmp_path / "o", tmp_path / "s",
            _settings(pretrained_weights=str(CHECKPOINT)),
        )  # fmt: skip
    assert not (tmp_path / "o" / "model_final.pt").exists()


def test_crafted_pretrained_checkpoint_is_refused(tmp_path):
    crafted, marker = tmp_path / "checkpoint_final.pth", tmp_path / "payload_ran"
    _crafted_checkpoint(crafted, marker)
    with pytest.raises(UnsafeCheckpointError, match="checkpoint_final.pth"):
        load_pretrained_weights(build_network(ARCHITECTURE, 1, 3, True), crafted)
    assert not marker.exists()


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrained_weights(build_network(ARCHITECTURE, 1, 3, True), tmp_path / "nope.pth")


def test_weights_are_part_of_the_training_signature(tmp_path):
    config = PLANS["configurations"]["2d"]
    plain = training_signature("2d", config, DATASET_JSON, "all", CASES, CASES, _settings(), 0)
    assert not any(k.startswith("pretrained") for k in plain)  # states of runs without it keep resuming
    copy = tmp_path / "weights.pth"
    copy.write_bytes(CHECKPOINT.read_bytes())
    tuned = training_signature(
        "2d", config, DATASET_JSON, "all", CASES, CASES, _settings(pretrained_weights=str(copy)), 0
    )
    assert tuned["pretrained_weights"] == str(copy) and len(tuned["pretrained_weights_sha256"]) == 64
    data = bytearray(CHECKPOINT.read_bytes())
    data[len(data) // 2] ^= 1  # one bit of one weight
    copy.write_bytes(bytes(data))
    changed = training_signature(
        "2d", config, DATASET_JSON, "all", CASES, CASES, _settings(pretrained_weights=str(copy)), 0
    )
    assert changed["pretrained_weights_sha256"] != tuned["pretrained_weights_sha256"]
    assert TrainingSettings.from_mapping({"pretrained_weights": str(copy)}).pretrained_weights == str(copy)


# --------------------------------------------------------------------------------------------------------------
# plans transfer


@pytest.mark.parametrize(
    "source, plans_name, target, target_plans",
    [
        ("Dataset004_Hippocampus", "nnUNetPlans", "Dataset104_HippocampusDemo", "nnUNetPlansFrom004"),
        (
            "Dataset004_Hippocampus",
            "nnUNetResEncUNetMPlans",
            "Dataset104_HippocampusDemo",
            "nnUNetResEncMFrom004",
        ),
        ("Dataset009_SpleenCTCrop", "nnUNetPlans", "Dataset902_TotalSegExampleCT", None),
    ],
)
def test_transfer_plans_equals_nnunetv2(source, plans_name, target, target_plans):
    source_plans = json.loads((FIXTURES / "nnunetv2" / source / f"{plans_name}.json").read_text())
    target_json = (
        DATASET_JSON
        if target == DEMO.name
        else json.loads((FIXTURES / "nnunetv2" / target / "dataset.json").read_text())
    )
    moved = transfer_plans(source_plans, target_json, None, target, target_plans)
    reference = (
        FIXTURES / "finetune" / f"{source}__{plans_name}__to__{target}__{target_plans or plans_name}.json"
    )
    expected = json.loads(reference.read_text())
    assert moved == expected
    assert list(moved) == list(expected)
    # the source's architecture and intensity properties, untouched
    assert (
        moved["configurations"]["2d"]["architecture"] == source_plans["configurations"]["2d"]["architecture"]
    )
    assert (
        moved["foreground_intensity_properties_per_channel"]
        == source_plans["foreground_intensity_properties_per_channel"]
    )


def test_transfer_plans_from_files_and_target_intensities(tmp_path):
    source = FIXTURES / "nnunetv2" / "Dataset004_Hippocampus" / "nnUNetPlans.json"
    fingerprint = FIXTURES / "finetune" / "Dataset104_HippocampusDemo_dataset_fingerprint.json"
    moved = transfer_plans_from_file(source, DEMO, fingerprint, "FromHippo", intensity_properties="target")
    assert moved["dataset_name"] == DEMO.name and moved["plans_name"] == "FromHippo"
    assert moved["configurations"]["3d_fullres"]["data_identifier"] == "FromHippo_3d_fullres"
    own = json.loads(fingerprint.read_text())["foreground_intensity_properties_per_channel"]
    assert moved["foreground_intensity_properties_per_channel"] == own
    with pytest.raises(ConfigError, match="does not exist"):
        transfer_plans_from_file(tmp_path / "missing.json", DEMO)


def test_transfer_plans_checks_the_channels():
    brats = json.loads(
        (FIXTURES / "nnunetv2" / "Dataset301_BraTS2015DeepMedic" / "nnUNetPlans.json").read_text()
    )
    with pytest.raises(ConfigError, match=r"normalises 2 input channel\(s\).*this dataset has 1 \(MRI\)"):
        transfer_plans(brats, DATASET_JSON, None, DEMO.name)
    spleen = json.loads((FIXTURES / "nnunetv2" / "Dataset009_SpleenCTCrop" / "nnUNetPlans.json").read_text())
    with pytest.raises(ConfigError, match=r"channel 0 \('MRI'\).*ZScoreNormalization.*CTNormalization"):
        transfer_plans(spleen, DATASET_JSON, None, DEMO.name)


# --------------------------------------------------------------------------------------------------------------
# fold all


def test_fold_all_trains_and_validates_on_every_case(runs, preprocessed, tmp_path):
    """nnU-Net's fold all: every preprocessed case trains and "validates", whatever the splits name."""
    from nnsnake.steps.validate import _validation_cases
    from nnsnake.training.signature import sha256_of

    state = torch.load(
        runs["scratch"] / "state" / "checkpoint_latest.pt", map_location="cpu", weights_only=True
    )
    assert state["signature"]["fold"] == "all"
    assert state["signature"]["cases_sha256"] == sha256_of({"train": sorted(CASES), "val": sorted(CASES)})
    model = torch.load(runs["scratch"] / "out" / "model_final.pt", map_location="cpu", weights_only=True)
    assert model["init"]["fold"] == "all"
    splits_file = tmp_path / "splits.json"
    splits_file.write_text(json.dumps([{"train": CASES[:2], "val": CASES[2:3]}]))
    assert _validation_cases(splits_file, "all", preprocessed) == sorted(CASES)
