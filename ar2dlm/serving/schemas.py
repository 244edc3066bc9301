"""OpenAI request bodies -> what the engine runs (`Job`), each field checked with an OpenAI-style 400 that names it.

Accepted: the fields of /v1/completions and /v1/chat/completions that change what is generated here (`prompt` or
`messages`, `max_tokens`/`max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream`,
`stream_options`), ones that change nothing (`user`, `metadata`, ...), and the extra field `ar2dlm`: an object of
`DecodeParams` fields (`{"policy": "threshold", "tau": 0.7}`), checked as the command-line flags are. OpenAI
features this server does not have (`n` > 1, `logprobs`, penalties, tools, ...) are refused by name, and unknown
fields too, as OpenAI does: a typo is never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ar2dlm.engine import DecodeParams, check_text
from ar2dlm.engine.draft_length import verify_width
from ar2dlm.errors import Ar2dlmError
from ar2dlm.serving.body import field
from ar2dlm.serving.errors import ApiError, invalid
from ar2dlm.serving.settings import ServeSettings

MAX_STOP_STRINGS = 16
# verify feeds draft_len + 1 mask positions every forward ((draft_len + 1)^2 when drafting for every acceptance
# length): a request must not make one forward arbitrarily wide
MAX_VERIFY_WIDTH = 130
_NO_CONTEXT_CAP = 1 << 20  # max_tokens cap for a model whose config states no context length

# fields that set nothing here but that clients send
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# OpenAI field -> the values that mean "the feature is off"; anything else is refused as unsupported
_OFF_VALUES = {"echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,), "presence_penalty": (0,),
               "frequency_penalty": (0,), "best_of": (1,), "suffix": ("",), "logit_bias": ({},), "tools": ([],),
               "tool_choice": ("none",), "functions": ([],), "function_call": ("none",)}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "ar2dlm"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "logprobs", "presence_penalty", "frequency_penalty", "best_of",
                               "suffix", "logit_bias"} | _IGNORED
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "presence_penalty",
                         "frequency_penalty", "logit_bias", "response_format", "tools", "tool_choice", "functions",
                         "function_call"} | _IGNORED
# DecodeParams fields that have an OpenAI field of their own: one way to say each
_OPENAI_NAME = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
                "stop_strings": "stop"}
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class ModelFacts:
    """What request checks need to know about the served model."""

    tokenizer: object
    context: int | None  # positions the model takes (prompt + completion); None when its config does not say
    vocab_size: int


@dataclass(frozen=True)
class Job:
    kind: str  # "text" (/v1/completions) or "chat"
    prompt_ids: list[int]
    params: DecodeParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def parse_completion(body: dict, settings: ServeSettings, model: ModelFacts) -> Job:
    _check_common(body, COMPLETION_FIELDS, settings)
    ids = _prompt_ids(body.get("prompt"), model)
    return _job("text", body, ids, settings, model)


def parse_chat(body: dict, settings: ServeSettings, model: ModelFacts) -> Job:
    _check_common(body, CHAT_FIELDS, settings)
    if body.get("response_format") is not None and field(body, "response_format", "object").get("type") != "text":
        raise invalid("only response_format {\"type\": \"text\"} is supported", param="response_format")
    ids = chat_prompt_ids(_messages(body), model.tokenizer)
    return _job("chat", body, ids, settings, model)


# ------------------------------------------------------------------------------------------------ shared checks
def _check_common(body: dict, allowed: set[str], settings: ServeSettings) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0],
                      code="unknown_parameter")
    name = field(body, "model", "string", settings.model_name)
    if name != settings.model_name:
        raise ApiError(404, f"the model '{name}' does not exist: this server serves '{settings.model_name}'",
                       param="model", code="model_not_found")
    n = field(body, "n", "integer", 1)
    if n != 1:
        raise invalid(f"n must be 1 (one choice per request; send {n} requests instead), got {n}", param="n")
    for name, off in _OFF_VALUES.items():
        if body.get(name) is not None and body[name] not in off:
            raise invalid(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _job(kind: str, body: dict, ids: list[int], settings: ServeSettings, model: ModelFacts) -> Job:
    max_new = _max_new_tokens(body, len(ids), settings, model)
    stream = field(body, "stream", "boolean", False)
    options = field(body, "stream_options", "object", {})
    include_usage = field(options, "include_usage", "boolean", False, parent="stream_options")
    if options and not stream:
        raise invalid("stream_options is only allowed with stream: true", param="stream_options")
    return Job(kind, ids, decode_params(body, settings.defaults, max_new), stream, include_usage)


def _max_new_tokens(body: dict, prompt_len: int, settings: ServeSettings, model: ModelFacts) -> int:
    """max_tokens (chat: or max_completion_tokens), or the server's default cut to what the context leaves."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    requested = field(body, key, "integer", None)
    room = _NO_CONTEXT_CAP if model.context is None else model.context - prompt_len
    if room < 1:
        raise invalid(f"the prompt has {prompt_len} tokens; this model's context length is {model.context} "
                      "tokens, which leaves no room for a completion", param="messages" if "messages" in body
                      else "prompt", code="context_length_exceeded")
    if requested is None:
        return min(settings.defaults.max_new_tokens, room)
    if requested < 1:
        raise invalid(f"{key} must be at least 1, got {requested}", param=key)
    if requested > room:
        limit = f"context length is {model.context} tokens" if model.context else "cap is"
        raise invalid(f"{key} is too large: this model's {limit}; the prompt has {prompt_len}, so at most {room} "
                      f"tokens can be generated, and {requested} were requested", param=key,
                      code="context_length_exceeded")
    return requested


