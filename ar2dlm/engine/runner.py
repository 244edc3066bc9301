"""The model runner: turns the plans of one forward into ids, positions and an attention mask, runs the backbone on
the cache rows it is given, and returns the logits the plans read. The only part of the engine that touches the
model.

A forward runs on a contiguous range of cache-pool rows. Each row feeds the slots `[fed_start, fed_end)` of its
plan; rows feed different lengths, so shorter rows are padded with dummy queries, and a row in the range that feeds
nothing this forward (it waits, or its one masked position reads a stored logit) is all dummy queries. Dummy queries
write to and read only one slot `pad`, at or past every row's fed end *and* its first uncached slot: every slot from a
row's first uncached one on is rewritten, by real tokens, in the forward that next reads it, so the garbage never
reaches a used logit. A fed slot's RoPE position is the slot itself unless its plan says otherwise (`Plan.positions`).
The mask is [batch, 1, fed, kv_len] boolean: block-causal by absolute position, slots at or
past each row's fed end masked. Attention reads slots [0, kv_len) only (a view of the pool's buffers).

Only the positions whose logits are read go through the LM head. On a CPU in float32 the runner switches the model's
linear layers to oneDNN with packed weights (`model/packed_linear.py`), which runs the thin products of a wide
forward close to the cost of a one-token one, and a Llama-family decoder runs as a few fused operations per layer
(`model/fused_decoder.py`) instead of Hugging Face's module tree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ar2dlm.engine.plan import Plan
from ar2dlm.engine.kv_cache import KVCachePool
from ar2dlm.errors import Ar2dlmError
from ar2dlm.model.dlm import BlockDiffusionLM
from ar2dlm.model.fused_decoder import fused_decoder_for
from ar2dlm.model.packed_linear import use_linear_kernel


class ModelRunner:
    def __init__(self, dlm: BlockDiffusionLM, linear_kernel: str = "auto", fused: bool = True):
        """`linear_kernel`: `auto` (oneDNN for float32 on a CPU), `onednn` or `default` (see packed_linear.py);
        the model's linear layers are switched in place, for every user of the model. `fused`: run the fused
        decoder forward where the model fits it (`model/fused_decoder.py`), else Hugging Face's."""
        if dlm.attention_backend != "sdpa":
            raise Ar2dlmError("the decoding engine needs the sdpa attention backend (dense boolean masks)")
        self.dlm = dlm.eval()
        self.block_size = dlm.config.block_size
        self.mask_id = dlm.config.mask_token_id
        self.linear_kernel = use_linear_kernel(dlm, linear_kernel)
        self.fused = fused_decoder_for(dlm, self.linear_kernel) if fused else None
        # a feature drafter (drafter/feature.py) drafts from the parent's hidden states at these layers
        self.feature_layers = tuple(dlm.drafter_cfg.feature_layers) if getattr(dlm, "drafts_from_features", False) \
            else ()
        self.feature_window = dlm.drafter_cfg.window if self.feature_layers else 0

    def new_cache(self, max_rows: int) -> KVCachePool:
        return KVCachePool(self.dlm.hf_config.num_hidden_layers, max_rows)

    @torch.no_grad()
    def forward(self, cache: KVCachePool, row_start: int, rows: Sequence[tuple[object, Plan | None]],
                features: list | None = None) -> list[torch.Tensor | None]:
        """One forward over cache rows [row_start, row_start + len(rows)); each row is (sequence state, plan), the
        state giving `toks` (its token ids by position) and `cached`; a plan may be None (the row only pads).
        Returns per row the logits of its plan's `logit_pos` ([N, V]), or None where it reads none. A list passed as
        `features` (feature drafters only) is filled with each row's parent features at its fed positions
        ([fed, F], None where it feeds nothing)."""
        fed = [p if p is not None and p.fed else None for _, p in rows]
        if not any(fed):
            return [None] * len(rows)
        if len(rows) == 1:
            ids, pos, slots, mask, kv_len = self._single(rows[0][0], fed[0])
        else:
            ids, pos, slots, mask, kv_len = self._padded(rows, fed)
        cache.bind(row_start, slots, kv_len)
        if features is None:
            return self._pick_logits(self.decoder_hidden(ids, mask, pos, cache), fed)
        hidden, feats = self.decoder_hidden(ids, mask, pos, cache, self.feature_layers)
        features[:] = [feats[i, :p.fed] if p is not None else None for i, p in enumerate(fed)]
        return self._pick_logits(hidden, fed)

    def decoder_hidden(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: KVCachePool,
                       capture: tuple[int, ...] = ()):
        """The model call of a forward: final hidden states [B, Q, H] of `ids` [B, Q] at `pos` under `mask`
        [B, 1, Q, kv_len], on the bound `cache`; with `capture` (Hugging Face `hidden_states` entries) also those
        entries concatenated, as (hidden, features [B, Q, F])."""
        if self.fused is not None:
            return self.fused.hidden(ids, mask, pos, cache, capture)
        out = self.dlm.decoder_output(ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                      use_cache=True, output_hidden_states=bool(capture))
        if not capture:
            return out.last_hidden_state
        return out.last_hidden_state, torch.cat([out.hidden_states[i] for i in capture], dim=-1)

    @torch.no_grad()
    def draft(self, contexts: Sequence[torch.Tensor], anchors: Sequence[int], drafts: int) -> torch.Tensor:
        """A feature drafter's draft logits [N, drafts, V] after each sequence's last committed token `anchors[i]`,
        from its context features `contexts[i]` ([<= window, F], the last committed positions before the anchor),
        all rows in one call (right-aligned in the window, the empty slots not read)."""
        window, dev = self.feature_window, self.dlm.device
        feats = torch.zeros(len(contexts), window, self.dlm.feature_dim, device=dev)
        valid = torch.zeros(len(contexts), window, dtype=torch.bool, device=dev)
        for i, context in enumerate(contexts):
            n = min(context.shape[0], window)
            if n:
                feats[i, window - n:] = context[-n:]
                valid[i, window - n:] = True
        return self.dlm.draft_logits(feats, valid, torch.tensor(list(anchors), device=dev), drafts)

    # ------------------------------------------------------------------------------------------ inputs
    def _ids(self, state, plan: Plan) -> list[int]:
        return plan.ids if plan.ids is not None else state.toks[plan.fed_start:plan.fed_end]

    def _positions(self, plan: Plan) -> list[int]:
        return plan.positions if plan.positions is not None else list(range(plan.fed_start, plan.fed_end))

    def _fed_visible(self, plan: Plan) -> torch.Tensor:
        """[fed, fed] bool: which fed keys each fed query reads (cached slots are read by all)."""
        if plan.visible is not None:
            return plan.visible.to(self.dlm.device)
        if plan.groups is not None:
            group = torch.tensor(plan.groups, device=self.dlm.device)
        else:
            group = torch.arange(plan.fed_start, plan.fed_end, device=self.dlm.device) // self.block_size
        return group[None, :] <= group[:, None]

    def _single(self, state, plan: Plan):
        """One sequence: no padding, the fed range is contiguous."""
        dev, lo, hi = self.dlm.device, plan.fed_start, plan.fed_end
        ids = torch.tensor([self._ids(state, plan)], device=dev)
        if plan.groups is None and plan.visible is None:  # block-causal: one comparison of block indices over
            pos = torch.arange(lo, hi, device=dev)[None]  # every key, as cached keys sit in earlier blocks (the hot path)
            block = torch.arange(hi, device=dev) // self.block_size
            return ids, pos, pos, (block[None, :] <= block[lo:hi, None])[None, None], hi
        slots = torch.arange(lo, hi, device=dev)[None]
        pos = slots if plan.positions is None else torch.tensor([plan.positions], device=dev)
        mask = torch.cat([torch.ones(hi - lo, lo, dtype=torch.bool, device=dev), self._fed_visible(plan)], dim=1)
        return ids, pos, slots, mask[None, None], hi

    def _padded(self, rows, fed):
        """Rows padded to the longest fed range with dummy queries at slot `pad` (see the module docstring)."""
        dev = self.dlm.device
        q = max(p.fed for p in fed if p is not None)
        pad = max([p.fed_end for p in fed if p is not None] + [state.cached for state, _ in rows])
        kv_len = pad + 1
        masks, id_rows, pos_rows, slot_rows = [], [], [], []
        key = torch.arange(kv_len, device=dev)
        for (state, _), p in zip(rows, fed):
            n = p.fed if p is not None else 0
            mask = (key == pad).expand(q, kv_len).clone()  # dummy queries read their own slot only
            if p is not None:
                mask[:n] = False
                mask[:n, :p.fed_start] = True  # cached slots: read by all; past the fed range: by none
                mask[:n, p.fed_start:p.fed_end] = self._fed_visible(p)
            masks.append(mask)
            id_rows.append((self._ids(state, p) if p is not None else []) + [self.mask_id] * (q - n))
            pos_rows.append((self._positions(p) if p is not None else []) + [pad] * (q - n))
            slot_rows.append((list(range(p.fed_start, p.fed_end)) if p is not None else []) + [pad] * (q - n))
        ids = torch.tensor(id_rows, device=dev)
        pos = torch.tensor(pos_rows, device=dev)
        slots = pos if pos_rows == slot_rows else torch.tensor(slot_rows, device=dev)
        return ids, pos, slots, torch.stack(masks)[:, None], kv_len

    # ------------------------------------------------------------------------------------------ outputs
    def _pick_logits(self, hidden: torch.Tensor, fed: list[Plan | None]) -> list[torch.Tensor | None]:
        """Only the positions whose logits are used go through the LM head."""
        picks = {i: [x - p.fed_start for x in p.logit_pos] for i, p in enumerate(fed) if p is not None and p.logit_pos}
        out: list[torch.Tensor | None] = [None] * len(fed)
        if not picks:
            return out
        if len(fed) == 1:
            cols = picks[0]
            h = hidden[0, cols[0]:cols[-1] + 1] if cols[-1] - cols[0] + 1 == len(cols) else hidden[0, cols]
        else:
            h = hidden[[i for i, c in picks.items() for _ in c], [x for c in picks.values() for x in c]]
        for i, logits in zip(picks, self.dlm.logits(h).split([len(c) for c in picks.values()])):
            out[i] = logits
        return out
