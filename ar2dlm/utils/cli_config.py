"""Dataclass configs as argparse options: one definition of each setting, its default and its help text."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _base_type(tp):
    """`int | None` -> int; `tuple[str, ...]` -> (str, True); plain types pass through. Returns (type, repeated)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0], True
    return tp, False


def _shown_default(help_text: str, default, required: bool) -> str:
    """` (default: X)` for the help text; nothing when there is no default to show, or when the help already says
    what the default means in words (`(default: built-in)` stays the only one)."""
    if required or default in (None, ()) or "(default:" in help_text:
        return ""
    return f" (default: {default})"


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), defaults: dict | None = None,
                       title: str | None = None) -> None:
    """Add `--field-name` for every field of `cls`; help comes from field metadata['help'], the flag name from
    metadata['flag'] when given; fields with metadata['cli'] False are left out. A tuple field is a repeatable flag.
    `defaults` overrides the dataclass defaults on this parser; metadata['words'] lets a numeric flag also take those
    words."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title or cls.__name__)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        help_text = f.metadata.get("help", "")
        tp, repeated = _base_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = defaults.get(f.name, None if required else f.default)
        shown = _shown_default(help_text, default, required)
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{help_text}{shown}")
        elif repeated:
            group.add_argument(flag, dest=f.name, type=tp, action="append", default=None, help=help_text)
        else:
            words = f.metadata.get("words")
            group.add_argument(flag, dest=f.name, type=_or_words(tp, words) if words else tp, default=default,
                               choices=f.metadata.get("choices"), required=required, help=f"{help_text}{shown}")


def _or_words(tp, words: tuple[str, ...]):
    """An argparse type: one of `words`, or a value of `tp` (`--draft-len 3` or `--draft-len auto`)."""

    def parse(text: str):
        if text.lower() in words:
            return text.lower()
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {' or '.join(words)} or a {tp.__name__}, got {text!r}")

    parse.__name__ = f"{tp.__name__} or {'/'.join(words)}"
    return parse


def dataclass_from_args(cls, args: argparse.Namespace, **given):
    """The dataclass of parsed options; a repeatable flag given no time keeps the field's default. `given` sets
    fields that are not options themselves (a command's DecodeParams, read by `decode_params_from_args`)."""
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name not in vars(args) or f.name in given:
            continue
        value = getattr(args, f.name)
        if isinstance(value, list):
            value = tuple(value)
        elif value is None and _base_type(typing.get_type_hints(cls)[f.name])[1]:
            continue
        values[f.name] = value
    return cls(**values)
