"""Fingerprint + plan wall time: nnsnake vs nnunetv2 2.8.1, same data, same number of processes, same run.

    python benchmarks/plan.py [--dataset ../shared/data/Dataset004_Hippocampus] [--processes 2] [--repeats 1]

nnunetv2 side: ``nnUNetv2_extract_fingerprint -d ID -np N --clean`` then ``nnUNetv2_plan_experiment -d ID``
(the anchor venv, see ../shared/anchor). nnsnake side: ``nnsnake.steps.fingerprint`` then ``nnsnake.steps.plan``
in a fresh Python process (imports included, as a user waits for them). Both include interpreter start-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import SHARED, anchor_bin, dataset_id, link_raw, measure, nnunet_env, print_table

NNSNAKE_SNIPPET = """
import sys
from nnsnake import steps
raw, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps.fingerprint(raw, out + "/fingerprint.json", processes=n)
steps.plan(out + "/fingerprint.json", raw, out + "/plans.json")
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", type=Path, default=SHARED / "data" / "Dataset004_Hippocampus")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    ds = args.dataset.resolve()
    rows = [("run", "nnunetv2 s", "nnsnake s", "ratio", "nnunetv2 peak MB", "nnsnake peak MB")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = nnunet_env(root / "nnunet")
        link_raw(root / "nnunet", ds)
        for rep in range(args.repeats):
            fp = measure(
                [
                    anchor_bin("nnUNetv2_extract_fingerprint"),
                    "-d",
                    dataset_id(ds),
                    "-np",
                    str(args.processes),
                    "--clean",
                ],
                env=env,
            )
            pl = measure([anchor_bin("nnUNetv2_plan_experiment"), "-d", dataset_id(ds)], env=env)
            if fp.returncode or pl.returncode:
                sys.exit(f"nnunetv2 failed:\n{fp.output[-3000:]}\n{pl.output[-3000:]}")
            out = root / f"nnsnake{rep}"
            out.mkdir()
            ours = measure(
                [sys.executable, "-c", NNSNAKE_SNIPPET, str(ds), str(out), str(args.processes)], env=env
            )
            if ours.returncode:
                sys.exit(f"nnsnake failed:\n{ours.output[-3000:]}")
            theirs = fp.wall_s + pl.wall_s
            rows.append(
                (
                    f"{ds.name} #{rep}",
                    f"{theirs:.2f} ({fp.wall_s:.2f}+{pl.wall_s:.2f})",
                    f"{ours.wall_s:.2f}",
                    f"{theirs / ours.wall_s:.2f}x",
                    f"{max(fp.peak_rss_mb, pl.peak_rss_mb):.0f}",
                    f"{ours.peak_rss_mb:.0f}",
                )
            )
    print(f"fingerprint + plan, {args.processes} processes (ratio = nnunetv2 time / nnsnake time)")
    print_table(rows)


if __name__ == "__main__":
    main()
