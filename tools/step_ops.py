"""Count the PyTorch ops of one eager Keras-torch train step, with kbench's fast path on or off.

    KERAS_BACKEND=torch .venv/bin/python tools/step_ops.py --model resnet20 --dtype-policy mixed_bfloat16 --fast-path on

Builds the cifar_resnet model and optimizer (kbench.train.compile_model), runs 3 warm-up
`train_on_batch` steps on a fixed synthetic batch, then profiles one step with the torch
profiler and prints its aten op count, the casts (`to`, `_to_copy`) and copies (`copy_`,
`contiguous`, `clone`) among them, and the most frequent ops. Op counts do not depend on the
machine's load (host milliseconds do; they are not printed). docs/compare.md quotes it.
"""

import argparse
import collections
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dtype-policy", default="float32",
                        choices=("float32", "mixed_bfloat16", "mixed_float16"))
    parser.add_argument("--fast-path", default="on", choices=("on", "off"))
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.exit(2, "error: --batch-size must be >= 1\n")
    if os.environ.get("KERAS_BACKEND", "torch") != "torch":
        parser.exit(2, "error: step_ops counts PyTorch ops: run it with KERAS_BACKEND=torch\n")
    os.environ["KERAS_BACKEND"] = "torch"

    import keras
    import numpy as np
    import torch

    from kbench import fast_path
    from kbench.config import TrainConfig
    from kbench.models import get_model
    from kbench.train import compile_model, setup_run

    config = TrainConfig(epochs=1, batch_size=args.batch_size, jit_compile="off",
                         dtype_policy=args.dtype_policy)
    setup_run(config)
    fast_path.set_enabled(args.fast_path == "on")
    model = get_model(args.model, 10, (32, 32, 3), seed=0)
    compile_model(model, config, steps_per_epoch=100)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.integers(0, 256, (args.batch_size, 32, 32, 3)).astype("float32"))
    y = torch.tensor(keras.utils.to_categorical(np.arange(args.batch_size) % 10, 10))
    for _ in range(3):
        model.train_on_batch(x, y)
    with torch.profiler.profile() as profile:
        model.train_on_batch(x, y)
    counts = collections.Counter(e.name for e in profile.events() if e.name.startswith("aten::"))

    def total(names):
        return sum(counts[name] for name in names)

    print(f"{args.model} {args.dtype_policy} fast path {args.fast_path}, batch {args.batch_size}: "
          f"{sum(counts.values())} aten ops/step, to/_to_copy {total(('aten::to', 'aten::_to_copy'))}, "
          f"copy_/contiguous/clone {total(('aten::copy_', 'aten::contiguous', 'aten::clone'))}")
    print("most frequent:", ", ".join(f"{k[6:]} {v}" for k, v in counts.most_common(12)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
