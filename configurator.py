"""Run configuration, as in nanoGPT: a script's defaults, then plain-Python config files,
then --key=value overrides, with every key and type checked; and the one way options are
checked (check_options), so every command's bad value reads the same.

    python train.py config/ruby_002.py --device=cpu --max_iters=20 --init_from=path/to/dir

A config file is ordinary Python; every top-level name not starting with '_' must be a key
the script knows. Overrides take --key=value, --key value, or a bare --flag for True.
Values keep the default's type (an int is accepted where a float is expected).
"""

import math
import sys
from pathlib import Path

from common import GrafitoError


def load_config(defaults, argv=None, alternatives=()):
    """Defaults updated by each argument in order: config files (*.py) and --key=value overrides.

    alternatives: pairs of keys that say the same thing two ways (train.py's epochs and max_iters):
    setting one to a non-zero value puts the other back to its default, so whichever is given
    last wins (0 means "not this way" and leaves the other alone); one file may set only one.
    """
    config = dict(defaults)
    alternative_of = {a: b for pair in alternatives for a, b in (pair, pair[::-1])}

    def assign(key, value):
        config[key] = value
        if key in alternative_of and value:
            config[alternative_of[key]] = defaults[alternative_of[key]]

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print_help(defaults)
        sys.exit(0)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise GrafitoError(f"unexpected argument {arg!r}: give config files (*.py) and --key=value overrides")
            values = read_config_file(arg)
            both = [(a, b) for a, b in alternatives if values.get(a) and values.get(b)]
            if both:
                raise GrafitoError(f"{arg}: sets both {both[0][0]} and {both[0][1]}, which say the same thing "
                                   f"two ways; keep one")
            for key, value in values.items():
                assign(key, _checked(key, value, defaults, where=arg))
            continue
        key, has_value, text = arg[2:].partition("=")
        if key not in defaults:
            raise GrafitoError(f"unknown option --{key}{_suggest(key, defaults)}")
        if not has_value:
            next_is_value = i < len(args) and not args[i].startswith("--")
            if isinstance(defaults[key], bool) and not (next_is_value and args[i].lower() in BOOL_WORDS):
                text = "true"
            elif next_is_value:
                text, i = args[i], i + 1
            else:
                raise GrafitoError(f"--{key} needs a value")
        assign(key, _checked(key, parse_value(key, text, defaults[key]), defaults, where="command line"))
    return config


BOOL_WORDS = ("true", "false", "1", "0", "yes", "no")


def read_config_file(path):
    path = Path(path)
    if not path.is_file():
        raise GrafitoError(f"config file {path} not found")
    namespace = {}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    except Exception as err:
        raise GrafitoError(f"config file {path} failed: {type(err).__name__}: {err}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def parse_value(key, text, default):
    try:
        if isinstance(default, bool):
            lowered = text.strip().lower()
            if lowered not in BOOL_WORDS:
                raise ValueError
            return lowered in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        raise GrafitoError(f"--{key}={text!r}: expected {type(default).__name__}") from None


def _checked(key, value, defaults, where):
    if key not in defaults:
        raise GrafitoError(f"{where}: unknown config key {key!r}{_suggest(key, defaults)}")
    expected = type(defaults[key])
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected:
        raise GrafitoError(f"{where}: {key} = {value!r} should be a {expected.__name__}")
    return value


def _suggest(key, defaults):
    import difflib

    close = difflib.get_close_matches(key, defaults, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def print_help(defaults):
    print("usage: python <script> [config.py ...] [--key=value ...]\n\nkeys and defaults:")
    for key, value in defaults.items():
        print(f"  --{key}={value!r}")


def format_config(config):
    width = max(len(k) for k in config)
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in config.items())


# ----------------------------------------------------------------------------- checking values

def invalid(key, value, requirement, where="config"):
    """The one error for a bad option or setting."""
    return GrafitoError(f"{where}: {key} = {value!r} is invalid: must be {requirement}")


def check_options(values, rules, where="config", names=None):
    """Raise invalid() for the first value that breaks its rule. rules: {key: (test, requirement)};
    floats must also be finite, and integer rules refuse booleans and floats. names: what to
    call a key in the error when its source spells it otherwise."""
    for key, (test, requirement) in rules.items():
        value, name = values[key], (names or {}).get(key, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise invalid(name, value, "a finite number", where)
        if not test(value):
            raise invalid(name, value, requirement, where)


def integer(low, high=None):
    """An int (not a bool) in [low, high]."""
    text = f"an integer from {low}" + (f" to {high:,}" if high is not None else " up")
    return (lambda v: type(v) is int and v >= low and (high is None or v <= high)), text


def number(low, high=None, high_open=False):
    """An int or float in [low, high] (or [low, high) with high_open)."""
    ok = lambda v: (type(v) in (int, float) and v >= low
                    and (high is None or (v < high if high_open else v <= high)))
    return ok, f"in [{low}, {high}{')' if high_open else ']'}" if high is not None else f"at least {low}"


def positive():
    return (lambda v: type(v) in (int, float) and v > 0), "positive"


def one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def not_empty():
    return (lambda v: isinstance(v, str) and v.strip() != ""), "a non-empty text"


SEED = integer(0, 2 ** 32 - 1)  # numpy's and torch's seeds
