"""The `lorakit` command: finds its subcommands, reads `--config`, turns user errors into one line.

Each subcommand is a module in `lorakit/commands/` (the file name, with `_` as `-`, is the
command's name) that defines:

    HELP: str                                   one line for `lorakit --help`
    def add_arguments(parser) -> None           its flags (argparse); no `required=True`
    def run(args) -> int                        the work; raise LorakitError for bad input

Every subcommand also takes `--config FILE` (TOML, or YAML with PyYAML): its keys are the
flags' names (`max-steps` or `max_steps`), and flags given on the command line win. Required
options are checked after the config file is applied, by `require(args, ...)`.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import os
import pkgutil
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

from lorakit.errors import LorakitError, UsageError


def command_modules() -> dict[str, ModuleType]:
    """name -> module for every module in lorakit.commands, in alphabetical order."""
    import lorakit.commands as package

    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            found[info.name.replace("_", "-")] = importlib.import_module(f"lorakit.commands.{info.name}")
    return found


def require(args: argparse.Namespace, *names: str) -> None:
    """Raise one UsageError naming every missing option (given neither as a flag nor in --config)."""
    missing = [name for name in names if getattr(args, name, None) in (None, "", [])]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise UsageError(f"missing {flags}: give it on the command line or as a key in --config")


def read_config_file(path: str) -> dict[str, Any]:
    """A flat mapping from a TOML or YAML file; one clear error when the file cannot be read."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path!r} does not exist: check the --config path")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except UnicodeDecodeError as err:
        raise UsageError(f"config file {path!r} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except Exception as err:  # TOMLDecodeError, yaml.YAMLError and friends, a missing yaml
        kind = "YAML" if file.suffix.lower() in (".yaml", ".yml") else "TOML"
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"config file {path!r} is not valid {kind}: {detail}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must hold key = value pairs at the top level")
    return data


def _convert(action: argparse.Action, key: str, value: Any) -> tuple[Any, str | None]:
    """The config value as the flag would have parsed it, or an error text."""
    want = f"--{action.dest.replace('_', '-')}"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction):
        if isinstance(value, bool):
            return value, None
        return None, f"{key} must be true or false, not {value!r}"
    if action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            converted, problem = _convert_one(action, key, item, want)
            if problem:
                return None, problem
            out.append(converted)
        return out, None
    return _convert_one(action, key, value, want)


def _convert_one(action: argparse.Action, key: str, value: Any, want: str) -> tuple[Any, str | None]:
    if isinstance(value, dict) and all(not isinstance(v, dict | list) for v in value.values()):
        # A TOML/YAML table for a NAME=VALUE,... flag such as --rank-pattern: the same text the flag takes.
        value = ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, dict | list):
        return None, f"{key} must be a single value like {want} takes, not {type(value).__name__}"
    if action.type is not None and not (action.type is float and isinstance(value, int | float)):
        try:
            value = action.type(str(value) if not isinstance(value, str) and action.type is not str else value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            return None, f"{key}={value!r} is not valid for {want} ({err})"
    if action.choices is not None and value not in action.choices:
        allowed = ", ".join(map(str, action.choices))
        return None, f"{key}={value!r} is not one of {allowed}"
    return value, None


def apply_config(parser: argparse.ArgumentParser, path: str) -> None:
    """Set the parser's defaults from a config file; all unknown or mistyped keys in one error."""
    data = read_config_file(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}  # flags and positionals
    defaults, problems = {}, []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
            continue
        converted, problem = _convert(actions[dest], str(key), value)
        if problem:
            problems.append(problem)
        else:
            defaults[dest] = converted
    if problems:
        raise UsageError(f"config file {path!r}: " + "; ".join(problems))
    parser.set_defaults(**defaults)


def build_parser(commands: dict[str, ModuleType]) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="LoRA adapters for PyTorch and Hugging Face models: train, save, merge, serve."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, module in commands.items():
        doc = (module.__doc__ or module.HELP).strip()
        formatter = argparse.RawDescriptionHelpFormatter
        p = sub.add_parser(name, help=module.HELP, description=doc, formatter_class=formatter)
        module.add_arguments(p)
        p.add_argument("--config", metavar="FILE", help="TOML or YAML file whose keys are these flags' names")
        subparsers[name] = p
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = command_modules()
    parser, subparsers = build_parser(commands)
    args = parser.parse_args(argv)
    if args.version:
        from lorakit import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 0
    name = args.command
    try:
        if args.config:
            apply_config(subparsers[name], args.config)
            args = parser.parse_args(argv)  # again, so flags on the command line win over the file
        return int(commands[name].run(args) or 0)
    except LorakitError as err:
        print(f"lorakit {name}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"lorakit {name}: error: {err.filename or err} does not exist: check the path", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal_error(name, err)
        where = err.filename or "the output"
        print(f"lorakit {name}: error: no space left on the device to write {where}: free some", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in lorakit, not the user's fault: still one line unless asked
        return _internal_error(name, err)


def _internal_error(name: str, err: Exception) -> int:
    if os.environ.get("LORAKIT_DEBUG"):
        raise err
    print(
        f"lorakit {name}: internal error: {type(err).__name__}: {err} (LORAKIT_DEBUG=1 shows the traceback)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
