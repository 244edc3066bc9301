"""Dataclass configs as argparse options: one definition of each setting, its default and its help text."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _base_type(tp):
    """`int | None` -> int; plain types pass through."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add `--field-name` for every field of `cls`; help comes from field metadata['help']."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{help_text} (default: {default})")
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=default, choices=f.metadata.get("choices"),
                               required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                               help=f"{help_text} (default: {default})")


def dataclass_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
