"""Model families (Flax, transformers' parameter names) and Hugging Face format I/O.

A family is one module (`gpt2`, `t5`: config, linen model, HF conversion, default TARP targets, loss) registered in
`registry.FAMILIES`; `from_pretrained`, `save_pretrained` and `build` work for every registered family.
"""

from mltd_jax.models.family import Family
from mltd_jax.models.layers import dense_paths
from mltd_jax.models.registry import FAMILIES, build, family_for, family_of, fresh, from_pretrained, save_pretrained

__all__ = [
  "FAMILIES",
  "Family",
  "build",
  "dense_paths",
  "family_for",
  "family_of",
  "fresh",
  "from_pretrained",
  "save_pretrained",
]