def decode_params(body: dict, defaults: DecodeParams, max_new: int) -> DecodeParams:
    """The server's defaults, then the OpenAI sampling fields, then the `ar2dlm` object's decoding fields."""
    base = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(DecodeParams)}
    base["max_new_tokens"] = max_new
    temperature = field(body, "temperature", "number", None)
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise invalid(f"temperature must be in [0, 2], got {temperature}", param="temperature")
        base["temperature"] = float(temperature)
    top_p = field(body, "top_p", "number", None)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise invalid(f"top_p must be in (0, 1], got {top_p}", param="top_p")
        base["top_p"] = float(top_p)
    seed = field(body, "seed", "integer", None)
    if seed is not None:
        if not 0 <= seed < 2 ** 63:
            raise invalid(f"seed must be in [0, 2**63), got {seed}", param="seed")
        base["seed"] = seed
    stops = _stop_strings(body)
    if stops is not None:
        base["stop_strings"] = stops
    return _with_ar2dlm_fields(field(body, "ar2dlm", "object", {}), base)


VERIFY_SETTINGS = ("draft_len", "draft_every_length", "lookup_drafts")


def _with_ar2dlm_fields(extra: dict, base: dict) -> DecodeParams:
    for key in extra:
        if key in _OPENAI_NAME:
            raise invalid(f"ar2dlm.{key}: set it with the request's own '{_OPENAI_NAME[key]}' field",
                          param=f"ar2dlm.{key}")
    if extra.get("policy") in ("ar", "verify") and "block_parallel" not in extra:
        base["block_parallel"] = False  # the server's multi-block default does not apply to one-token policies
    if extra.get("policy", "verify") != "verify":  # nor a drafter's verify settings to a request for another policy
        plain = DecodeParams()
        base.update({key: getattr(plain, key) for key in VERIFY_SETTINGS if key not in extra})
    try:
        params = DecodeParams.from_mapping(extra, **base)
    except (Ar2dlmError, TypeError, ValueError) as e:  # the last two: a value a constructor refused
        raise invalid(f"ar2dlm: {e}", param="ar2dlm") from None
    every = params.draft_every_length
    if isinstance(params.draft_len, int) and verify_width(params.draft_len, every) > MAX_VERIFY_WIDTH:
        most = max(d for d in range(1, MAX_VERIFY_WIDTH) if verify_width(d, every) <= MAX_VERIFY_WIDTH)
        raise invalid(f"ar2dlm.draft_len must be at most {most} on this server"
                      f"{' with draft_every_length' if every else ''}, got {params.draft_len}",
                      param="ar2dlm.draft_len")
    return params


def _stop_strings(body: dict) -> tuple[str, ...] | None:
    stop = field(body, "stop", ("string", "array"), None)
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise invalid(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
                      param="stop")
    return tuple(_utf8(s, "stop") for s in stops)


def _utf8(text: str, param: str) -> str:
    """JSON may spell lone surrogates (`"\\ud800"`), which are not text: refuse them here, not in the tokenizer."""
    try:
        return check_text(text)
    except Ar2dlmError:
        raise invalid(f"'{param}' holds an invalid Unicode escape (a lone surrogate)", param=param) from None


# ------------------------------------------------------------------------------------------------ prompts
def _prompt_ids(prompt, model: ModelFacts) -> list[int]:
    """`prompt`: a string, a list of one string, token ids, or a list of one list of token ids."""
    if prompt is None:
        raise invalid("'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(model.tokenizer(_utf8(prompt, "prompt"))["input_ids"])
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < model.vocab_size for t in prompt):
            raise invalid(f"prompt token ids must be in [0, {model.vocab_size})", param="prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid(f"one prompt per request (got {len(prompt)}): send one request per prompt", param="prompt")
    else:
        raise invalid("'prompt' must be a string, a list of token ids, or a list holding one of those",
                      param="prompt", code="invalid_type")
    if not ids:
        raise invalid("the prompt is empty", param="prompt")
    return ids


def _messages(body: dict) -> list[dict]:
    messages = field(body, "messages", "array")
    if not messages:
        raise invalid("'messages' is empty: send at least one message", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{where}' must be an object with 'role' and 'content'", param=where,
                          code="invalid_type")
        role = field(message, "role", "string", parent=where)
        if role not in CHAT_ROLES:
            raise invalid(f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                          param=f"{where}.role")
        # "developer" is the newer name of "system"; chat templates know only the older one
        out.append({"role": "system" if role == "developer" else role, "content": _content(message, where)})
    return out


def _content(message: dict, where: str) -> str:
    """A message's text: a string, or a list of text parts (OpenAI's content parts; images are refused)."""
    content = field(message, "content", ("string", "array"), parent=where)
    if isinstance(content, str):
        return _utf8(content, f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            raise invalid(f"'{here}' must be a text part {{\"type\": \"text\", \"text\": ...}}: this model reads "
                          "text only", param=here)
        texts.append(_utf8(field(part, "text", "string", parent=here), f"{here}.text"))
    return "".join(texts)


def chat_prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """The whole conversation through the tokenizer's chat template, ending where the assistant's turn begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise invalid("this model's tokenizer has no chat template: use /v1/completions", param="messages")
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)
    except Exception as e:  # noqa: BLE001 - templates raise their own errors on conversations they refuse
        raise invalid(f"the chat template refused these messages: {e}", param="messages") from None
    return list(rendered["input_ids"])
