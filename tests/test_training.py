"""The trainer (docs/method.md §5) on tiny synthetic preprocessed data: schedule, metrics, outputs, checkpoints, resume.

Budgets are a few iterations of a 3-stage U-Net with 4-16 features on 16³ patches, so every run takes a second
or two on one thread; what is tested is the machinery (and its exactness), not learning.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nnsnake import runtime as gpu
from nnsnake import training
from nnsnake.errors import ConfigError
from nnsnake.jsonio import read_json
from nnsnake.preprocessing import sample_class_locations, save_case
from nnsnake.training import (
    SignatureMismatchError,
    TrainingInterrupted,
    TrainingLockedError,
    TrainingSettings,
    ema_update,
    exclusive_lock,
    global_dice,
    poly_lr,
    train_fold,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGURATION = "3d_fullres"
DATASET_JSON = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "core": 1, "rim": 2},
    "numTraining": 6,
    "file_ending": ".nii.gz",
}
PLANS = {
    "dataset_name": "Dataset999_Tiny",
    "plans_name": "nnsnakePlans",
    "transpose_forward": [0, 1, 2],
    "transpose_backward": [0, 1, 2],
    "configurations": {
        CONFIGURATION: {
            "data_identifier": "tiny_3d_fullres",
            "batch_size": 2,
            "patch_size": [16, 16, 16],
            "spacing": [1.0, 1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False],
            "batch_dice": False,
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 3,
                    "features_per_stage": [4, 8, 16],
                    "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3]] * 3,
                    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                    "n_conv_per_stage": [2, 2, 2],
                    "n_conv_per_stage_decoder": [2, 2],
                    "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                    "dropout_op": None,
                    "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU",
                    "nonlin_kwargs": {"inplace": True},
                },
            },
        }
    },
}
CASES = [f"tiny_{i:03d}" for i in range(6)]
SPLITS = [{"train": CASES[:4], "val": CASES[4:]}]


def tiny_settings(**overrides) -> TrainingSettings:
    values = dict(
        epochs=4,
        iterations_per_epoch=2,
        val_iterations=1,
        device="cpu",
        threads=1,
        workers=0,
        deterministic=True,
        seed=7,
    )
    values.update(overrides)
    return TrainingSettings(**values)


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> Path:
    return make_preprocessed(tmp_path_factory.mktemp("preprocessed") / CONFIGURATION)


def make_preprocessed(folder: Path) -> Path:
    """Six cases: a bright sphere (label 1) with a rim (label 2) in noise, z-scored, in nnsnake's store."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"))
    for i, case in enumerate(CASES):
        centre = np.array([10, 10, 10]) + rng.integers(-3, 4, 3)
        radius = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        seg = np.where(radius < 3 + i % 2, 1, np.where(radius < 5, 2, 0)).astype(np.int8)
        data = (seg * 1.5 + rng.normal(0, 0.5, seg.shape)).astype(np.float32)
        data = (data - data.mean()) / data.std()
        locations = sample_class_locations(seg, [1, 2])
        save_case(
            folder, case, data[None], seg[None], {"spacing": [1.0, 1.0, 1.0], "class_locations": locations}
        )
    return folder


