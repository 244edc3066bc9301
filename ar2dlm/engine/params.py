"""The one definition of decoding parameters: what the engine takes per request, and what every command, eval sweep,
benchmark spec, lm-eval model argument and server request is turned into.

    params = DecodeParams(policy="threshold", tau=0.7, max_new_tokens=64)
    DecodeParams.from_spec("entropy:0.5+bp")           # the benchmark's compact spec
    params.with_setting("tau", "0.8")                  # an eval sweep point, the value given as text
    DecodeParams.from_mapping({"policy": "ar"})        # lm-eval model_args / an HTTP body: values checked by type

The command-line options are derived from the fields once (`add_decode_args`); a field's metadata holds its help
text, and `cli: False` keeps it off the command line (stop token ids are the model's, not the user's).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field

from ar2dlm.engine.policies import DEFAULT_TAU, POLICIES, Policy, make_policy
from ar2dlm.engine.sampling import Sampling
from ar2dlm.errors import Ar2dlmError


AUTO = "auto"  # draft_len chosen by the engine (see engine/draft_length.py)


@dataclass(frozen=True, kw_only=True)
class DecodeParams:
    policy: str = field(default="threshold", metadata={
        "help": "commit policy (default: threshold; generate, chat and serve decode a gated drafter with its "
                "lossless verify unless this is given)", "choices": list(POLICIES)})
    tau: float | None = field(default=None, metadata={
        "help": "threshold: commit tokens whose confidence is above this (default 0.9); entropy: below this many "
                "nats (default 0.5)"})
    steps_per_forward: int = field(default=2, metadata={"help": "tokens per forward of the steps policy"})
    draft_len: int | str | None = field(default=None, metadata={
        "words": ("auto",),
        "help": "verify: drafts checked per forward (default: auto on a gated drafter decoded with its default "
                "policy, else the model's block size - 1); auto: chosen every forward (0 = a plain forward) from "
                "this machine's measured forward costs and the acceptance seen so far"})
    draft_every_length: bool = field(default=False, metadata={
        "help": "verify: draft for every acceptance length in the same forward (TiDAR), so the forward after a "
                "rejected draft has drafts too; feeds (drafts + 1)^2 mask positions instead of drafts + 1"})
    lookup_drafts: bool = field(default=False, metadata={
        "help": "verify: draft by prompt lookup (the tokens that followed the last earlier occurrence of the final "
                "3 or 2 tokens) when the model has no drafts for a forward (a gated drafter after a rejected "
                "draft); a feature drafter checks lookup drafts first wherever they are found"})
    draft_tree: bool = field(default=False, metadata={
        "help": "verify with a feature drafter: check its draft_len likeliest continuations as a tree in one "
                "forward (its second and third choices where it is unsure) instead of one chain of drafts; "
                "draft_len may then exceed the block size - 1"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "sample among the k likeliest tokens (0 = all)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (every request gets its own generator)"})
    stop_strings: tuple[str, ...] = field(default=(), metadata={
        "help": "stop string: the text is cut before it (repeat the flag for several)", "flag": "stop"})
    stop_token_ids: tuple[int, ...] | None = field(default=None, metadata={
        "cli": False, "help": "None: the tokenizer's EOS and end-of-turn tokens"})
    block_parallel: bool = field(default=False, metadata={"help": "multi-block decoding (several blocks at once)"})
    p_add: float = field(default=0.1, metadata={
        "help": "multi-block: open a new block when the last opened one is this decoded"})
    activate_ratio: float = field(default=0.95, metadata={
        "help": "multi-block: a block must commit every forward once its predecessor is this decoded"})
    max_open_blocks: int = field(default=4, metadata={"help": "multi-block: blocks decoded at once at most"})
    cache_delay: int = field(default=1, metadata={"help": "forwards before a finished block counts as cached"})
    refresh_every: int = field(default=0, metadata={"help": "recompute the whole cache every N forwards (0: never)"})

    def __post_init__(self):
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        elif not isinstance(self.stop_strings, tuple):
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise Ar2dlmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.policy not in POLICIES:
            raise Ar2dlmError(f"unknown decoding policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        self.make_policy()  # validates tau / k
        self.sampling()  # validates temperature / top_p / top_k
        if self.draft_every_length and self.policy != "verify":
            raise Ar2dlmError("draft_every_length is a setting of the verify policy")
        if self.lookup_drafts and self.policy != "verify":
            raise Ar2dlmError("lookup_drafts is a setting of the verify policy")
        if self.draft_tree and self.policy != "verify":
            raise Ar2dlmError("draft_tree is a setting of the verify policy")
        if self.draft_tree and self.draft_every_length:
            raise Ar2dlmError("draft_tree and draft_every_length are two ways to draft; choose one")
        if self.block_parallel and self.policy in ("ar", "verify"):
            raise Ar2dlmError(f"block-parallel decoding needs threshold/entropy/steps, not {self.policy}")
        if self.draft_len is not None and self.draft_len != AUTO and (
                isinstance(self.draft_len, bool) or not isinstance(self.draft_len, int) or self.draft_len < 1):
            raise Ar2dlmError(f"draft_len must be an integer >= 1 or {AUTO!r}, got {self.draft_len!r}")
        for name in ("p_add", "activate_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise Ar2dlmError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_open_blocks < 1 or self.cache_delay < 1 or self.refresh_every < 0:
            raise Ar2dlmError("max_open_blocks and cache_delay must be >= 1, refresh_every >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise Ar2dlmError("stop strings must be non-empty text")

    # ------------------------------------------------------------------------------------------ derived objects
    def make_policy(self) -> Policy:
        return make_policy(self.policy, self.tau, self.steps_per_forward)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k)

    @property
    def label(self) -> str:
        """A short name of the commit setting: `threshold:0.9`, `entropy:0.5`, `steps:2`, `ar`, `+bp` multi-block."""
        if self.policy in DEFAULT_TAU:
            base = f"{self.policy}:{self.make_policy().tau:g}"
        elif self.policy == "steps":
            base = f"steps:{self.steps_per_forward}"
        elif self.policy == "verify" and self.draft_len is not None:
            base = f"verify:{self.draft_len}"
        else:
            base = self.policy
        return (base + ("+bp" if self.block_parallel else "") + ("+all" if self.draft_every_length else "")
                + ("+lookup" if self.lookup_drafts else "") + ("+tree" if self.draft_tree else ""))

    def replace(self, **changes) -> "DecodeParams":
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------------------------------- from text/mappings
    @classmethod
    def from_spec(cls, text: str, **base) -> "DecodeParams":
        """`threshold:0.9`, `entropy:0.5` (nats), `steps:2` (tokens a forward), `ar`, `verify:3` (drafts a forward);
        a bare name takes the default value; a `+bp` suffix turns on multi-block decoding, `+all` drafts for every
        acceptance length (verify), `+lookup` adds prompt-lookup drafts (verify), `+tree` checks a feature drafter's
        drafts as a tree (verify). `base` gives the other fields."""
        spec = text.strip()
        body, *suffixes = spec.split("+")
        unknown = sorted(set(suffixes) - {"bp", "all", "lookup", "tree"})
        if unknown:
            raise Ar2dlmError(f"unknown suffix +{unknown[0]} in spec {spec!r} (accepted: +bp, +all, +lookup, +tree)")
        bp, every_length = "bp" in suffixes, "all" in suffixes
        name, sep, value = body.partition(":")
        name, value = name.strip(), value.strip()
        if name not in POLICIES:
            raise Ar2dlmError(f"unknown policy {name!r} in spec {spec!r} (choose from {', '.join(POLICIES)})")
        if sep and not value:
            raise Ar2dlmError(f"policy spec {spec!r} has no value after ':'")
        fields = dict(base, policy=name, block_parallel=bp)
        if every_length:
            fields["draft_every_length"] = True
        if "lookup" in suffixes:
            fields["lookup_drafts"] = True
        if "tree" in suffixes:
            fields["draft_tree"] = True
        if name == "ar" and value:
            raise Ar2dlmError(f"the ar policy takes no value, got {spec!r}")
        if name == "steps" and value:
            fields["steps_per_forward"] = _parse_value("steps_per_forward", value, f"steps:K in {spec!r}")
        elif name == "verify" and value:
            fields["draft_len"] = _parse_value("draft_len", value, f"verify:DRAFTS in {spec!r}")
        elif name in DEFAULT_TAU and value:
            fields["tau"] = _parse_value("tau", value, f"{name}:TAU in {spec!r}")
        return cls(**fields)

    def with_setting(self, name: str, text: str) -> "DecodeParams":
        """A copy with one field set from its text form (eval sweeps: `tau=0.5,0.7`)."""
        key = name.strip().replace("-", "_")
        if key not in sweepable_fields():
            raise Ar2dlmError(f"unknown decode setting {name!r} (choose from {', '.join(sweepable_fields())})")
        return self.replace(**{key: _parse_value(key, text, key)})

    @classmethod
    def from_mapping(cls, values: dict, **base) -> "DecodeParams":
        """From a mapping of field names to values given as text or as values of the field's type (lm-eval
        model_args, a request body): a value of the wrong type is an error, never silently coerced."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise Ar2dlmError(f"unknown decode setting(s) {', '.join(unknown)} (accepted: {', '.join(sorted(known))})")
        fields = dict(base)
        for key, value in values.items():
            fields[key] = _parse_value(key, value, key) if isinstance(value, str) else _check_type(key, value)
        return cls(**fields)


