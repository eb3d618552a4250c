"""Which backend exports which kbench model, and how closely: the table in docs/models.md.

    .venv/bin/python tools/export_matrix.py --output /tmp/export-matrix
    .venv/bin/python tools/export_matrix.py --models convnet,resnet20 --formats onnx
    .venv/bin/python tools/export_matrix.py --backends jax --formats onnx --kbench ENV/bin/kbench

Builds each registry model at its recipe's input shape (untrained, seed 0: what exports does
not depend on the weights), saves it as model.keras, then runs the real command,
`kbench export MODEL.keras --format F --backend B --output ...`, once per format and backend,
each in its own process, as a user would. Prints one markdown table as it goes and writes it
to OUTPUT/table.md: the largest difference from Keras that `kbench export` printed, or the
first line of its error.
"""

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Each model at the input its recipe gives it (mnist_convnet: 28x28x1; imdb_transformer: 200
# tokens of a 20k vocabulary, 2 classes).
MODELS = {
    "convnet": dict(num_classes=10, input_shape=(28, 28, 1)),
    "resnet9": dict(num_classes=10, input_shape=(32, 32, 3)),
    "resnet20": dict(num_classes=10, input_shape=(32, 32, 3)),
    "preact_resnet18": dict(num_classes=10, input_shape=(32, 32, 3)),
    "text_transformer": dict(num_classes=2, input_shape=(200,), vocab_size=20_000),
    "text_lstm": dict(num_classes=2, input_shape=(200,), vocab_size=20_000),
}
FORMATS = ("onnx", "savedmodel")
BACKENDS = ("tensorflow", "jax", "torch")
DIFF = re.compile(r"max abs diff (\S+) from Keras")


def save_models(names, folder):
    """model.keras of each name under folder/NAME/, built under this process's backend."""
    import kbench  # noqa: F401  (registers kbench's layers)
    from kbench.models import get_model

    paths = {}
    for name in names:
        path = os.path.join(folder, name, "model.keras")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        get_model(name, seed=0, **MODELS[name]).save(path)
        paths[name] = path
    return paths


def export_cell(model_path, format, backend, kbench):
    """What `kbench export` says for one cell: 'max abs diff X' or 'error: ...' (first line)."""
    output = os.path.join(os.path.dirname(model_path),
                          f"{backend}.{'onnx' if format == 'onnx' else 'savedmodel'}")
    done = subprocess.run([kbench, "export", model_path, "--format", format,
                           "--backend", backend, "--output", output],
                          capture_output=True, text=True)
    found = DIFF.search(done.stdout)
    if done.returncode == 0 and found:
        return found.group(1)
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines[-1:] or [f"exit status {done.returncode}"])[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the models, exports, table")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--kbench",
                        default=os.path.join(os.path.dirname(sys.executable), "kbench"),
                        help="the kbench command to run (default: the one beside this Python): "
                             "another environment's, such as one with jax2onnx installed")
    args = parser.parse_args(argv)
    names, formats, backends = (args.models.split(","), args.formats.split(","),
                                args.backends.split(","))
    for given, allowed, flag in ((names, MODELS, "--models"), (formats, FORMATS, "--formats"),
                                 (backends, BACKENDS, "--backends")):
        unknown = [g for g in given if g not in allowed]
        if unknown:
            parser.exit(2, f"error: {flag}: unknown {', '.join(map(repr, unknown))}; use any of: "
                           f"{', '.join(allowed)}\n")
    if not os.access(args.kbench, os.X_OK):
        parser.exit(2, f"error: --kbench {args.kbench} is not an executable kbench command\n")
    if os.path.exists(args.output) and os.listdir(args.output):
        parser.exit(2, f"error: --output {args.output} is not empty: pass a new folder\n")
    paths = save_models(names, args.output)
    lines = ["| model | format | " + " | ".join(backends) + " |",
             "| --- | --- |" + " --- |" * len(backends)]
    print("\n".join(lines), flush=True)
    for name in names:
        for format in formats:
            cells = [export_cell(paths[name], format, backend, args.kbench) for backend in backends]
            lines.append(f"| {name} | {format} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    with open(os.path.join(args.output, "table.md"), "w") as table:
        table.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
