"""Check `kbench compare`'s step times against an independent measurement: plain `model.fit`.

    KERAS_BACKEND=jax .venv/bin/python tools/verify_timing.py --batch-size 128 --steps 40
    .venv/bin/python tools/verify_timing.py --all --results runs/cmp/results.jsonl

Builds the same model, data and optimizer as the cifar_resnet recipe, runs one short fit to
compile, then times a second `model.fit(steps_per_epoch=N)` with nothing but a wall clock
around it (no kbench callbacks, no per-step synchronization beyond what fit itself does). The
per-step time (elapsed / N) should agree with compare's median step time within the noise.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def fit_step_ms(batch_size, steps, model_name):
    import kbench  # noqa: F401
    from kbench import fast_path, train
    from recipes import cifar_resnet

    config = cifar_resnet.Config(dataset="synthetic", model=model_name, batch_size=batch_size,
                                 epochs=1, steps_per_epoch=steps, verbose=0, output_dir=None)
    train.setup_run(config)
    fast_path.set_enabled(True)  # as a kbench run has it (a no-op under jax)
    train_ds, _ = cifar_resnet.build_datasets(config)
    model = cifar_resnet.build_model(config)
    train.compile_model(model, config, steps)
    model.fit(train_ds.dataset, epochs=1, steps_per_epoch=3, verbose=0)  # trace and compile
    start = time.perf_counter()
    history = model.fit(train_ds.dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    float(history.history["loss"][-1])  # the epoch's logs are host values: work is done
    return 1000.0 * (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--all", action="store_true", help="run jax, tensorflow and torch")
    parser.add_argument("--results", help="a compare results.jsonl to set the numbers beside")
    args = parser.parse_args()
    if not args.all:
        ms = fit_step_ms(args.batch_size, args.steps, args.model)
        print(json.dumps({"backend": os.environ.get("KERAS_BACKEND"), "fit_step_ms": ms}))
        return
    compare = {}
    if args.results:
        with open(args.results) as f:
            for line in f:
                row = json.loads(line)
                if row.get("status") == "ok":
                    compare[row["backend"]] = row
    print(f"{'backend':<12}{'model.fit ms/step':>20}{'compare median':>16}{'p10-p90':>16}")
    for backend in ("jax", "tensorflow", "torch"):
        out = subprocess.run([sys.executable, __file__, "--batch-size", str(args.batch_size),
                              "--steps", str(args.steps), "--model", args.model],
                             env={**os.environ, "KERAS_BACKEND": backend},
                             capture_output=True, text=True, check=True)
        ms = json.loads(out.stdout.strip().splitlines()[-1])["fit_step_ms"]
        row = compare.get(backend)
        ref = f"{row['step_time_ms']:.1f}" if row else "-"
        spread = f"{row['step_time_p10_ms']:.1f}-{row['step_time_p90_ms']:.1f}" if row else "-"
        print(f"{backend:<12}{ms:>20.1f}{ref:>16}{spread:>16}")


if __name__ == "__main__":
    main()
