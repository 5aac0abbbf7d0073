"""nnsnake's cross-validation of a region / ignore-label dataset next to nnunetv2's own evaluation of it.

    python benchmarks/labels_compare.py RESULTS/<Dataset> RAW/<Dataset>

For a finished workflow result folder (``results/<Dataset>``) and its raw dataset, runs in the anchor venv
(nnunetv2 2.8.1, ``/tmp/venv-nnunet`` or ``$NNSNAKE_ANCHOR_VENV``), on nnsnake's own prediction folders:

- ``compute_metrics_on_folder`` on every ``crossval/<candidate>`` folder (labels or regions, ignore label from
  dataset.json), against nnsnake's ``summary.json``: per-label/region mean Dice and foreground mean;
- ``determine_postprocessing`` on the selected candidate's folder, against ``postprocessing.json``'s steps;
- ``ensemble_folders`` on the two members' probability files (``.npz``) of every ``ensemble_<a>+<b>`` folder,
  against nnsnake's ensemble label maps (voxels that differ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VENV = Path(os.environ.get("NNSNAKE_ANCHOR_VENV", "/tmp/venv-nnunet"))

ANCHOR_SIDE = r"""
import json, os, pickle, shutil, sys
from pathlib import Path
if __name__ == "__main__":
    from nnunetv2.ensembling.ensemble import ensemble_folders
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    task = json.loads(sys.argv[1])
    work = Path(task["work"])
    dj = json.loads(Path(task["dataset_json"]).read_text())
    ending = dj["file_ending"]
    lm = LabelManager(dj["labels"], dj.get("regions_class_order"))
    evaluated = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    plans = work / "plans.json"
    plans.write_text(json.dumps({"image_reader_writer": "SimpleITKIO"}))
    out = {"metrics": {}, "ensembles": {}}
    for name, folder in task["candidates"].items():
        r = compute_metrics_on_folder(task["labels"], folder, str(work / f"{name}.json"), SimpleITKIO(), ending,
                                      evaluated, lm.ignore_label, num_processes=1)
        out["metrics"][name] = {"foreground_mean": r["foreground_mean"]["Dice"],
                                "mean": {str(k): v["Dice"] for k, v in r["mean"].items()}}
    pp = work / "pp"
    shutil.copytree(task["candidates"][task["selected"]], pp, ignore=shutil.ignore_patterns("*.npz", "*.json"))
    determine_postprocessing(str(pp), task["labels"], str(plans), task["dataset_json"], num_processes=1,
                             keep_postprocessed_files=False)
    decision = json.loads((pp / "postprocessing.json").read_text())
    steps = [kw["labels_or_regions"] for kw in decision["postprocessing_kwargs"]]
    out["postprocessing"] = [sorted(v) if isinstance(v, list) else [v] for v in steps]
    for name, members in task["ensembles"].items():
        staged = []
        for i, folder in enumerate(members):
            d = work / f"{name}_in{i}"
            d.mkdir()
            for npz in Path(folder).glob("*.npz"):
                os.symlink(npz, d / npz.name)
                props = json.loads((Path(folder) / (npz.stem + ".json")).read_text())
                props["spacing"] = props["sitk_stuff"]["spacing"]
                with open(d / (npz.stem + ".pkl"), "wb") as fh:
                    pickle.dump(props, fh)
            staged.append(str(d))
        ensemble_folders(staged, str(work / f"{name}_out"), save_merged_probabilities=False, num_processes=1,
                         dataset_json_file_or_dict=task["dataset_json"], plans_json_file_or_dict=str(plans))
        out["ensembles"][name] = str(work / f"{name}_out")
    print("RESULT " + json.dumps(out))
"""


def main() -> None:
    import numpy as np
    import SimpleITK as sitk

    results, raw = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    crossval = results / "crossval"
    candidates = {p.name: str(p) for p in sorted(crossval.iterdir()) if (p / "summary.json").is_file()}
    selection = json.loads((results / "selection.json").read_text())
    ensembles = {
        name: [str(crossval / m) for m in name.removeprefix("ensemble_").split("+")]
        for name in candidates
        if name.startswith("ensemble_")
    }
    with tempfile.TemporaryDirectory() as tmp:
        task = {
            "work": tmp,
            "dataset_json": str(raw / "dataset.json"),
            "labels": str(raw / "labelsTr"),
            "candidates": candidates,
            "selected": selection["selected"],
            "ensembles": ensembles,
        }
        run = subprocess.run(
            [str(VENV / "bin" / "python"), "-c", ANCHOR_SIDE, json.dumps(task)],
            capture_output=True,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"nnunetv2 side failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        theirs = json.loads(line.removeprefix("RESULT "))
        print(f"{'candidate':<42}{'key':<12}{'nnunetv2':>10}{'nnsnake':>10}")
        worst = 0.0
        for name, values in theirs["metrics"].items():
            ours = json.loads((crossval / name / "summary.json").read_text())
            rows = [("foreground", values["foreground_mean"], ours["foreground_mean"]["Dice"])]
            rows += [(k, v, ours["mean"][k]["Dice"]) for k, v in values["mean"].items()]
            for key, a, b in rows:
                worst = max(worst, abs(a - b))
                print(f"{name:<42}{key:<12}{a:10.6f}{b:10.6f}")
        print(f"largest Dice difference: {worst:.2e}")
        ours_steps = [s["labels"] for s in json.loads((results / "postprocessing.json").read_text())["steps"]]
        print(f"postprocessing steps: nnunetv2 {theirs['postprocessing']}, nnsnake {ours_steps}")
        for name, folder in theirs["ensembles"].items():
            differing = total = 0
            for path in sorted(
                Path(folder).glob("*" + json.loads((raw / "dataset.json").read_text())["file_ending"])
            ):
                a = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
                b = sitk.GetArrayFromImage(sitk.ReadImage(str(crossval / name / path.name)))
                differing, total = differing + int(np.sum(a != b)), total + a.size
            print(f"{name}: {differing} of {total} voxels differ from nnunetv2's ensemble_folders")


if __name__ == "__main__":
    main()
