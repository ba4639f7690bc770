"""Command options from dataclasses: defaults < YAML file (--config) < command-line flags; each field carries
its own --help text, and an unknown YAML key is an error."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Sequence

import yaml


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING):
    """A config field that carries its own --help text (a default, or a factory for a mutable one)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


def check_choice(name: str, value: Any, choices: Sequence) -> None:
    """The one error for an option outside its choices: `--name must be a, b or c, got 'x'`."""
    if value not in choices:
        listed = ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}" if len(choices) > 1 else str(choices[0])
        raise ValueError(f"--{name} must be {listed}, got {value!r}")


def _yaml_mapping(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping such as '{{key: value}}', got {text!r}")
    return value


_yaml_mapping.__name__ = "mapping"  # argparse names it in "invalid ... value"


def _arg_type(tp: Any):
    """argparse type and nargs for a dataclass field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner_type, nargs = _arg_type(next(a for a in args if a is not type(None)))
        if nargs is not None or type(None) not in args:
            return inner_type, nargs
        # "none" on the command line undoes a YAML value (e.g. --off_loss_cap none: the unbounded term)
        def optional(text: str):
            return None if text.lower() == "none" else inner_type(text)
        optional.__name__ = f"{inner_type.__name__} or none"  # argparse names it in "invalid ... value"
        return optional, None
    if origin is list:
        return args[0], "+"
    if origin is dict or tp is dict:  # a YAML mapping on the command line, e.g. --base_options '{steps: 50}'
        return _yaml_mapping, None
    if tp is bool:
        return lambda s: str(s).lower() in ("1", "true", "yes", "on"), None
    return tp, None


def parse_config(cls, argv=None, description: str = "", defaults: dict | None = None,
                 fixed: dict | None = None):
    """Builds `cls` from its defaults, then `defaults`, then a YAML --config, then flags.

    `fixed`: values the command itself sets (a paper alias's λ = 0): they replace the YAML's, and a flag
    that contradicts one is an error. A YAML key that is not an option of `cls` is an error.
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file with any of the options below")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, nargs = _arg_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name}", type=tp, nargs=nargs, default=argparse.SUPPRESS,
                            help=f.metadata.get("help", "") + ("" if default is None else f" (default: {default})"))
    ns = vars(parser.parse_args(argv))
    values = dict(defaults or {})
    config_path = ns.pop("config", None)
    if config_path is not None:
        if not config_path.exists():
            parser.error(f"config file {config_path} does not exist")
        try:
            loaded = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as e:
            parser.error(f"{config_path} is not valid YAML: {' '.join(str(e).split())}")
        if not isinstance(loaded, dict):
            parser.error(f"{config_path} must hold a mapping of option: value")
        unknown = set(loaded) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            parser.error(f"{config_path}: unknown options {sorted(unknown)} for this command")
        values.update(loaded)
    for name, value in (fixed or {}).items():
        if name in ns and ns[name] != value:
            parser.error(f"--{name} {ns[name]} contradicts this command, which sets {name} = {value}")
    values.update(fixed or {})
    values.update(ns)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
