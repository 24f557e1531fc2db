"""Small builders shared by the tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mltd_jax import tarp
from mltd_jax.models import gpt2
from mltd_jax.models.layers import dense_paths


def all_equations(jaxpr):
  """Every equation of a jaxpr (open or closed) and, recursively, of the jaxprs its equations hold as parameters
  (scan and cond bodies, custom-derivative calls, remat, pjit)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          yield from all_equations(sub)


def tiny_gpt2(vocab=13, d=8, layers=2, heads=2, positions=16, seed=0, dtype=jnp.float32):
  cfg = gpt2.GPT2Config(
    vocab_size=vocab,
    n_positions=positions,
    n_embd=d,
    n_layer=layers,
    n_head=heads,
    embd_pdrop=0.0,
    resid_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
  )
  model = gpt2.GPT2LMHeadModel(cfg, dtype=dtype)
  return model, model.init_params(jax.random.key(seed))


def lm_batch(vocab, shape, seed=0, pad_last=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, shape).astype(np.int32)
  mask = np.ones(shape, np.int32)
  if pad_last:
    mask[..., -pad_last:] = 0
  return {"ids": ids, "mask": mask}


def perturbed_variables(model, params, kind, seed=1, scale=0.3, **kw):
  """{'params', 'tarp'} with a non-zero difference (every leaf perturbed), so every meta-gradient term is exercised.

  The targets are ``model``'s dense layers (`models.layers.dense_paths`); ``kw`` goes to `tarp.TarpConfig`.
  """
  cfg = tarp.TarpConfig(**{"kind": kind, "rank": 2, "kron_n": 2, "targets": gpt2.DEFAULT_TARGETS, **kw})
  diff = tarp.init(jax.random.key(seed), params, cfg, dense_paths(model))
  leaves, tree = jax.tree.flatten(diff)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  diff = tree.unflatten([x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return {"params": params, "tarp": diff}


@functools.partial(jax.jit, static_argnames=("model", "slots"))
def cached_logits(model, variables, ids, mask, new, slots):
  """Logits [b, 1 + n, V] from a family's decoding cache (`mltd_jax.decode.Decoder`): after the prompt (or the
  start token), then after feeding each of ``new`` [b, n]; ``slots`` is init_decode's ``max_new_tokens``."""
  first, cache = model.init_decode(variables, ids, mask, slots)

  def step(cache, x):
    tok, i = x
    logits, cache = model.decode_step(variables, cache, tok, i)
    return cache, logits

  _, rest = jax.lax.scan(step, cache, (new.T, jnp.arange(new.shape[1])))  # rest [n, b, V]
  return jnp.concatenate([first[:, None], rest.transpose(1, 0, 2)], 1)


def experiment_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``, loaded by path as absl's config_flags does."""
  from pathlib import Path

  from mltd_jax import config_files

  return config_files.load(Path(__file__).resolve().parents[1] / "configs" / f"{name}.py").get_config(arg)
