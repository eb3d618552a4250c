"""`make overhead`: host time per training step of every backend and native twin at a batch so
small that compute vanishes (ResNet-20, batch 2), compiled and not, plus a layer-by-layer
profile of Keras-torch. The work is kbench.bench.overhead; see its docstring and
docs/compare.md ("Host overhead").

    .venv/bin/python tools/overhead.py [--output DIR] [--steps 30] [--plan] [--no-profile]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kbench.bench.overhead import run_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main())
