"""Command line: `python -m bloodcell_lib COMMAND ...`; each command is a thin call into one module."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from bloodcell_lib.atomic import describe_os_error
from bloodcell_lib.errors import BloodcellError, TrainingInterrupted

# Exit codes: 0 ok, 1 unexpected failure, 2 bad input the user can fix (missing class, bad split, unwritable
# output...), 130 stopped with Ctrl-C (the shell's convention for SIGINT).
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _cmd_synth(args: argparse.Namespace) -> int:
    from bloodcell_lib.synthetic import make_synthetic_dataset

    manifest = make_synthetic_dataset(
        args.out, per_class=args.per_class, size=args.size, duplicates=args.duplicates,
        seed=args.seed, shortcut=args.shortcut,
    )
    print(f"Wrote synthetic set to {Path(args.out).resolve()} (manifest: {manifest})")
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from bloodcell_lib.dataset import check_dataset

    report = check_dataset(args.data_dir, progress=not args.quiet)
    print(report.summary())
    if args.json:
        report.save_json(args.json)
        print(f"Report written to {args.json}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from bloodcell_lib.split import make_split, save_split, split_summary

    split = make_split(
        args.data_dir, val=args.val, test=args.test, seed=args.seed,
        split_by=args.split_by, metadata=args.metadata,
    )
    save_split(split, args.out)
    print(split_summary(split))
    print(f"Split written to {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from bloodcell_lib.config import resolve
    from bloodcell_lib.registry import get_arch
    from bloodcell_lib.training import train_from_config

    cfg = resolve(
        args.profile, spec=get_arch(args.arch), data_dir=args.data_dir, split_path=args.split,
        epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
        weights=args.weights, output_dir=args.output, seed=args.seed,
        run_eagerly=True if args.eager else None,
    )
    print("\n".join([f"Profile {cfg.profile} ({cfg.why('profile')})", *cfg.note_lines()]))
    result = train_from_config(cfg)
    print(f"Model saved to {result.model_path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from bloodcell_lib.evaluation import evaluate_saved_model, evaluation_config

    # Unset options come from the configuration the model was trained with, so the numbers equal the notebook's.
    cfg = evaluation_config(args.model, profile=args.profile, seed=args.seed, bootstrap=args.bootstrap,
                            gradcam_images=args.gradcam_images)
    results = evaluate_saved_model(
        args.model, args.split, output_dir=args.output, subset=args.subset, data_dir=args.data_dir, cfg=cfg,
        allow_other_split=args.allow_other_split,
    )
    print(json.dumps({k: results["metrics"][k] for k in ("accuracy", "macro_f1", "myeloblast_recall")}, indent=2))
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from bloodcell_lib.baseline import baseline_resampling, run_shortcut_baseline

    n_boot, seed = baseline_resampling(args.output, profile=args.profile, n_boot=args.bootstrap, seed=args.seed)
    results = run_shortcut_baseline(args.split, output_dir=args.output, data_dir=args.data_dir, n_boot=n_boot,
                                    seed=seed)
    print(f"Colour-only baseline accuracy: {results['metrics']['accuracy']:.3f}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from bloodcell_lib.compare import compare_study
    from bloodcell_lib.report import write_comparison_report

    # The baseline is trained on the study's split when missing; cross-validation folds are combined in cv/.
    comparison, folder, cross = compare_study(args.results_dir)
    if cross is not None and cross is not comparison:
        print(f"(The cross-validated comparison is in {folder.parent / 'cv'}.)")
    print(comparison.to_markdown())
    paths = comparison.save(folder)
    paths["html"] = write_comparison_report(folder, comparison)
    print("Saved " + ", ".join(str(path) for path in paths.values()))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from bloodcell_lib.predict import predict_files

    rows = predict_files(args.model, args.images, gradcam_dir=args.gradcam)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            if "error" in row:
                print(f"{row['path']}: skipped — {row['error']}")
                continue
            probs = ", ".join(f"{k} {v:.3f}" for k, v in row["probabilities"].items())
            overlay = f" → {row['gradcam']}" if "gradcam" in row else ""
            print(f"{row['path']}: {row['class']} ({probs}){overlay}")
    # Unreadable files are reported per row; the run fails only when no image could be classified.
    return EXIT_USER_ERROR if all("error" in row for row in rows) else 0


class _HelpFormatter(argparse.HelpFormatter):
    """Wide help where every sub-command's description stays on its own line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=24, width=120)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse measures sub-command names one indent level shallower than it prints them.
        for sub in getattr(action, "_get_subactions", lambda: [])():
            self._action_max_length = max(self._action_max_length,
                                          len(sub.metavar or sub.dest) + self._current_indent + 2 * self._indent_increment)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with one sub-command per step of the study."""
    parser = argparse.ArgumentParser(
        prog="python -m bloodcell_lib",
        formatter_class=_HelpFormatter,
        description="Blood-cell transfer-learning suite: data checking, leakage-safe splits, "
        "fine-tuning, evaluation, Grad-CAM and comparison.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("synth", "Write a synthetic Wright-Giemsa blood-cell set in the Kaggle layout.", _cmd_synth)
    p.add_argument("--out", required=True, help="folder to create (must not hold another dataset)")
    p.add_argument("--per-class", type=int, default=200, help="original cells per class")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--duplicates", type=int, default=2, help="augmented copies written per original cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shortcut", action="store_true", help="tint the background by class, like the real set's two sources")

    p = add("check-data", "Check a dataset folder: counts, unreadable files, duplicates; never writes into it.", _cmd_check_data)
    p.add_argument("data_dir")
    p.add_argument("--json", help="also write the full report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("split", "Make a stratified train/val/test split that keeps duplicate groups together.", _cmd_split)
    p.add_argument("data_dir")
    p.add_argument("--out", required=True, help="split CSV to write")
    p.add_argument("--val", type=float, default=0.15)
    p.add_argument("--test", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split-by", choices=("group", "image"), default="group",
                   help="'image' ignores duplicates and leaks; it exists only to measure that leakage")
    p.add_argument("--metadata", help="optional CSV with columns file,group to merge into duplicate groups")

    p = add("train", "Train one architecture (pretrained: two-phase fine-tuning; weights none: end to end) and save it.", _cmd_train)
    p.add_argument("--arch", required=True, help="registry key, e.g. vgg16, resnet50, xception, densenet201, efficientnetb3")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", help="split CSV; made (and saved next to the model) when omitted")
    p.add_argument("--epochs", type=int, help="total epochs over both phases")
    p.add_argument("--image-size", help="'native' or a side length in pixels")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--weights", help="imagenet | none | PATH to a weights file")
    p.add_argument("--output", help="output folder (default: $BLOODCELL_OUTPUT, else 'Saved Models')")
    p.add_argument("--seed", type=int)
    p.add_argument("--profile", help="paper | demo | smoke presets (default: $BLOODCELL_PROFILE, else paper)")
    p.add_argument("--eager", action="store_true", help="run eagerly (skips graph tracing; faster on tiny CPU runs)")

    p = add("evaluate", "Evaluate a saved model on a split: metrics with intervals, Grad-CAM numbers, cost.", _cmd_evaluate)
    p.add_argument("--model", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--output", help="folder for results (default: the model's folder)")
    p.add_argument("--subset", default="test", choices=("train", "val", "test"))
    p.add_argument("--data-dir", help="dataset root (default: the one recorded with the split)")
    p.add_argument("--allow-other-split", action="store_true",
                   help="evaluate on a split the model was not trained on (results are labelled so)")
    p.add_argument("--profile", help="take unset options from this profile instead of the model's training run")
    p.add_argument("--seed", type=int, help="bootstrap and Grad-CAM seed (default: the training run's)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples (default: the training run's profile's)")
    p.add_argument("--gradcam-images", type=int, help="images explained (default: the training run's profile's)")

    p = add("baseline", "Train and evaluate the colour-only shortcut baseline on a split.", _cmd_baseline)
    p.add_argument("--split", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--profile", help="take the bootstrap from this profile instead of the models in --output")
    p.add_argument("--seed", type=int, help="bootstrap seed (default: the models' in --output, else the profile's)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples (default: as for --seed)")

    p = add("compare", "Build the cross-model comparison table from a results folder.", _cmd_compare)
    p.add_argument("results_dir")

    p = add("predict", "Classify image files with a saved model, optionally writing Grad-CAM overlays.", _cmd_predict)
    p.add_argument("--model", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--gradcam", help="folder for Grad-CAM overlay images")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except TrainingInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BloodcellError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of ours
        sys.stderr.close()
        return 0
    except OSError as exc:  # a path the library did not wrap (a folder given for a file, a full disk...)
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted; nothing half-written was kept (every file is written atomically).", file=sys.stderr)
        return EXIT_INTERRUPTED