def run(preprocessed: Path, root: Path, settings: TrainingSettings, **kwargs) -> dict:
    return train_fold(
        preprocessed,
        PLANS,
        CONFIGURATION,
        DATASET_JSON,
        SPLITS,
        0,
        root / "out",
        root / "state",
        settings,
        **kwargs,
    )


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "out" / "model_final.pt", weights_only=True)["network_weights"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def reference_run(preprocessed, tmp_path_factory) -> Path:
    """An uninterrupted deterministic 4-epoch run; resumed runs must end with exactly its weights."""
    root = tmp_path_factory.mktemp("reference")
    run(preprocessed, root, tiny_settings())
    return root


# ----------------------------------------------------------------------------------------------------------
# schedule and metrics


def test_poly_lr_matches_nnunet_schedule():
    assert poly_lr(0, 1000) == 0.01
    assert poly_lr(999, 1000) == pytest.approx(2.0e-5, rel=0.01)
    assert poly_lr(500, 1000) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(5, 10, initial_lr=0.1) == pytest.approx(0.1 * 0.5**0.9)


def test_ema_takes_first_value_then_blends_nine_to_one():
    assert ema_update(None, 0.5) == 0.5
    assert ema_update(0.5, 0.9) == pytest.approx(0.9 * 0.5 + 0.1 * 0.9)
    assert ema_update(0.5, float("nan")) == 0.5  # a NaN epoch does not poison the average
    assert ema_update(None, float("nan")) != ema_update(None, float("nan"))  # stays NaN until a value comes


def test_global_dice_from_summed_counts():
    dice = global_dice([8, 0], [2, 0], [2, 0])
    assert dice[0] == pytest.approx(16 / 20)
    assert math.isnan(dice[1])


def test_default_settings_are_nnunets():
    s = TrainingSettings()
    assert (s.epochs, s.iterations_per_epoch, s.val_iterations) == (1000, 250, 50)
    assert (s.initial_lr, s.momentum, s.weight_decay, s.grad_clip_norm) == (1e-2, 0.99, 3e-5, 12.0)
    with pytest.raises(ValueError, match="unknown key"):
        TrainingSettings.from_mapping({"epochs": 10, "epoch": 3})
    with pytest.raises(ValueError, match="autocast"):
        TrainingSettings(autocast="fp8")


def test_deprecated_setting_names_are_mapped_with_a_warning():
    with pytest.warns(DeprecationWarning) as warned:
        old = TrainingSettings.from_mapping({"amp": "off", "num_workers": 3, "epochs": 5})
    assert sorted(str(w.message) for w in warned) == [
        "training setting amp is deprecated; use autocast",
        "training setting num_workers is deprecated; use workers",
    ]
    assert old == TrainingSettings.from_mapping({"autocast": "off", "workers": 3, "epochs": 5})
    with pytest.warns(DeprecationWarning, match="num_workers is deprecated; use workers"):
        assert TrainingSettings(num_workers=2).workers == 2
    with pytest.raises(ConfigError, match="keep only autocast"):
        TrainingSettings.from_mapping({"amp": "off", "autocast": "bf16"})
    with pytest.raises(ConfigError, match="unknown key"):
        TrainingSettings.from_mapping({"amps": "off"})
    # the signature (what a stored state must match) does not depend on which name was used
    args = ("3d_fullres", {"patch_size": [16]}, DATASET_JSON, 0, CASES[:4], CASES[4:])
    with pytest.warns(DeprecationWarning):
        renamed = TrainingSettings.from_mapping({"num_workers": 1, "deterministic": True})
    assert training.training_signature(*args, renamed, 1) == training.training_signature(
        *args, TrainingSettings(workers=1, deterministic=True), 1
    )
    # the key keeps the name that earlier states were saved with
    assert training.training_signature(*args, renamed, 1)["num_workers"] == 1


# ----------------------------------------------------------------------------------------------------------
# a full run


def test_run_writes_outputs_log_and_loadable_model(reference_run):
    out, state = reference_run / "out", reference_run / "state"
    assert {p.name for p in out.iterdir()} == {"model_final.pt", "model_best.pt", "log.json", "progress.png"}
    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (state / "checkpoint_latest.pt").is_file() and (state / "log.json").is_file()
    assert not list(state.glob(".*.tmp*")) and not list(out.glob(".*"))

    log = read_json(out / "log.json")
    assert [e["epoch"] for e in log] == [0, 1, 2, 3]
    for entry in log:
        for key in (
            "train_loss",
            "val_loss",
            "pseudo_dice",
            "ema_pseudo_dice",
            "lr",
            "epoch_time_s",
            "finished_at",
        ):
            assert key in entry, key
        assert set(entry["pseudo_dice"]) == {"core", "rim"}
        assert entry["finished_at"].endswith("Z") and "T" in entry["finished_at"]
        assert entry["train_loss"] < 2 and entry["epoch_time_s"] > 0
    assert [e["lr"] for e in log] == pytest.approx([poly_lr(e, 4) for e in range(4)])
    first = log[0]["mean_fg_dice"]
    assert log[0]["ema_pseudo_dice"] == pytest.approx(first)
    assert log[1]["ema_pseudo_dice"] == pytest.approx(ema_update(first, log[1]["mean_fg_dice"]))
    assert read_json(state / "log.json") == log

    model = torch.load(out / "model_final.pt", weights_only=True)
    init = model["init"]
    assert (
        init["configuration"] == CONFIGURATION
        and init["num_input_channels"] == 1
        and init["num_outputs"] == 3
    )
    assert init["inference_allowed_mirroring_axes"] == [0, 1, 2] and init["epoch"] == 3
    best = torch.load(out / "model_best.pt", weights_only=True)["init"]
    assert best["epoch"] == max((e for e in log if e["new_best"]), key=lambda e: e["epoch"])["epoch"]

    from nnsnake.inference import network_from_checkpoint

    network, _ = network_from_checkpoint(out / "model_final.pt", PLANS, CONFIGURATION, DATASET_JSON)
    with torch.no_grad():
        assert network(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_finished_run_rerun_only_rewrites_outputs(preprocessed, reference_run):
    """Snakemake deletes outputs before rerunning a job: a finished state rewrites them without training."""
    before = final_weights(reference_run)
    for path in (reference_run / "out").iterdir():
        path.unlink()
    epochs_seen = []
    run(preprocessed, reference_run, tiny_settings(), epoch_callback=epochs_seen.append)
    assert epochs_seen == []
    assert_same_weights(final_weights(reference_run), before)
    assert len(read_json(reference_run / "out" / "log.json")) == 4


# ----------------------------------------------------------------------------------------------------------
# resume


class SimulatedKill(Exception):
    pass


def kill_after_epoch(k: int):
    def callback(entry: dict) -> None:
        if entry["epoch"] == k:
            raise SimulatedKill

    return callback


def test_resume_after_kill_continues_epochs_and_log_bit_exactly(preprocessed, reference_run, tmp_path):
    # checkpoints every 2 epochs: dying after epoch 2 loses epoch 2 (its state was never written), not epoch 0-1
    settings = tiny_settings(checkpoint_every=2)
    with pytest.raises(SimulatedKill):
        run(preprocessed, tmp_path, settings, epoch_callback=kill_after_epoch(2))
    assert not (tmp_path / "out" / "model_final.pt").exists()
    log_before = read_json(tmp_path / "state" / "log.json")
    assert [e["epoch"] for e in log_before] == [0, 1, 2]
    state = torch.load(tmp_path / "state" / "checkpoint_latest.pt", weights_only=True)
    assert state["epoch"] == 2 and state["iteration"] == 0

    resumed_epochs = []
    summary = run(
        preprocessed, tmp_path, settings, epoch_callback=lambda e: resumed_epochs.append(e["epoch"])
    )
    assert summary["resumed_from_epoch"] == 2 and resumed_epochs == [2, 3]
    log = read_json(tmp_path / "out" / "log.json")
    assert [e["epoch"] for e in log] == [0, 1, 2, 3]
    assert log[:2] == log_before[:2]  # entries of epochs finished before the kill are kept verbatim
    assert [e["attempt"] for e in log] == [1, 1, 2, 2]
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))


