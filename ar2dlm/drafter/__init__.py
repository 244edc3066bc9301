"""Drafters: a small trainable part on top of a frozen AR parent that drafts tokens for the lossless `verify`
policy to check against the parent (the output is the parent's own). Two kinds, each a model, its training and a
folder format that `ar2dlm.model.open.load_dlm` loads on top of a fresh copy of the parent:

- gated (`convert --drafter`): LoRA on every linear layer of the parent plus a mask-token row, gated per token so
  that only mask tokens run it; clean positions are the parent bit for bit, and mask positions in the same forward
  draft the tokens after the parent's own next one. `gated.py` (the model, save and load), `gated_objective.py`
  (the loss at masked positions), `gated_eval.py` (held-out draft acceptance), `gated_training.py` (what the
  convert job does differently for it).
- feature (`convert --drafter-kind feature`): a small block-diffusion model of a few decoder layers that reads the
  parent's hidden states and fills a block of masks after the last committed token; the parent itself runs
  unchanged. `feature.py` (the model, save and load), `feature_cache.py` (the parent's features for a corpus,
  computed once and kept on disk), `feature_training.py` (its training job).
"""
