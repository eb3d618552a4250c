"""The input pipeline's own rate: how fast a recipe's training tf.data pipeline delivers
batches with nothing consuming them but a loop, on the host CPU.

    python -m kbench.bench.input_rate --batch-sizes 1024,512 [--recipe cifar_resnet]
        [--model resnet20] [--dataset synthetic] [--steps 50] [--warmup-steps 5]

prints one JSON object per batch size: batches/s, examples/s and ms per batch of
`recipe.build_datasets(config)`'s training stream (augmentation included), read as NumPy
batches, which is how Keras under jax and torch and the native twins take them. A training
run whose step time is near or under that ms per batch is bounded by its input, whatever the
framework (`make gpu-check` prints both; compare's `input_wait_fraction` says how long a run
waited).
"""

import argparse
import json
import statistics
import sys
import time


def pipeline_rate(recipe_name="cifar_resnet", model="resnet20", batch_size=128,
                  dataset="synthetic", steps=50, warmup_steps=5):
    """{batch_size, batches_per_sec, examples_per_sec, ms_per_batch, ms_per_batch_p90} of the
    recipe's training pipeline: `warmup_steps` batches untimed (tf.data starts its threads
    and fills its buffers), then `steps` batches each timed."""
    from kbench.bench.records import percentile
    from kbench.recipe import load_recipe

    recipe = load_recipe(recipe_name)
    config = recipe.Config(dataset=dataset, model=model, batch_size=batch_size, verbose=0)
    train_ds, _ = recipe.build_datasets(config)
    dataset = getattr(train_ds, "dataset", train_ds)
    batches = dataset.repeat().as_numpy_iterator()
    for _ in range(warmup_steps):
        next(batches)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - start)
    total = sum(times)
    return {"batch_size": batch_size, "recipe": recipe_name, "model": model,
            "dataset": config.dataset,
            "steps": steps, "batches_per_sec": steps / total,
            "examples_per_sec": steps * batch_size / total,
            "ms_per_batch": 1000 * statistics.median(times),
            "ms_per_batch_p90": 1000 * percentile(times, 90)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kbench.bench.input_rate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="128", metavar="N,N,...")
    parser.add_argument("--recipe", default="cifar_resnet")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.batch_sizes.split(",") if s.strip()]
    if not sizes or not all(s.isdigit() and int(s) >= 1 for s in sizes):
        parser.exit(2, f"error: --batch-sizes takes integers >= 1, not {args.batch_sizes!r}\n")
    if args.steps < 1 or args.warmup_steps < 0:
        parser.exit(2, "error: --steps must be >= 1 and --warmup-steps >= 0\n")
    from kbench.errors import KbenchError

    try:
        for size in sizes:
            print(json.dumps(pipeline_rate(args.recipe, args.model, int(size), args.dataset,
                                           args.steps, args.warmup_steps)), flush=True)
    except KbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
