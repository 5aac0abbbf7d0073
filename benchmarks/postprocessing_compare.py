"""Postprocessing decisions side by side: nnsnake's ``determine_postprocessing`` vs nnunetv2's, same folders.

    python benchmarks/postprocessing_compare.py --ref LABELS_DIR PREDICTIONS_DIR [PREDICTIONS_DIR ...]

For every folder of cross-validation predictions (label files named like the references), both tools decide
nnU-Net's keep-largest-component postprocessing against the same references: first for the whole foreground,
then per label. nnunetv2 runs in the anchor venv (``$VENV``, default /tmp/venv-nnunet) on a copy of the folder
(it writes ``summary.json`` and ``postprocessing.pkl`` into it), with the anchor's plans and dataset.json
(``--anchor-pre``). Printed per folder: the chosen steps of each tool, and the mean Dice before and after
(foreground mean and per label) of each tool, with the largest difference. Exit status 1 if the decisions differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

DATASET = "Dataset004_Hippocampus"


def nnunet_child(predictions: str, references: str, plans: str, dataset_json: str, processes: int) -> None:
    """Runs in the anchor venv. The ``__main__`` guard below matters: nnunetv2's spawn pool re-imports this file."""
    import io
    from contextlib import redirect_stdout

    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    printed = io.StringIO()
    with redirect_stdout(printed):
        functions, kwargs = determine_postprocessing(
            predictions,
            references,
            plans,
            dataset_json,
            num_processes=processes,
            keep_postprocessed_files=False,
        )
    record = json.loads((Path(predictions) / "postprocessing.json").read_text())
    steps = [
        {"function": f.__name__, "labels_or_regions": k["labels_or_regions"]}
        for f, k in zip(functions, kwargs, strict=True)
    ]
    print(json.dumps({"steps": steps, "record": record, "printed": printed.getvalue().splitlines()}))


def run_nnunet(predictions: Path, references: Path, anchor_pre: Path, processes: int) -> dict:
    # imported here, not at the top: the nnunetv2 child runs in the anchor venv, which has no psutil
    from common import anchor_bin

    with tempfile.TemporaryDirectory(prefix="nnunet_pp_") as tmp:
        copy = Path(tmp) / "predictions"
        shutil.copytree(predictions, copy, ignore=shutil.ignore_patterns("*.json", "*.pkl", "*.npz"))
        spec = [
            str(copy),
            str(references),
            str(anchor_pre / DATASET / "nnUNetPlans.json"),
            str(anchor_pre / DATASET / "dataset.json"),
            str(processes),
        ]
        proc = subprocess.run(
            [anchor_bin("python"), __file__, "--nnunet-child", *spec], capture_output=True, text=True
        )
        if proc.returncode != 0:
            sys.exit(f"nnunetv2 determine_postprocessing failed on {predictions}:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def run_nnsnake(predictions: Path, references: Path, dataset_json: dict, processes: int) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    from nnsnake.postprocessing import determine_postprocessing

    labels = [v for k, v in dataset_json["labels"].items() if k != "background"]
    messages: list[str] = []
    decision = determine_postprocessing(
        predictions,
        references,
        labels,
        dataset_json["file_ending"],
        processes=processes,
        log=messages.append,
    )
    decision["printed"] = messages
    return decision


def compare(predictions: Path, references: Path, anchor_pre: Path, processes: int) -> bool:
    from common import print_table

    dataset_json = json.loads((anchor_pre / DATASET / "dataset.json").read_text())
    theirs = run_nnunet(predictions, references, anchor_pre, processes)
    ours = run_nnsnake(predictions, references, dataset_json, processes)
    their_steps = [
        sorted(s["labels_or_regions"])
        if isinstance(s["labels_or_regions"], list)
        else [s["labels_or_regions"]]
        for s in theirs["steps"]
    ]
    our_steps = [sorted(s["labels"]) for s in ours["steps"]]
    print(f"\n{predictions} ({ours['n_cases']} cases)")
    for line in theirs["printed"]:
        print(f"  nnunetv2: {line}")
    for line in ours["printed"]:
        print(f"  nnsnake:  {line}")
    rows = [("Dice", "nnunetv2", "nnsnake", "|diff|")]
    largest = 0.0
    for stage in ("input_folder", "postprocessed"):
        pairs = [
            (
                "foreground mean",
                theirs["record"][stage]["foreground_mean"]["Dice"],
                ours[stage]["foreground_mean"]["Dice"],
            )
        ]
        for key, value in theirs["record"][stage]["mean"].items():
            pairs.append((f"label {key}", value["Dice"], ours[stage]["mean"][str(key)]["Dice"]))
        for name, a, b in pairs:
            largest = max(largest, abs(a - b))
            rows.append((f"{stage}: {name}", f"{a:.6f}", f"{b:.6f}", f"{abs(a - b):.1e}"))
    print_table(rows)
    same = their_steps == our_steps
    print(
        f"  steps: nnunetv2 {their_steps}, nnsnake {our_steps} -> {'same' if same else 'DIFFERENT'}; "
        f"largest Dice difference {largest:.1e}"
    )
    return same and largest < 1e-6


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--nnunet-child":
        nnunet_child(*sys.argv[2:6], int(sys.argv[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("predictions", type=Path, nargs="+", help="folders of cross-validation predictions")
    parser.add_argument("--ref", type=Path, required=True, help="folder of reference label files")
    parser.add_argument("--anchor-pre", type=Path, default=Path("/tmp/nnsnake_anchor/pre"))
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    results = [compare(p, args.ref, args.anchor_pre, args.processes) for p in args.predictions]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