def test_signal_mid_epoch_saves_state_and_resume_is_bit_exact(
    preprocessed, reference_run, tmp_path, monkeypatch
):
    """SIGTERM during epoch 1: the iteration finishes, a mid-epoch checkpoint is saved, the exit is non-zero."""
    original = training._Trainer.train_step
    steps = {"n": 0}

    def step_then_signal(self, batch):
        loss = original(self, batch)
        steps["n"] += 1
        if steps["n"] == 3:  # epoch 1, after its first iteration
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(training._Trainer, "train_step", step_then_signal)
    with pytest.raises(TrainingInterrupted) as info:
        run(preprocessed, tmp_path, tiny_settings())
    assert info.value.code == 128 + signal.SIGTERM and "SIGTERM" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    state = torch.load(tmp_path / "state" / "checkpoint_latest.pt", weights_only=True)
    assert (state["epoch"], state["iteration"]) == (1, 1)
    monkeypatch.setattr(training._Trainer, "train_step", original)

    run(preprocessed, tmp_path, tiny_settings())
    assert [e["epoch"] for e in read_json(tmp_path / "out" / "log.json")] == [0, 1, 2, 3]
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))


def test_mismatching_signature_is_refused_with_the_difference(preprocessed, tmp_path):
    with pytest.raises(SimulatedKill):
        run(
            preprocessed,
            tmp_path,
            tiny_settings(epochs=2, iterations_per_epoch=1),
            epoch_callback=kill_after_epoch(0),
        )
    with pytest.raises(SignatureMismatchError, match=r"epochs: 2 -> 4.*rm -r"):
        run(preprocessed, tmp_path, tiny_settings(epochs=4, iterations_per_epoch=1))
    other_splits = [{"train": CASES[1:5], "val": [CASES[0], CASES[5]]}]
    with pytest.raises(SignatureMismatchError, match="splits.json"):
        train_fold(
            preprocessed,
            PLANS,
            CONFIGURATION,
            DATASET_JSON,
            other_splits,
            0,
            tmp_path / "out",
            tmp_path / "state",
            tiny_settings(epochs=2, iterations_per_epoch=1),
        )
    # speed-only settings may change between attempts
    run(preprocessed, tmp_path, tiny_settings(epochs=2, iterations_per_epoch=1, threads=2, autocast="off"))
    assert (tmp_path / "out" / "model_final.pt").is_file()


