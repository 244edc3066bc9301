"""OpenAI response bodies and stream chunks, from the engine's results and updates.

Besides OpenAI's fields, each body carries `ar2dlm`: a finished request's decoding statistics (policy, NFE, tokens
per forward, speed) and, on a stream chunk, the forward that committed the chunk's tokens (the live page colours
tokens by it). Clients that do not know the field ignore it.
"""

from __future__ import annotations

import json
import time
import uuid

from ar2dlm.engine import GenerationResult
from ar2dlm.serving.schemas import Job
from ar2dlm.serving.worker import Update

# the engine's stop reasons -> OpenAI's finish_reason ("cancelled" never reaches a response)
_FINISH = {"eos": "stop", "stop_string": "stop", "length": "length"}


class Reply:
    """The fixed parts of one request's response: id, object names, creation time, model name."""

    def __init__(self, job: Job, model_name: str):
        self.job, self.model = job, model_name
        chat = job.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def _choice(self, text: str | None, finish_reason: str | None, stream: bool, first: bool = False) -> dict:
        choice: dict = {"index": 0}
        if self.job.kind == "text":
            choice.update(text=text or "", logprobs=None)
        elif stream:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None
                                                                            else {})
            choice["logprobs"] = None
        else:
            choice.update(message={"role": "assistant", "content": text}, logprobs=None)
        choice["finish_reason"] = finish_reason
        return choice

    # ---------------------------------------------------------------------------------------- whole response
    def body(self, result: GenerationResult) -> dict:
        out = self._envelope(self.object, [self._choice(result.text, finish_reason(result), stream=False)])
        out["usage"] = usage(result)
        out["ar2dlm"] = stats(self.job, result)
        return out

    # ---------------------------------------------------------------------------------------- stream chunks
    def first_chunk(self) -> str:
        """Chat streams open with the assistant role (OpenAI's first chunk); completions start with text."""
        return sse(self._envelope(self.chunk_object, [self._choice("", None, stream=True, first=True)]))

    def update_chunk(self, update: Update) -> str:
        out = self._envelope(self.chunk_object, [self._choice(update.delta, None, stream=True)])
        out["ar2dlm"] = {"forward": update.forward, "tokens": list(update.new_tokens)}
        return sse(out)

    def final_chunks(self, result: GenerationResult) -> list[str]:
        last = self._envelope(self.chunk_object, [self._choice(None, finish_reason(result), stream=True)])
        last["ar2dlm"] = stats(self.job, result)
        chunks = [sse(last)]
        if self.job.include_usage:
            chunks.append(sse(self._envelope(self.chunk_object, []) | {"usage": usage(result)}))
        return chunks


def finish_reason(result: GenerationResult) -> str:
    return _FINISH.get(result.stop_reason, "stop")


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_len, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_len + len(result.tokens)}


def stats(job: Job, result: GenerationResult) -> dict:
    return {"policy": job.params.label, "nfe": result.nfe, "tpf": round(result.tpf, 4),
            "tokens_per_s": round(result.tokens_per_s, 2) if result.elapsed_s > 0 else None,
            "ttft_s": result.ttft_s, "queued_s": result.queued_s, "elapsed_s": result.elapsed_s,
            "stop_reason": result.stop_reason}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"
