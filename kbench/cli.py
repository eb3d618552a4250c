"""The `kbench` command: env, compare, report.

Each verb is a small function; bad input ends as one `error: ...` line and exit status 2.
"""

import argparse
import json
import sys

from kbench.bench import cli as bench_cli
from kbench.errors import exit_on_error


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
    table.add_row("jit_compile (auto)", str(backend.default_jit_compile()))
    for name, version in info["versions"].items():
        table.add_row(name, version or "not installed")
    Console().print(table)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="kbench", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    env = verbs.add_parser("env", help="backend, devices and versions")
    env.add_argument("--json", action="store_true", help="print JSON")
    env.set_defaults(func=cmd_env)

    bench_cli.add_verbs(verbs)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    sys.exit(exit_on_error(args.func, args) or 0)


if __name__ == "__main__":
    main()