def test_sigterm_to_a_training_process_checkpoints_and_exits_nonzero(preprocessed, tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO / "tests")!r})
        torch.set_num_threads(1)
        from pathlib import Path
        from nnsnake import training
        from test_training import run, tiny_settings
        step = training._Trainer.train_step
        def reporting_step(self, batch):
            loss = step(self, batch)
            print("step", flush=True)
            return loss
        training._Trainer.train_step = reporting_step
        run(Path({str(preprocessed)!r}), Path({str(tmp_path)!r}),
            tiny_settings(epochs=2, iterations_per_epoch=200, deterministic=False))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for _ in range(3):  # three training iterations done: we are inside epoch 0
        assert process.stdout.readline() == "step\n", process.communicate()[1]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "state saved to" in stderr
    state = torch.load(tmp_path / "state" / "checkpoint_latest.pt", weights_only=True)
    assert state["epoch"] == 0 and 3 <= state["iteration"] < 200
    assert not (tmp_path / "out" / "model_final.pt").exists()


def test_a_default_training_process_never_imports_torch_compiler(preprocessed, tmp_path):
    """torch's optimiser wrappers and ``use_deterministic_algorithms`` import torch._dynamo (about 830 modules,
    1.2 s of every training job); a default run (not deterministic, no compile) must not pay it."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO / "tests")!r})
        from pathlib import Path
        from test_training import run, tiny_settings
        run(Path({str(preprocessed)!r}), Path({str(tmp_path)!r}), tiny_settings(epochs=2, deterministic=False))
        print(sorted(m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor"))))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "model_final.pt").is_file()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_augmentation_workers_die_with_a_killed_trainer(preprocessed, tmp_path):
    """kill -9 of the trainer (node loss, OOM killer) must not leave worker processes spinning forever."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO / "tests")!r})
        torch.set_num_threads(1)
        from pathlib import Path
        from nnsnake import training
        from test_training import run, tiny_settings
        step = training._Trainer.train_step
        def reporting_step(self, batch):
            loss = step(self, batch)
            print("step", flush=True)
            return loss
        training._Trainer.train_step = reporting_step
        run(Path({str(preprocessed)!r}), Path({str(tmp_path)!r}),
            tiny_settings(epochs=2, iterations_per_epoch=200, deterministic=False, workers=2))
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout.readline() == "step\n"
    workers = _children(process.pid)
    assert len(workers) >= 2
    process.kill()
    process.wait()
    deadline = time.monotonic() + 20
    while any(
        Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
        for w in workers
        if Path(f"/proc/{w}").exists()
    ):
        assert time.monotonic() < deadline, "augmentation workers survived their trainer"
        time.sleep(0.2)


