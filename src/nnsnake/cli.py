"""The ``nnsnake`` command: segment new images with a finished workflow's results, export them, check a raw
dataset.

``nnsnake predict -i IN -o OUT -m results/<DatasetName>`` runs :func:`nnsnake.steps.predict`: the selected
configuration or ensemble, all its folds, mirroring, the postprocessing, the input's exact geometry. ``-m`` may
also name an nnU-Net trained-model folder ``<Trainer>__<Plans>__<configuration>`` (``--folds``, ``--checkpoint``
as nnU-Net's ``-f``, ``-chk``); its checkpoints are read without running any code they might carry.
``-m`` may also be a model bundle (``nnsnake export``'s zip, verified file by file) or an nnU-Net dataset results
folder with ``inference_information.json``. ``nnsnake export -m results/<DatasetName> -o model.zip`` writes
that bundle (``--format nnunet``: nnU-Net's trained-model layout). ``nnsnake verify DATASET`` reports every
problem of a raw dataset at once (the workflow's verify rule).
Deliberate errors (:class:`nnsnake.errors.NnsnakeError`: bad input folder, missing results, unknown device) and
file-system errors print one line ``nnsnake <command>: error: <message>`` and exit with status 1;
``--traceback`` shows where they came from. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from nnsnake import steps

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (steps.NnsnakeError, OSError)
AUTOCAST_CHOICES = ("auto", "off", "fp16", "bf16")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnsnake",
        description="nnU-Net as a Snakemake workflow: run the workflow with `snakemake`; these commands use or "
        "check its inputs and results.",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    predict = commands.add_parser(
        "predict",
        help="segment a folder of images with a trained results folder or an nnU-Net model",
        description="Segment every case {CASE}_{XXXX}<file_ending> of a folder with the model or ensemble the "
        "workflow selected, all its folds and its postprocessing, or with an nnU-Net trained-model folder. The "
        "model and the input folder are checked completely before anything is predicted.",
    )
    predict.add_argument(
        "-i", "--input", required=True, type=Path, help="folder of images {CASE}_{XXXX}<ending>"
    )
    predict.add_argument("-o", "--output", required=True, type=Path, help="folder for the segmentations")
    predict.add_argument(
        "-m",
        "--model",
        required=True,
        type=Path,
        metavar="MODEL",
        help="the workflow's results folder of the dataset, results/<DatasetName>; a model bundle model.zip "
        "(nnsnake export); an nnU-Net dataset results folder nnUNet_results/<DatasetXXX_Name> with "
        "inference_information.json (its selected model or ensemble and postprocessing); or an nnU-Net "
        "trained-model folder nnUNet_results/<DatasetXXX_Name>/<Trainer>__<Plans>__<configuration>",
    )
    predict.add_argument(
        "-f",
        "--folds",
        nargs="+",
        default=None,
        metavar="FOLD",
        help="folds to use (default: the cross-validated folds recorded in selection.json; for an nnU-Net model "
        "folder every fold_<k> it holds, fold_all only when named: --folds all)",
    )
    predict.add_argument(
        "--checkpoint",
        choices=("final", "best"),
        default="final",
        help="nnU-Net model folders: checkpoint_final.pth (default) or checkpoint_best.pth (nnU-Net's -chk)",
    )
    predict.add_argument(
        "--no-mirroring",
        action="store_true",
        help="switch mirroring test-time augmentation off (8x faster in 3D, slightly less accurate)",
    )
    predict.add_argument(
        "--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N or mps"
    )
    predict.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <case>.npz (class probabilities) and <case>.json (properties)",
    )
    predict.add_argument(
        "--continue",
        dest="continue_prediction",
        action="store_true",
        help="skip cases whose outputs already exist",
    )
    predict.add_argument(
        "--no-postprocessing",
        action="store_true",
        help="do not apply the postprocessing decided on cross-validation",
    )
    predict.add_argument(
        "--step-size",
        type=float,
        default=0.5,
        help="sliding-window step, a fraction of the patch (default 0.5, nnU-Net's)",
    )
    precision = predict.add_mutually_exclusive_group()
    precision.add_argument(
        "--autocast",
        choices=AUTOCAST_CHOICES,
        default=None,
        help="reduced precision of the forward passes: auto (default: fp16 on CUDA, full precision elsewhere, "
        "as nnU-Net), off, fp16 (CUDA only), bf16 (about 2-5x faster on CPUs with bf16 support, logits at bf16 "
        "precision)",
    )
    precision.add_argument(
        "--bf16",
        action="store_true",
        help="deprecated: use --autocast bf16 (on the CPU; on CUDA it meant fp16, as --autocast auto)",
    )
    predict.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all)")
    predict.add_argument(
        "--processes", type=int, default=1, help="processes for checking the input (default 1)"
    )
    predict.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")

    export = commands.add_parser(
        "export",
        help="write a finished model as a self-describing bundle (or in nnU-Net's layout) to share it",
        description="Export the model the workflow selected: an nnsnake bundle (.zip with the fold weights, plans, "
        "dataset.json, selection and postprocessing decisions, cross-validation summary and metadata.json with "
        "SHA-256 checksums), which `nnsnake predict -m model.zip` runs, or (--format nnunet) nnU-Net's "
        "trained-model layout for nnUNetv2_predict and nnUNetv2_install_pretrained_model_from_zip.",
    )
    export.add_argument(
        "-m",
        "--model",
        required=True,
        type=Path,
        metavar="RESULTS",
        help="the workflow's results/<DatasetName>",
    )
    export.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="the bundle, e.g. model.zip (--format nnunet: a .zip, or a folder used as nnUNet_results)",
    )
    export.add_argument(
        "--format", choices=("nnsnake", "nnunet"), default="nnsnake", help="bundle format (default nnsnake)"
    )
    export.add_argument(
        "--all",
        dest="all_candidates",
        action="store_true",
        help="include every trained candidate, not just the selected one",
    )
    export.add_argument(
        "--licence", default=None, metavar="TEXT", help="licence text recorded in metadata.json"
    )
    export.add_argument(
        "-f",
        "--folds",
        nargs="+",
        default=None,
        metavar="FOLD",
        help="folds to export (default: the cross-validated folds)",
    )
    export.add_argument("--quiet", action="store_true", help="warnings and errors only")

    verify = commands.add_parser(
        "verify",
        help="check a raw dataset (nnU-Net v2 layout) and list every problem",
        description="Read every file of a raw dataset once and report all problems at once, each with its file "
        "and fix (the workflow's verify rule).",
    )
    verify.add_argument(
        "dataset", type=Path, help="raw dataset folder with dataset.json, imagesTr/, labelsTr/"
    )
    verify.add_argument("-o", "--output", type=Path, default=None, help="also write the report as JSON")
    verify.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    return parser


def _autocast(args: argparse.Namespace) -> str | bool | None:
    """The autocast choice of the flags; ``--bf16`` keeps its old meaning (True: bf16 on the CPU, fp16 on CUDA)."""
    if not args.bf16:
        return args.autocast  # None (not given) means auto
    print(
        "nnsnake predict: warning: --bf16 is deprecated; use --autocast bf16 (CUDA: --autocast auto keeps fp16)",
        file=sys.stderr,
    )
    return True


def _predict(args: argparse.Namespace) -> int:
    settings = {
        "device": args.device,
        "mirroring": not args.no_mirroring,
        "step_size": args.step_size,
        "autocast": _autocast(args),
        "threads": args.threads,
    }
    result = steps.predict(
        args.input,
        args.output,
        args.model,
        folds=args.folds,
        settings=settings,
        save_probabilities=args.save_probabilities,
        continue_prediction=args.continue_prediction,
        postprocess=not args.no_postprocessing,
        checkpoint=args.checkpoint,
        processes=args.processes,
        progress=not args.quiet,
    )
    print(
        f"{result['n_predicted']} of {result['n_cases']} case(s) segmented with {result['selected']} into "
        f"{result['output_dir']} ({result['seconds']:.1f} s)"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from nnsnake.steps.export import export_model

    result = export_model(
        args.model,
        args.output,
        format=args.format,
        all_candidates=args.all_candidates,
        licence=args.licence,
        folds=args.folds,
    )
    print(f"exported {result['selected']} ({result['format']} format) to {result['output']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = steps.check_dataset(args.dataset, args.output, processes=args.processes)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.problems:
        print(
            f"{args.dataset}: {len(report.problems)} problem(s) in {report.n_cases} case(s):", file=sys.stderr
        )
        for problem in report.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"{args.dataset}: {report.n_cases} case(s), no problems")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nnsnake`` console script; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    handlers = {"predict": _predict, "export": _export, "verify": _verify}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"nnsnake {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as error:
        if args.traceback:
            raise
        print(f"nnsnake {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