_HINTS = typing.get_type_hints(DecodeParams)
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
_NOT_SWEEPABLE = ("stop_token_ids", "stop_strings")


def sweepable_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(DecodeParams) if f.name not in _NOT_SWEEPABLE]


def _scalar_type(key: str) -> tuple[type, bool]:
    """(the field's scalar type, whether None is allowed)."""
    tp = _HINTS[key]
    args = typing.get_args(tp)
    optional = type(None) in args
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in args if a is not type(None))
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    return tp, optional


def _words(key: str) -> tuple[str, ...]:
    """Words a numeric field also accepts (`draft_len`: auto)."""
    return next(f.metadata.get("words", ()) for f in dataclasses.fields(DecodeParams) if f.name == key)


def _type_words(key: str, tp: type) -> str:
    """What a field takes, in words: `an integer`, `an integer or auto`."""
    return " or ".join([_TYPE_WORDS.get(tp, tp.__name__), *_words(key)])


def _parse_value(key: str, text: str, what: str):
    tp, optional = _scalar_type(key)
    text = text.strip()
    if optional and text.lower() == "none":
        return None
    if text.lower() in _words(key):
        return text.lower()
    if key == "stop_token_ids":  # a list field given as text: comma-separated ids
        return tuple(_parse_value("max_new_tokens", t, what) for t in text.split(",") if t.strip())
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
    elif tp is str:
        return (text,) if key == "stop_strings" else text
    else:
        try:
            return tp(text)
        except (TypeError, ValueError):
            pass
    raise Ar2dlmError(f"{what}: {text!r} is not {_type_words(key, tp)}")