def test_second_copy_of_a_fold_is_locked_out(tmp_path):
    lock = tmp_path / "training.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom nnsnake.training import exclusive_lock\n"
            f"with exclusive_lock({str(lock)!r}):\n    print('held', flush=True)\n    time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingLockedError, match=f"pid {holder.pid}"):
            with exclusive_lock(lock):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock):  # released when the holder died
        pass


def test_missing_preprocessed_case_is_named(preprocessed, tmp_path):
    splits = [{"train": CASES[:4] + ["absent_case"], "val": CASES[4:]}]
    with pytest.raises(FileNotFoundError, match="absent_case.*rerun preprocessing"):
        train_fold(
            preprocessed,
            PLANS,
            CONFIGURATION,
            DATASET_JSON,
            splits,
            0,
            tmp_path / "o",
            tmp_path / "s",
            tiny_settings(),
        )


def test_cascade_needs_previous_stage_predictions(preprocessed, tmp_path):
    plans = {
        **PLANS,
        "configurations": {
            **PLANS["configurations"],
            "3d_cascade_fullres": {"inherits_from": CONFIGURATION, "previous_stage": "3d_lowres"},
        },
    }
    with pytest.raises(ValueError, match="previous_stage_dir"):
        train_fold(
            preprocessed,
            plans,
            "3d_cascade_fullres",
            DATASET_JSON,
            SPLITS,
            0,
            tmp_path / "o",
            tmp_path / "s",
            tiny_settings(),
        )
    with pytest.raises(FileNotFoundError, match="previous-stage predictions missing"):
        train_fold(
            preprocessed,
            plans,
            "3d_cascade_fullres",
            DATASET_JSON,
            SPLITS,
            0,
            tmp_path / "o",
            tmp_path / "s",
            tiny_settings(),
            previous_stage_dir=tmp_path,
        )


# ----------------------------------------------------------------------------------------------------------
# devices


def test_select_device():
    assert gpu.select_device("cpu").type == "cpu"
    assert gpu.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not understood"):
        gpu.select_device("tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
            gpu.select_device("cuda")


def test_claim_gpu_takes_a_free_slot_and_respects_the_scheduler(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu, "count_gpus_without_cuda", lambda: 0)
    with gpu.claim_gpu(tmp_path) as claimed:
        assert claimed is None and "CUDA_VISIBLE_DEVICES" not in os.environ

    monkeypatch.setattr(gpu, "count_gpus_without_cuda", lambda: 2)
    holder = subprocess.Popen(  # another job holds GPU 0
        [
            sys.executable,
            "-c",
            "import fcntl, os, time\n"
            f"fd = os.open({str(tmp_path / 'gpu0.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with gpu.claim_gpu(tmp_path) as claimed:
            assert claimed == 1 and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    finally:
        holder.kill()
        holder.wait()

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # SLURM chose
    with gpu.claim_gpu(tmp_path) as claimed:
        assert claimed is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_log_json_stays_strict_json_without_any_dice(preprocessed, tmp_path, monkeypatch):
    """Epochs without a defined pseudo-Dice log null (NaN is not JSON), set no best, and model_best.pt still exists."""
    monkeypatch.setattr(training.trainer, "global_dice", lambda tp, fp, fn: [float("nan")] * len(tp))
    run(preprocessed, tmp_path, tiny_settings(epochs=2, iterations_per_epoch=1))
    assert "NaN" not in (tmp_path / "out" / "log.json").read_text()
    log = read_json(tmp_path / "out" / "log.json")
    assert [e["pseudo_dice"] for e in log] == [{"core": None, "rim": None}] * 2
    assert [e["ema_pseudo_dice"] for e in log] == [None, None] and not any(e["new_best"] for e in log)
    best = torch.load(tmp_path / "out" / "model_best.pt", weights_only=True)
    assert best["init"]["ema_pseudo_dice"] is None
    assert_same_weights(best["network_weights"], final_weights(tmp_path))
