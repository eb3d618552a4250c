"""Every setting of every recipe is checked before anything is built, the same way for flags,
`--config FILE` and `main(Config(...))`: one line naming the flag, the value and what it
takes, exit status 2. (kbench compare --set: tests/test_compare.py.)"""

import dataclasses
import json
import math
import sys
import time
import typing

import numpy as np
import pytest

import kbench  # noqa: F401
from kbench.config import FREE_TEXT, Range, check, field_setting
from kbench.errors import KbenchError
from kbench.flags import parse_config, run_recipe
from recipes import cifar_resnet, finetune, imdb_transformer, mnist_convnet

pytestmark = pytest.mark.backend_independent

RECIPES = (cifar_resnet, finetune, imdb_transformer, mnist_convnet)


def invalid_values(config_cls, field):
    """[(value, whether it can be typed as a flag)] that `field` must refuse."""
    kinds = [k for k in typing.get_args(typing.get_type_hints(config_cls)[field.name])
             if k is not type(None)] or [typing.get_type_hints(config_cls)[field.name]]
    kind = kinds[0]
    bad = []
    if kind is bool:
        return [("yes", False), (1, False)]  # --flag / --no-flag cannot say anything else
    choices = field_setting(config_cls, field.name, "choices")
    if choices is not None:
        bad.append(("no_such_choice" if kind is str else 99, True))
    allowed = field_setting(config_cls, field.name, "allowed")
    if allowed is not None and not isinstance(allowed, Range):  # a set of names (--model)
        bad.append(("no_such_name", True))
    elif allowed is not None:
        step = 1 if kind is int else 0.5
        if allowed.low is not None:
            bad.append((allowed.low if allowed.low_open else allowed.low - step, True))
        if allowed.high is not None:
            bad.append((allowed.high if allowed.high_open else allowed.high + step, True))
    if kind is float:  # 1e39 overflows float32, which training computes in
        bad += [(math.nan, True), (math.inf, True), (1e39, True)]
    if kind is str and field.name not in FREE_TEXT:
        bad.append(("", True))
    if kind in (int, float):
        bad.append(("3", False))  # a string where a number belongs: main(Config(...)) only
    return bad


def flag_text(value):
    return "nan" if isinstance(value, float) and math.isnan(value) else str(value)


CASES = [(recipe, field, value, as_flag)
         for recipe in RECIPES for field in dataclasses.fields(recipe.Config)
         for value, as_flag in invalid_values(recipe.Config, field)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.__name__.split(".")[-1])
def test_every_field_refuses_something_or_is_free_text(recipe):
    """A new field without a range, choices or type to check fails here: declare what it
    takes next to its default (option(..., allowed=Range(...)))."""
    for field in dataclasses.fields(recipe.Config):
        assert invalid_values(recipe.Config, field) or field.name in FREE_TEXT, field.name


def test_every_invalid_value_is_one_line_exit_2(entry_point_error):
    checked = 0
    for recipe, field, value, as_flag in CASES:
        flag = "--" + field.name.replace("_", "-")
        start = time.monotonic()
        if as_flag:  # the command line: argparse (types, choices) or kbench's check (ranges)
            status, err = entry_point_error(run_recipe, recipe.main, recipe.Config,
                                            [f"{flag}={flag_text(value)}"])
            assert status == 2 and err.count("\n") == 1, (flag, value, err)
            assert err.startswith("error: ") and flag in err, (flag, value, err)
            assert "Traceback" not in err
        # main(Config(...)), as a script or notebook calls a recipe
        with pytest.raises(KbenchError) as error:
            recipe.main(recipe.Config(**{field.name: value}))
        message = str(error.value)
        assert message.startswith(f"{flag} ") and "\n" not in message, (flag, value, message)
        assert "it takes" in message or "must be set" in message, message
        assert time.monotonic() - start < 10
        checked += 1
    assert checked == len(CASES) > 100


