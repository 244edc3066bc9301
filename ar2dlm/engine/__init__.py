"""The decoding engine: requests -> scheduler -> model runner -> outputs (see engine.py)."""

from ar2dlm.engine.engine import Engine, TextStream
from ar2dlm.engine.output import GenerationResult, check_text, default_stop_ids, encode_prompt
from ar2dlm.engine.params import DecodeParams

__all__ = ["DecodeParams", "Engine", "GenerationResult", "TextStream", "check_text", "default_stop_ids",
           "encode_prompt"]
