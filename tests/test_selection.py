"""Bootstrap model selection: determinism, known winners, the cheaper-candidate rule and NaN handling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnsnake import jsonio
from nnsnake.selection import (
    SelectionError,
    bootstrap_selection,
    candidate_cost,
    candidate_members,
    candidate_names,
    ensemble_name,
    ensemble_probabilities,
    plot_bootstrap,
    pooled_score,
    selection_record,
)

ENS = "ensemble_2d+3d_fullres"


def per_label_scores(rng, n_cases, means, spread=0.05):
    """{candidate: {case: {"1": dice, "2": dice}}} with per-candidate mean Dice."""
    return {
        name: {
            f"case_{i:03d}": {
                "1": float(np.clip(m + spread * rng.standard_normal(), 0, 1)),
                "2": float(np.clip(m + spread * rng.standard_normal(), 0, 1)),
            }
            for i in range(n_cases)
        }
        for name, m in means.items()
    }


def test_candidate_names_and_costs():
    assert candidate_names(["2d", "3d_fullres", "3d_lowres"]) == [
        "2d",
        "3d_fullres",
        "3d_lowres",
        "ensemble_2d+3d_fullres",
        "ensemble_2d+3d_lowres",
        "ensemble_3d_fullres+3d_lowres",
    ]
    assert candidate_names(["2d", "3d_fullres"], allow_ensembles=False) == ["2d", "3d_fullres"]
    assert candidate_members(ENS) == ["2d", "3d_fullres"] and candidate_cost(ENS) == 2
    assert candidate_cost("3d_cascade_fullres") == 1 and ensemble_name(["a", "b"]) == "ensemble_a+b"
    with pytest.raises(SelectionError):
        ensemble_name(["a+b", "c"])


def test_ensemble_probabilities_is_the_float32_mean():
    a = np.array([[0.2, 0.8], [1.0, 0.0]], np.float16)
    b = np.array([[0.6, 0.4], [0.0, 1.0]], np.float32)
    mean = ensemble_probabilities([a, b])
    assert mean.dtype == np.float32 and np.allclose(mean, [[0.4, 0.6], [0.5, 0.5]], atol=1e-3)
    assert a[0, 0] == np.float16(0.2), "inputs must not be modified"
    with pytest.raises(SelectionError):
        ensemble_probabilities([a, b[:1]])


def test_deterministic_for_a_seed():
    scores = per_label_scores(np.random.default_rng(0), 30, {"2d": 0.80, "3d_fullres": 0.81, ENS: 0.815})
    first = bootstrap_selection(scores, seed=7)
    again = bootstrap_selection(scores, seed=7)
    other = bootstrap_selection(scores, seed=8)
    assert jsonio.dumps(first) == jsonio.dumps(again)
    assert first["resample_scores"] != other["resample_scores"]
    assert len(first["resample_scores"]["2d"]) == 1000


def test_clear_winner():
    scores = per_label_scores(np.random.default_rng(1), 40, {"2d": 0.70, "3d_fullres": 0.90, ENS: 0.80}, 0.02)
    result = bootstrap_selection(scores, min_win_share=0.95)
    assert result["selected"] == result["nnunet_choice"] == "3d_fullres"
    best = result["candidates"]["3d_fullres"]
    assert best["p_best"] == 1.0 and result["candidates"]["2d"]["p_best"] == 0.0
    assert best["ci_low"] < best["score"] < best["ci_high"]
    assert best["ci_low"] > result["candidates"][ENS]["ci_high"]
    assert sum(c["p_best"] for c in result["candidates"].values()) == pytest.approx(1.0)
    assert result["comparisons"] == []  # the winner is already a single configuration


def test_pooled_score_is_nnunets_not_the_mean_of_case_means():
    table = np.array([[1.0, np.nan], [0.0, 0.5], [0.5, 0.5]])
    # label means: 0.5 and 0.5 → 0.5; the mean of per-case foreground means would be (1 + 0.25 + 0.5) / 3
    assert pooled_score(table) == pytest.approx(0.5)
    scores = {"a": {f"c{i}": {"1": row[0], "2": row[1]} for i, row in enumerate(table)}}
    assert bootstrap_selection(scores, n_bootstrap=10)["candidates"]["a"]["score"] == pytest.approx(0.5)


def test_tie_goes_to_the_cheaper_candidate():
    single = {f"c{i}": {"1": 0.5 + 0.01 * i, "2": 0.7} for i in range(20)}
    scores = {ENS: dict(single), "3d_fullres": dict(single), "2d": {c: {"1": 0.1, "2": 0.1} for c in single}}
    for share in (0.0, 0.5, 0.9):
        result = bootstrap_selection(scores, min_win_share=share)
        assert result["selected"] == result["nnunet_choice"] == "3d_fullres"
        assert result["order"][-1] == ENS
        assert (
            result["candidates"]["3d_fullres"]["p_best"] == 1.0
        )  # identical resampled scores: ties go first


def test_min_win_share_semantics():
    rng = np.random.default_rng(3)
    cases = [f"c{i}" for i in range(25)]
    base = {c: float(rng.uniform(0.7, 0.9)) for c in cases}
    # the ensemble is better on average, but only slightly and noisily
    ens = {c: base[c] + 0.004 + 0.02 * float(rng.standard_normal()) for c in cases}
    scores = {"3d_fullres": base, ENS: ens}
    default = bootstrap_selection(scores)
    assert default["nnunet_choice"] == ENS and default["selected"] == ENS
    (comparison,) = default["comparisons"]
    assert comparison["better"] == ENS and comparison["cheaper"] == "3d_fullres"
    assert 0.5 <= comparison["win_share"] < 0.95
    strict = bootstrap_selection(scores, min_win_share=0.95)
    assert strict["selected"] == "3d_fullres" and strict["nnunet_choice"] == ENS
    record = selection_record(strict)
    assert (
        record["changed_by_bootstrap"] and record["members"] == ["3d_fullres"] and not record["is_ensemble"]
    )
    assert record["all_results"][ENS] > record["score"]
    assert strict["comparisons"][0]["kept"] == "3d_fullres"
    # exactly at the win share the better candidate is kept (>=), just above it the cheaper one
    share = comparison["win_share"]
    assert bootstrap_selection(scores, min_win_share=share)["selected"] == ENS
    assert bootstrap_selection(scores, min_win_share=min(1.0, share + 1e-3))["selected"] == "3d_fullres"
    # a clearly better ensemble survives even a strict threshold
    clear = {"3d_fullres": base, ENS: {c: v + 0.05 for c, v in base.items()}}
    assert bootstrap_selection(clear, min_win_share=0.99)["selected"] == ENS


def test_default_threshold_always_reproduces_nnunet():
    """Even where the plain share of won resamples is below 0.5, min_win_share=0.5 keeps nnU-Net's choice."""
    rng = np.random.default_rng(11)
    below_half = 0
    for trial in range(150):
        n = int(rng.integers(5, 30))
        base = rng.uniform(0.6, 0.9, size=n)
        diff = rng.lognormal(-4, 1.5, size=n) * (1 if rng.random() < 0.5 else -1)
        diff = diff - diff.mean() + 1e-4 * rng.random()
        scores = {
            "3d_fullres": {f"c{i}": float(base[i]) for i in range(n)},
            ENS: {f"c{i}": float(base[i] + diff[i]) for i in range(n)},
        }
        result = bootstrap_selection(scores, n_bootstrap=300, seed=trial)
        assert result["selected"] == result["nnunet_choice"]
        if result["comparisons"] and result["comparisons"][0]["win_share_unshifted"] < 0.5:
            below_half += 1
            assert result["comparisons"][0]["win_share"] >= 0.5
    assert below_half > 0, "the data should include cases where the unshifted share is below one half"


