"""ar2dlm: convert an autoregressive LM into a block-diffusion LM, then decode, evaluate and serve it."""

__version__ = "0.1.0"

from ar2dlm.errors import Ar2dlmError  # noqa: E402

__all__ = ["Ar2dlmError", "__version__"]