def test_messages_say_what_is_allowed(entry_point_error):
    status, err = entry_point_error(run_recipe, cifar_resnet.main, cifar_resnet.Config,
                                    ["--momentum", "2"])
    assert (status, err) == (2, "error: --momentum 2.0 is not allowed: it takes a finite "
                                "number >= 0 and < 1\n")
    with pytest.raises(KbenchError, match=r"^--steps-per-epoch 0 is not allowed: it takes an "
                                          r"integer >= 1, or leave it unset$"):
        check(cifar_resnet.Config(steps_per_epoch=0))
    check(cifar_resnet.Config(steps_per_epoch=None, decay_epochs=None))  # unset is fine
    with pytest.raises(KbenchError, match=r"^--lr 1e\+308 is not allowed: it takes a finite "
                                          r"number > 0 \(float32, which training computes in, "
                                          r"holds at most 3.403e\+38\)$"):
        check(cifar_resnet.Config(lr=1e308))
    with pytest.raises(KbenchError, match=r"^--lr 1000+ is not allowed: .* holds at most"):
        check(cifar_resnet.Config(lr=10 ** 400))  # an int, as JSON reads --set lr=1000...0
    with pytest.raises(KbenchError, match=r"^--momentum 1e\+39 is not allowed: it takes a "
                                          r"finite number >= 0 and < 1$"):  # the range says why
        check(cifar_resnet.Config(momentum=1e39))
    check(imdb_transformer.Config(lr=1, dropout=0))  # an int where a float belongs is fine
    # NumPy numbers (a loop over an array of settings) are numbers, made Python's.
    config = check(cifar_resnet.Config(batch_size=np.int64(32), lr=np.float32(0.5)))
    assert (config.batch_size, config.lr) == (32, 0.5) and type(config.batch_size) is int
    # Rules between fields: finetune may skip either stage, not both.
    check(finetune.Config(head_epochs=0, epochs=1))
    with pytest.raises(KbenchError, match="--head-epochs and --epochs are both 0"):
        check(finetune.Config(head_epochs=0, epochs=0))
    # --monitor names what fit logs; early stopping on a val_ metric needs validation
    with pytest.raises(KbenchError, match="--monitor 'val_acc' is not allowed: it takes one of "
                                          "val_accuracy, val_loss, accuracy, loss"):
        check(cifar_resnet.Config(monitor="val_acc"))
    with pytest.raises(KbenchError, match="only --validate-every-epoch logs: turn it on, or "
                                          "monitor loss"):
        check(cifar_resnet.Config(monitor="val_loss", early_stopping=2,
                                  validate_every_epoch=False))
    check(cifar_resnet.Config(monitor="loss", early_stopping=2, validate_every_epoch=False))


def test_a_config_file_is_checked_like_flags(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": {"epochs": -1, "lr": 0.05}}))
    with pytest.raises(KbenchError, match=f"^{path}: epochs -1 is not allowed: it takes an "
                                          "integer >= 1; correct it there, or give the flag to "
                                          "override it$"):
        parse_config(mnist_convnet.Config, ["--config", str(path)])
    # A flag given beside the file overrides its bad value, in either of its forms.
    assert parse_config(mnist_convnet.Config, ["--config", str(path), "--epochs", "2"]).epochs == 2
    assert parse_config(mnist_convnet.Config, ["--config", str(path), "--epochs=2"]).epochs == 2
    # A value of the wrong type is the file's, not a flag's (argparse would have said
    # "argument --epochs: invalid int value"); a switch or number in quotes says how to write it
    for settings, message in [({"epochs": "three"}, "epochs 'three' is not allowed: it takes an "
                                                    "integer; correct"),
                              ({"epochs": "3"}, "epochs '3' is not allowed: it takes an integer "
                                                "\\(write the number without quotes\\)"),
                              ({"augment": "False"}, "augment 'False' is not allowed: it takes "
                                                     "true or false \\(write false: lowercase, "
                                                     "without quotes\\)")]:
        path.write_text(json.dumps(settings))
        with pytest.raises(KbenchError, match=f"^{path}: {message}"):
            parse_config(mnist_convnet.Config, ["--config", str(path)])


def test_monitoring_a_val_metric_without_validation_says_no_best_model(capsys):
    """Without --validate-every-epoch no val_ metric is logged, so no best.keras is kept:
    a run that asked for neither early stopping nor the file goes on, but says so."""
    parse_config(cifar_resnet.Config, ["--no-validate-every-epoch"])
    assert capsys.readouterr().out.splitlines() == [
        "note: no best.keras: --monitor val_accuracy is logged only with --validate-every-epoch, "
        "which is off; pass --monitor accuracy to keep the best epoch by its training value"]
    parse_config(finetune.Config, ["--no-validate-every-epoch", "--monitor", "val_loss"])
    assert "--monitor val_loss is logged only" in capsys.readouterr().out
    for argv in (["--no-validate-every-epoch", "--monitor", "loss"], [],
                 ["--monitor", "val_loss"]):
        parse_config(cifar_resnet.Config, argv)
        assert capsys.readouterr().out == "", argv


def test_help_shows_the_allowed_range(capsys):
    with pytest.raises(SystemExit):
        parse_config(cifar_resnet.Config, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "label smoothing of the cross-entropy [>= 0 and < 1]" in text
    assert "[>= 1, or unset]" in text
    # An unset default is not shown as None, and a default said in words is not said twice.
    assert "(default: None)" not in text and text.count("(default: one pass)") == 1
    assert "optimizer steps per epoch (default: one pass) [>= 1, or unset] --batch-size" in text


def test_a_recipe_run_refuses_at_once(run_python):
    start = time.monotonic()
    result = run_python("recipes/cifar_resnet.py", "--epochs", "-1", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --epochs -1 is not allowed: it takes an integer >= 1")
    # Nothing is loaded or built before the check: loading data first would fail on the missing
    # CIFAR files with another message, and building or training takes far longer than the
    # start-up (Keras and TensorFlow imports: 5 s on a quiet machine, 13 s seen under load;
    # the bound leaves room for the other test worker starting several interpreters at once).
    assert time.monotonic() - start < 60, sys.executable
