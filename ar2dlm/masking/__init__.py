"""Training-time noise: which tokens of a clean batch are replaced by the mask token, per block."""

from ar2dlm.masking.strategies import (
    MaskingConfig,
    NoisyBatch,
    complement_mask,
    noise_batch,
    position_dependent_mask,
    sample_mask,
    uniform_mask,
)

__all__ = [
    "MaskingConfig",
    "NoisyBatch",
    "complement_mask",
    "noise_batch",
    "position_dependent_mask",
    "sample_mask",
    "uniform_mask",
]
