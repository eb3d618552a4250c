"""Command lines from Config dataclasses: every field is a flag (`batch_size` -> `--batch-size`).

Recipes declare their knobs once, as a dataclass with defaults; this turns it into argparse so
flags and fields can never drift apart. Field metadata may carry `help` and `choices`.
"""

import argparse
import dataclasses
import os
import re
import types
import typing


def flag_of(field_name):
    """The command-line flag of a Config field: `batch_size` -> `--batch-size`."""
    return "--" + field_name.replace("_", "-")


def _flag_type(annotation):
    """(argparse type, is_bool) for int, float, str, bool and `X | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if annotation is bool:
        return None, True
    return annotation, False


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error: ...` line (exit status 2), like every other
    kbench error, instead of the usage block followed by the error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class CommandParser(OneLineErrorParser):
    """The parser of one command of a command line with commands (`kbench compare`): an
    argument it does not know is its own error, pointing at its own help. argparse hands
    such arguments back to the top-level parser, whose error would point at `kbench --help`,
    which does not list the command's flags."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each flag's default, unless there is none to show (None, a switch off)
    or the help text already says it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


class ConfigHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, unless it is unset (None: argparse's `(default: None)`
    says nothing) or the help already says it in words (`(default: one pass)`)."""

    def _get_help_string(self, action):
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def check_config_class(config_cls, where="Config"):
    """A recipe's Config is a dataclass class. Without its own @dataclasses.dataclass, a
    subclass of TrainConfig still counts as one (its base is), but the fields it adds stay
    raw `option(...)` Field objects, which failed deep inside training as arithmetic on a
    Field."""
    from kbench.errors import KbenchError

    raw = ([name for name, value in vars(config_cls).items()
            if isinstance(value, dataclasses.Field)] if isinstance(config_cls, type) else [])
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)) or raw:
        fields = f" (its fields {', '.join(raw)} are not dataclass fields)" if raw else ""
        raise KbenchError(f"{where} is not a dataclass{fields}: put @dataclasses.dataclass "
                          "on the class; kbench reads its fields as the run's settings")


def build_parser(config_cls, description=None):
    from kbench.config import field_setting  # (kbench.config loads Keras: not at import)

    check_config_class(config_cls, getattr(config_cls, "__qualname__", "Config"))
    parser = OneLineErrorParser(description=description, formatter_class=ConfigHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = flag_of(field.name)
        kind, is_bool = _flag_type(hints[field.name])
        help_text = field.metadata.get("help", " ")
        allowed = field_setting(config_cls, field.name, "allowed")
        if allowed is not None:
            help_text += f" [{allowed}{', or unset' if field.default is None else ''}]"
        options = dict(default=field.default, help=help_text)
        if is_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        else:
            parser.add_argument(flag, type=kind, choices=field_setting(config_cls, field.name,
                                                                    "choices"),
                                metavar=field.metadata.get("metavar"), **options)
    return parser


def parse_config(config_cls, argv=None, description=None):
    """Parse argv (default sys.argv[1:]) into a `config_cls` instance.

    `--config FILE` (a run's config.json or metrics.json, or any JSON object of settings)
    supplies the defaults; flags given beside it override them. So
    `python recipes/x.py --config runs/x/jax/metrics.json` re-runs a run exactly, into the
    folder a fresh run of the running backend gets (or --output-dir): not the saved run's
    own, which it would replace (under another backend, with that backend's results). Only
    with --resume does it continue in the saved folder.
    """
    from kbench.config import check

    parser = build_parser(config_cls, description)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="take every setting from a saved config.json / metrics.json; "
                             "flags given as well override it")
    args = parser.parse_args(argv)  # the command line alone: its --resume, its --output-dir
    notes = []  # what of the file a re-run does not use: said, not dropped without a word
    if args.config:
        saved, recipe = load_settings(args.config, config_cls)
        check_saved_values(args.config, config_cls, saved, given_fields(parser, argv))
        if not args.resume:  # a re-run: a fresh run's folder, unless --output-dir names one
            saved_folder = saved.pop("output_dir", None)
            elsewhere = saved_folder and not _fresh_run_folder(saved_folder, recipe)
            if elsewhere and args.output_dir is None:
                notes.append(f"note: not writing into {saved_folder}, the output_dir "
                             f"{args.config} names: a re-run goes where a fresh run goes; pass "
                             f"--output-dir {saved_folder} to write there, or --resume to "
                             "continue that run")
            if saved.pop("resume", None) is True:  # a resumed run's file says resume: true
                notes.append(f"note: not resuming, though {args.config} says resume: true (a "
                             "re-run starts afresh): pass --resume to continue the run")
        elif args.output_dir is None and saved.get("output_dir"):
            # --resume continues in the folder the file names: where a file is in its way,
            # say so in the file's words (later checks would blame an --output-dir never given)
            _check_resume_folder(saved["output_dir"], args.config)
        parser.set_defaults(**saved)
        args = parser.parse_args(argv)
    settings = dict(vars(args))
    settings.pop("config")
    config = config_cls(**settings)
    check(config)  # ranges; also the values a --config FILE brought, which argparse never sees
    monitor = getattr(config, "monitor", "")
    if monitor.startswith("val_") and not getattr(config, "validate_every_epoch", True):
        # only early stopping on it is refused (check_combination): the run itself is fine
        notes.append(f"note: no best.keras: --monitor {monitor} is logged only with "
                     "--validate-every-epoch, which is off; pass --monitor "
                     f"{monitor.removeprefix('val_')} to keep the best epoch by its training "
                     "value")
    if os.environ.get("RANK", "0") == "0":  # once, not by every process torchrun starts
        for note in notes:
            print(note)
    return config


def _check_resume_folder(folder, path):
    """Raise KbenchError where a file stands in the way of `folder`, the output_dir the
    settings file `path` names (a missing folder is Run's to refuse: it holds no checkpoint)."""
    from kbench.errors import KbenchError
    from kbench.files import existing_part

    part = existing_part(folder)
    if not os.path.isdir(part):
        raise KbenchError(f"nothing to resume in {folder}, the output_dir {path} names ({part} "
                          "is a file, not a folder): pass the --output-dir of the run to "
                          "continue, or run without --resume to start afresh")


def _fresh_run_folder(folder, recipe):
    """Whether `folder` is where a fresh run of `recipe` under this backend goes (a re-run of
    the same backend's saved run writes there: nothing to say)."""
    from kbench.config import default_output_dir

    return bool(recipe) and os.path.abspath(folder) == os.path.abspath(
        default_output_dir(recipe))


def load_settings(path, config_cls):
    """(the settings a saved file holds, checked against `config_cls`'s fields; the recipe it
    names, or None)."""
    import json

    from kbench.errors import KbenchError

    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise KbenchError(f"cannot read settings from {path}: {exc}") from None
    outer = saved if isinstance(saved, dict) else {}
    if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
        saved = saved["config"]  # metrics.json keeps the settings under "config"
    if not isinstance(saved, dict):
        raise KbenchError(f"{path} holds no settings (expected a JSON object of flag values)")
    fields = {field.name for field in dataclasses.fields(config_cls)}
    from kbench.config import CONFIG_LABELS

    recipe = saved.get("recipe", outer.get("recipe"))  # config.json's / metrics.json's label
    saved = {k: v for k, v in saved.items() if k not in CONFIG_LABELS}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise KbenchError(f"{path} has settings this recipe does not know: {', '.join(unknown)} "
                          "(saved by another recipe?)")
    return saved, recipe if isinstance(recipe, str) else None


def check_saved_values(path, config_cls, saved, overridden):
    """Each value of a settings file the command line does not override, checked as its flag
    is, in one line that names the file and the field: argparse would blame a flag the
    command line never had (`argument --epochs: invalid int value: 'three'`)."""
    from kbench.config import check_values
    from kbench.errors import KbenchError

    try:
        check_values(config_cls, {k: v for k, v in saved.items() if k not in overridden})
    except KbenchError as bad:  # "--epochs 'three' is ..." -> "epochs 'three' is ..."
        said = re.sub(r"^--([\w-]+)", lambda flag: flag[1].replace("-", "_"), str(bad))
        raise KbenchError(f"{path}: {said}; correct it there, or give the flag to override "
                          "it") from None


def given_fields(parser, argv):
    """The fields `argv` itself sets, abbreviated flags (`--output`) included: argparse,
    asked again with every default suppressed, keeps only what the command line gave. For a
    flat parser whose defaults come from add_argument (a recipe's, tools/overhead.py's): the
    defaults of subcommands and of set_defaults are not suppressed."""
    import copy

    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def run_recipe(main, config_cls, argv=None, description=None):
    """The `if __name__ == "__main__"` of every recipe: parse flags, run, one-line errors."""
    from kbench.errors import exit_on_error

    exit_on_error(lambda: main(parse_config(config_cls, argv, description)))