def test_chain_of_cheaper_candidates():
    cases = [f"c{i}" for i in range(30)]
    rng = np.random.default_rng(5)

    def centred_noise():
        noise = 0.02 * rng.standard_normal(len(cases))
        return noise - noise.mean()

    base = 0.8 + centred_noise()
    mid = base + 0.001 + centred_noise()
    top = mid + 0.001 + centred_noise()
    scores = {
        "2d": dict(zip(cases, base.tolist(), strict=True)),
        "3d_fullres": dict(zip(cases, mid.tolist(), strict=True)),
        ENS: dict(zip(cases, top.tolist(), strict=True)),
    }
    costs = {"2d": 1, "3d_fullres": 2, ENS: 3}
    result = bootstrap_selection(scores, cost=costs, min_win_share=0.99)
    assert result["nnunet_choice"] == ENS and result["selected"] == "2d"
    assert [(c["better"], c["cheaper"]) for c in result["comparisons"]] == [
        (ENS, "3d_fullres"),
        ("3d_fullres", "2d"),
    ]
    assert bootstrap_selection(scores, cost=costs)["selected"] == ENS


def test_nan_handling():
    cases = [f"c{i}" for i in range(12)]
    # label 2 is empty (NaN) in most cases; a resample without any finite label-2 value scores NaN
    a = {c: {"1": 0.9, "2": (0.8 if i < 2 else math.nan)} for i, c in enumerate(cases)}
    b = {c: {"1": 0.85, "2": (0.7 if i < 2 else math.nan)} for i, c in enumerate(cases)}
    result = bootstrap_selection({"2d": a, "3d_fullres": b}, seed=1)
    assert result["selected"] == "2d"
    assert not math.isnan(result["candidates"]["2d"]["score"])
    n_finite = result["candidates"]["2d"]["n_finite_resamples"]
    assert 0 < n_finite < 1000
    assert result["candidates"]["2d"]["p_best"] == pytest.approx(
        n_finite / 1000
    )  # NaN resamples have no winner

    # a candidate whose score is NaN (a label never finite) cannot win
    c = {case: {"1": 1.0, "2": math.nan} for case in cases}
    assert bootstrap_selection({"2d": c, "3d_fullres": a}, n_bootstrap=50)["selected"] == "3d_fullres"
    with pytest.raises(SelectionError, match="NaN"):
        bootstrap_selection({"2d": c}, n_bootstrap=10)


