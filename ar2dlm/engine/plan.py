"""What one sequence feeds in one forward, and which of its logits the forward returns.

A sequence feeds the contiguous slot range `[fed_start, fed_end)`; slots below `fed_start` are its cached K/V.
Which fed slots a fed query may read is given by *visibility groups*: query q sees key k when k < fed_start, or when
k is fed and group(k) <= group(q). Block diffusion uses the block index (block-causal: a block sees itself and the
earlier blocks); the verify policy gives every clean position its own group (token-causal, the AR parent's own
attention) and its mask positions one shared group after them (they see the clean prefix and each other).

A plan may instead give the fed-to-fed visibility outright (`visible`, [fed, fed] boolean) and the RoPE position of
every fed slot (`positions`; default: the slot itself). Verify with drafts for every acceptance length uses both:
its mask blocks sit in slots after the clean positions but at the positions they draft, each seeing only the clean
prefix it assumes accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Plan:
    fed_start: int  # first fed position (= first uncached slot, or 0 on a full-cache refresh)
    fed_end: int  # end of the fed range
    final_end: int  # block diffusion: fed blocks below this are complete at the input of this forward
    logit_pos: list[int]  # positions whose logits this forward must return, ascending (all inside the fed range)
    ids: list[int] | None = None  # the fed token ids (None: the sequence's tokens at the fed positions)
    groups: list[int] | None = None  # visibility group per fed position (None: block index, position // block size)
    visible: torch.Tensor | None = None  # [fed, fed] bool: fed query i may read fed key j (overrides groups)
    positions: list[int] | None = None  # RoPE position per fed slot (None: the slot)

    @property
    def fed(self) -> int:
        return self.fed_end - self.fed_start
