"""The `kbench` command: env, compare, report, evaluate, export, predict.

Each verb is a small function; bad input ends as one `error: ...` line and exit status 2.
"""

import argparse
import json
import os
import sys

from kbench import __version__
from kbench.bench import cli as bench_cli
from kbench.errors import exit_on_error
from kbench.flags import CommandParser, DefaultsHelpFormatter, OneLineErrorParser


def cmd_env(args):
    """Print the active backend, its devices and the versions of everything that matters."""
    from kbench import backend

    info = backend.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kbench env (KERAS_BACKEND={info['backend']})", show_header=False)
    table.add_row("backend", info["backend"])
    table.add_row("devices", ", ".join(info["devices"]))
    table.add_row("jit_compile (auto)", "Keras decides: XLA under jax, and under tensorflow "
                  "where a GPU is present; torch eager")
    for name, version in info["versions"].items():
        table.add_row(name, version or "not installed")
    Console().print(table)
    return 0


def cmd_evaluate(args):
    """Evaluate a saved model on its dataset's test split; write eval.json and the PNG."""
    from kbench.evaluation import evaluate_saved_model, summary_line

    from kbench.files import writable_folder

    if args.output_dir is None:  # beside the model, as its metrics.json is
        args.output_dir = os.path.dirname(os.path.abspath(args.model))
    writable_folder(args.output_dir, "--output-dir")  # before the evaluation, not after it
    result = evaluate_saved_model(args.model, args.output_dir, dataset=args.dataset,
                                  data_dir=args.data_dir, test_examples=args.test_examples,
                                  batch_size=args.batch_size, recipe=args.recipe,
                                  download=args.download)
    print(f"{result['model']} on {result['dataset']} under {result['backend']}: "
          f"{summary_line(result)}; wrote {args.output_dir}/eval.json and "
          "confusion_matrix.png")
    return 0


def cmd_export(args):
    """Export a saved model to ONNX or a SavedModel and check it against Keras."""
    from kbench.export import export_model
    from kbench.files import writable_folder

    writable_folder(os.path.dirname(os.path.abspath(args.output)), "--output", args.output)
    info = export_model(args.model, args.output, args.format, tolerance=args.tolerance,
                        backend=args.backend)
    print(f"exported {info['model']} as {info['format']} under {info['backend']} to "
          f"{info['output']}: max abs diff {info['max_abs_diff']:.2e} from Keras under "
          f"{' and '.join(info['checked_under'])} on a test batch "
          f"(tolerance {info['tolerance']:.1e})")
    return 0


def cmd_predict(args):
    """Print the top classes of image files or .npy arrays."""
    from kbench.predict import format_predictions, predict_files

    rows = predict_files(args.model, args.inputs, top=args.top)
    print(json.dumps(rows, indent=2) if args.json else format_predictions(rows))
    return 0


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _tolerance(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not 0 <= value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"must be a finite difference >= 0, not {text}")
    return value


def _existing_file(text):
    """A path argument checked before any framework loads (what a file holds is checked when
    it is read)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    return text


def add_model_verbs(verbs):
    evaluate = verbs.add_parser(
        "evaluate", help="accuracy, top-5, per-class metrics and confusion matrix of a model",
        description="Evaluate a saved model.keras on its dataset's test split. The settings of "
                    "the run (dataset, data dir, sizes, seed) come from the metrics.json next "
                    "to the model when there is one; flags override them.")
    evaluate.add_argument("model", metavar="MODEL.keras", type=_existing_file,
                          help="a model saved by Keras")
    evaluate.add_argument("--output-dir", default=None,
                          help="where eval.json and confusion_matrix.png go (default: the "
                               "model's folder)")
    evaluate.add_argument("--dataset", help="dataset name (default: the one that trained it)")
    evaluate.add_argument("--data-dir", help="where the dataset lies (default: the run's, "
                                             "else the dataset's usual place)")
    evaluate.add_argument("--download", action="store_true",
                          help="download the dataset when it is missing and the network answers")
    evaluate.add_argument("--test-examples", type=_positive_int,
                          help="evaluate on the first N test examples (default: the run's, "
                               "from its metrics.json)")
    evaluate.add_argument("--batch-size", type=_positive_int,
                          help="evaluation batch size (default: the run's)")
    evaluate.add_argument("--recipe", metavar="NAME_OR_FILE",
                          help="build the test split with this recipe's build_datasets: a "
                               "kbench recipe's name or your own recipe file (default: "
                               "kbench's own pipeline for the dataset)")
    evaluate.set_defaults(func=cmd_evaluate)

    export = verbs.add_parser(
        "export", help="export a model to ONNX or a TensorFlow SavedModel, checked",
        description="Export a saved model.keras with Keras' model.export, run the artifact "
                    "(onnxruntime / TensorFlow) on a test batch and compare with Keras.")
    export.add_argument("model", metavar="MODEL.keras", type=_existing_file,
                        help="a model saved by Keras")
    export.add_argument("--format", required=True, choices=("onnx", "savedmodel"),
                        help="onnx: one .onnx file; savedmodel: TensorFlow's SavedModel folder")
    export.add_argument("--output", required=True,
                        help="file (onnx) or folder (savedmodel) to write")
    export.add_argument("--tolerance", type=_tolerance, default=None,
                        help="largest allowed output difference from Keras "
                             "(default: 1e-4 x the largest |logit|, at least 1e-4)")
    export.add_argument("--backend", choices=("jax", "tensorflow", "torch"), default=None,
                        help="the Keras backend that exports (default: KERAS_BACKEND when it "
                             "can export the format here, else the first of tensorflow, "
                             "torch, jax that can, in a subprocess)")
    export.set_defaults(func=cmd_export)

    predict = verbs.add_parser(
        "predict", help="top classes of image files or .npy arrays",
        description="Classify images (PNG, JPEG: resized to the model's input, raw 0..255 "
                    "pixels) or .npy arrays (one input or a batch) with a saved model.")
    predict.add_argument("model", metavar="MODEL.keras", type=_existing_file,
                         help="a model saved by Keras")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", type=_existing_file,
                         help="image files and/or .npy arrays")
    predict.add_argument("--top", type=_positive_int, default=5, help="classes to show")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(func=cmd_predict)


def build_parser():
    """The whole command line. Building and parsing it loads no framework, so help, version
    and usage errors answer at once (tests/test_cli.py holds it to that)."""
    parser = OneLineErrorParser(prog="kbench", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kbench {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show the frameworks' start-up logs (TensorFlow's C++ lines), "
                             "as KBENCH_VERBOSE=1 does")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND",
                                  parser_class=CommandParser)  # its own unknown arguments

    env = verbs.add_parser("env", help="backend, devices and versions",
                           description="The active backend (KERAS_BACKEND), its devices and "
                                       "the versions of everything that matters.")
    env.add_argument("--json", action="store_true", help="print JSON")
    env.set_defaults(func=cmd_env)

    bench_cli.add_verbs(verbs)
    add_model_verbs(verbs)
    for verb in verbs.choices.values():  # every command's help shows its defaults
        verb.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.verbose:
        from kbench import imports

        imports.show_startup_logs()
    sys.exit(exit_on_error(args.func, args) or 0)


if __name__ == "__main__":
    main()