def test_scalar_scores_and_errors():
    result = bootstrap_selection(
        {"2d": {"a": 0.5, "b": 0.7}, "3d_fullres": {"a": 0.6, "b": math.nan}}, n_bootstrap=20
    )
    assert result["candidates"]["2d"]["score"] == pytest.approx(0.6)
    assert result["candidates"]["3d_fullres"]["score"] == pytest.approx(0.6)
    assert result["selected"] == "2d"  # exact tie: first in order
    with pytest.raises(SelectionError, match="3d_fullres"):
        bootstrap_selection({"2d": {"a": 0.5, "b": 0.7}, "3d_fullres": {"a": 0.6}})
    with pytest.raises(SelectionError, match="min_win_share"):
        bootstrap_selection({"2d": {"a": 0.5}}, min_win_share=1.5)


def test_result_is_json_and_plots(tmp_path):
    scores = per_label_scores(np.random.default_rng(2), 15, {"2d": 0.8, "3d_fullres": 0.82, ENS: 0.83})
    result = bootstrap_selection(scores, n_bootstrap=200)
    jsonio.write_json(tmp_path / "bootstrap.json", result)
    assert jsonio.read_json(tmp_path / "bootstrap.json")["selected"] == result["selected"]
    plot_bootstrap(result, tmp_path / "plots" / "bootstrap.png")
    png = (tmp_path / "plots" / "bootstrap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
