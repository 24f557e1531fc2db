"""Flax language models with transformers' parameter names, and Hugging Face format I/O."""

from mltd_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from mltd_jax.models.hub import from_pretrained, save_pretrained

__all__ = ["GPT2Config", "GPT2LMHeadModel", "from_pretrained", "save_pretrained"]