def _check_type(key: str, value):
    tp, optional = _scalar_type(key)
    if value is None and optional:
        return None
    if isinstance(value, str) and value.lower() in _words(key):
        return value.lower()
    if typing.get_origin(_HINTS[key]) is tuple or key in ("stop_strings", "stop_token_ids"):
        items = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, tp) and not isinstance(v, bool)
                                                           for v in items):
            raise Ar2dlmError(f"{key} must be a list of {tp.__name__}")
        return tuple(items)
    ok = isinstance(value, bool) if tp is bool else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and (tp is float or float(value).is_integer())
    )
    if tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise Ar2dlmError(f"{key} must be {_type_words(key, tp)}, got {value!r}")
    return tp(value)


# ------------------------------------------------------------------------------------------------ command line
def add_decode_args(parser: argparse.ArgumentParser, defaults: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    """`--policy`, `--tau`, ... for every command-line field of DecodeParams; `defaults` overrides a default (eval
    generates 256 tokens by default), `skip` leaves fields out (a command that sets them itself)."""
    from ar2dlm.utils.cli_config import add_dataclass_args

    add_dataclass_args(parser, DecodeParams, skip=skip, defaults=defaults, title="decoding")


def policy_was_given(args: argparse.Namespace) -> bool:
    """For commands whose --policy default depends on the model (`add_decode_args(parser, defaults={"policy":
    None})`): whether the user typed --policy. When not, a placeholder goes in (`verify` when a setting only verify
    has was given, e.g. --draft-every-length, else `threshold`), and `for_model` decides once the model is open."""
    given = args.policy is not None
    if not given:
        verify_only = any(getattr(args, name, False) for name in ("draft_every_length", "lookup_drafts",
                                                                   "draft_tree"))
        args.policy = "verify" if verify_only else "threshold"
    return given


def for_model(params: DecodeParams, dlm, policy_given: bool) -> DecodeParams:
    """The decoding parameters a model gets by default: a drafter decodes with its lossless `verify`, with
    prompt-lookup drafts where it has none (a feature drafter: first, and its own drafts as a tree) and the draft
    length chosen for this machine (`auto`, unless one was given), unless a policy was asked for (it is the parent,
    exactly); any other model keeps `params`."""
    if getattr(dlm.config, "drafter", False) and not policy_given:
        draft_len = AUTO if params.draft_len is None else params.draft_len
        tree = params.draft_tree or bool(getattr(dlm, "drafts_from_features", False))
        return params.replace(policy="verify", block_parallel=False, lookup_drafts=True, draft_len=draft_len,
                              draft_tree=tree)
    return params


def decode_params_from_args(args: argparse.Namespace, **fixed) -> DecodeParams:
    """The DecodeParams of parsed options (fields a command skipped come from `fixed` or the defaults). A value the
    validation refuses is reported with the flag the user typed (`--max-new-tokens`), not the field name."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodeParams)
              if f.metadata.get("cli", True) and hasattr(args, f.name)}
    if values.get("stop_strings") is None:
        values.pop("stop_strings", None)
    try:
        return DecodeParams(**values, **fixed)
    except Ar2dlmError as e:
        raise Ar2dlmError(_with_flags(str(e), [name for name in values if name not in fixed])) from None


# The words the validators (here and in policies.py) use for a field, where they are not just its name. `policy`
# has none: the word is plain English there ("steps policy needs ..."), and argparse's choices refuse a bad --policy.
_MESSAGE_WORDS = {"block_parallel": ("block_parallel", "block-parallel"), "stop_strings": ("stop strings",),
                  "steps_per_forward": ("steps_per_forward", "k"), "policy": ()}


def _flag(f: dataclasses.Field) -> str:
    """The command-line flag of a field, as add_dataclass_args names it."""
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def _with_flags(message: str, names: list[str]) -> str:
    """`message` with each of the named fields (those the user could type) written as its flag."""
    by_name = {f.name: f for f in dataclasses.fields(DecodeParams)}
    for name in names:
        for word in _MESSAGE_WORDS.get(name, (name,)):
            # whole words only, and never a word already written as a flag (`--tau`) or part of another (`top_k`)
            message = re.sub(rf"(?<![\w-]){re.escape(word)}(?![\w-])", _flag(by_name[name]), message)
    return message
