"""Command lines from Config dataclasses: every field is a flag (`batch_size` -> `--batch-size`).

Recipes declare their knobs once, as a dataclass with defaults; this turns it into argparse so
flags and fields can never drift apart. Field metadata may carry `help` and `choices`.
"""

import argparse
import dataclasses
import types
import typing


def _flag_type(annotation):
    """(argparse type, is_bool) for int, float, str, bool and `X | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if annotation is bool:
        return None, True
    return annotation, False


def build_parser(config_cls, description=None):
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        kind, is_bool = _flag_type(hints[field.name])
        options = dict(default=field.default, help=field.metadata.get("help", " "))
        if is_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        else:
            parser.add_argument(flag, type=kind, choices=field.metadata.get("choices"),
                                metavar=field.metadata.get("metavar"), **options)
    return parser


def parse_config(config_cls, argv=None, description=None):
    """Parse argv (default sys.argv[1:]) into a `config_cls` instance."""
    args = build_parser(config_cls, description).parse_args(argv)
    return config_cls(**vars(args))


def run_recipe(main, config_cls, argv=None, description=None):
    """The `if __name__ == "__main__"` of every recipe: parse flags, run, one-line errors."""
    from kbench.errors import exit_on_error

    config = parse_config(config_cls, argv, description)
    exit_on_error(main, config)
