"""Finding a recipe for `kbench compare --recipe` and `kbench evaluate --recipe`.

A recipe is named (`cifar_resnet`: one of kbench's own, shipped beside the kbench package) or
given as a path to a Python file that follows the recipe contract (a `Config` dataclass,
`build_model(config)`, `build_datasets(config)`, `main(config, ...)`). Either way the file is
loaded by its path, as a module of its own, never as part of a `recipes` package, so a
`recipes/` folder in the user's working directory cannot stand in for kbench's, and nothing in
kbench depends on a recipe (recipes are leaves).
"""

import importlib.util
import os
import sys

from kbench.errors import KbenchError, reason
from kbench.flags import check_config_class

# kbench's own recipes lie beside the package: in a checkout (and an editable install) the
# repository's recipes/ folder, in a wheel install the `recipes` folder it installs.
KBENCH_RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "recipes")
CONTRACT = ("Config", "build_model", "build_datasets", "main")


def installed_recipes():
    """Names of kbench's own recipes."""
    if not os.path.isdir(KBENCH_RECIPES):
        return []
    return sorted(name[:-3] for name in os.listdir(KBENCH_RECIPES)
                  if name.endswith(".py") and not name.startswith("_"))


def recipe_path(name_or_path):
    """The file of a recipe: a path to a .py file as given, or a kbench recipe's name."""
    if name_or_path.endswith(".py") or os.sep in name_or_path:
        path = os.path.abspath(os.path.expanduser(name_or_path))
        if os.path.isdir(path):
            raise KbenchError(f"recipe file {name_or_path} is a folder: pass a recipe script "
                              "in it, e.g. --recipe ./my_recipe.py")
        if not os.path.isfile(path):
            raise KbenchError(f"recipe file {name_or_path}: no such file")
        if not path.endswith(".py"):
            raise KbenchError(f"recipe file {name_or_path} is not a Python file (.py); pass "
                              "a recipe script, e.g. --recipe ./my_recipe.py")
        return path
    path = os.path.join(KBENCH_RECIPES, f"{name_or_path}.py")
    if not os.path.isfile(path):
        known = ", ".join(installed_recipes()) or "none found"
        raise KbenchError(f"unknown recipe {name_or_path!r} (kbench's recipes: {known}); "
                          "or pass the path of your own recipe file, e.g. --recipe ./my_recipe.py")
    return path


def load_recipe(name_or_path):
    """Import a recipe file as a module (`kbench_recipe_<file name>`), checked against the
    recipe contract."""
    path = recipe_path(name_or_path)
    stem = os.path.splitext(os.path.basename(path))[0]
    module_name = f"kbench_recipe_{stem}"
    if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == path:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        refused = _load_error(path, exc)
        if refused is None:
            raise
        raise refused from None
    try:
        missing = [name for name in CONTRACT if not hasattr(module, name)]
        if missing:
            raise KbenchError(f"{path} is not a recipe: it has no {', '.join(missing)} "
                              "(a recipe defines Config, build_model, build_datasets and main)")
        check_config_class(module.Config, f"{path}'s Config")
    except KbenchError:
        del sys.modules[module_name]  # or the next load would take it unchecked
        raise
    return module


def check_main_takes_callbacks(module):
    """kbench compare calls a recipe's `main(config, callbacks=[timer])`: a main that cannot
    take that is refused before any run, not after one has trained. (Only compare calls it so:
    `kbench evaluate --recipe` and a recipe run as a script take any main.)"""
    import inspect

    path = getattr(module, "__file__", module.__name__)
    try:
        signature = inspect.signature(module.main)
    except (TypeError, ValueError):  # not introspectable: let the call tell
        return
    try:
        signature.bind(None, callbacks=[])
    except TypeError:
        raise KbenchError(f"{path}'s main{signature} cannot be called as main(config, "
                          "callbacks=[...]): a recipe's main is main(config, model=None, "
                          "datasets=None, callbacks=())") from None


def _load_error(path, exc):
    """The one-line KbenchError for a recipe file that fails while it is imported, or None to
    let `exc` through (kbench's own errors, Ctrl-C and signals). The traceback is the user's
    to see by running the file itself."""
    if isinstance(exc, (KbenchError, KeyboardInterrupt)) or not isinstance(
            exc, (Exception, SystemExit)):
        return None
    if isinstance(exc, SystemExit):  # sys.exit(): status 0; sys.exit("why"): its message
        status = 0 if exc.code is None else exc.code
        said = f"status {status}" if isinstance(status, int) else repr(status)
        return KbenchError(f"{path} exited ({said}) while being imported: importing a recipe "
                           "only defines Config, build_model, build_datasets and main; start "
                           "its run under `if __name__ == \"__main__\":`")
    if isinstance(exc, SyntaxError):  # in the recipe, or in a module of yours it imports
        where = f"line {exc.lineno}" if exc.lineno else "its text"
        if exc.filename and os.path.abspath(exc.filename) != path:
            where += f" of {exc.filename}"
        return KbenchError(f"{path} does not load: SyntaxError at {where} ({exc.msg}): mend "
                           "the file")
    return KbenchError(f"{path} does not load: {reason(exc)} while it is imported; run "
                       f"`python {path}` to see where")


def recipe_name(name_or_path):
    """What a recipe is called in records and output folders: its file name without .py."""
    return os.path.splitext(os.path.basename(name_or_path))[0]
