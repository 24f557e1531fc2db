"""Benchmark of decoding (`mltd_jax.decode.generate`): one JSON line per (search, TARP) setting.

Settings: greedy and beam search (``--beams``, default 1 and 4) on a random GPT-2 or T5 (``--family``) whose size
is given on the command line, with no TARP difference, a dynamic one (Sigma(x) per token, rank ``--rank`` on the
family's default targets: every attention and feed-forward kernel), or a static bilinear one applied per step
(``bilinear``) or folded into the kernels once (``bilinear_folded``, `mltd_jax.tarp.fold`). No EOS, so every row
generates ``--new`` tokens. GPT-2 continues a ``--prompt``-token prompt; T5 encodes a ``--prompt``-token source once
and decodes from its start token (``--layers`` encoder and decoder blocks, d_kv = d / heads, d_ff = 4 d, gated-GELU
with an untied head as in T5 v1.1).

  * ``tokens_per_s``: generated tokens (batch x new, beams not multiplied) per second, median of ``--repeats``;
  * ``first_call_s``: the first call, compilation included (unless an earlier setting had the same structure,
    e.g. ``bilinear_folded`` after ``none``: both are one plain ``'params'`` tree);
  * ``cost_vs_none``: median time over that of the same search without TARP (the paper reports about +10% for
    the dynamic kind).

  python benchmarks/decode.py                              # GPT-2: greedy and beam 4; none and dynamic TARP
  python benchmarks/decode.py --family t5                  # the same for T5
  python benchmarks/decode.py --tarp none bilinear bilinear_folded --beams 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python benchmarks/decode.py`

FIELDS = dict(layers=4, d=256, heads=4, vocab=4096, batch=8, prompt=32, new=64, rank=8, repeats=10, dtype="float32")
TARPS = ("none", "dynamic", "bilinear", "bilinear_folded")


def variables_for(kind: str, model, params, rank: int) -> dict:
  """``{'params': ...}`` (and ``'tarp'``) for one TARP setting, with a non-zero difference."""
  import jax

  from mltd_jax import models, tarp

  if kind == "none":
    return {"params": params}
  targets = models.family_of(model).default_targets
  cfg = tarp.TarpConfig(kind=kind.removesuffix("_folded"), rank=rank, targets=targets)
  diff = tarp.init(jax.random.key(1), params, cfg, models.dense_paths(model))
  diff = jax.tree.map(lambda x: x + 0.01, diff)  # V != 0: the difference changes the outputs
  if kind.endswith("_folded"):
    folded, left = tarp.fold(params, diff)
    return {"params": folded, **({"tarp": left} if left else {})}
  return {"params": params, "tarp": diff}


def build(a: argparse.Namespace, dtype):
  """The random model of ``a.family`` with the command line's sizes (no dropout)."""
  if a.family == "t5":
    from mltd_jax.models import t5

    cfg = t5.T5Config(
      vocab_size=a.vocab,
      d_model=a.d,
      d_kv=a.d // a.heads,
      d_ff=4 * a.d,
      num_layers=a.layers,
      num_heads=a.heads,
      dropout_rate=0.0,
      feed_forward_proj="gated-gelu",
      tie_word_embeddings=False,
    )
    return t5.T5ForConditionalGeneration(cfg, dtype=dtype)
  from mltd_jax.models import gpt2

  cfg = gpt2.GPT2Config(
    vocab_size=a.vocab,
    n_positions=a.prompt + a.new,
    n_embd=a.d,
    n_layer=a.layers,
    n_head=a.heads,
    embd_pdrop=0.0,
    resid_pdrop=0.0,
    attn_pdrop=0.0,
  )
  return gpt2.GPT2LMHeadModel(cfg, dtype=dtype)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--family", default="gpt2", choices=("gpt2", "t5"))
  for k, v in FIELDS.items():
    p.add_argument(f"--{k}", type=type(v), default=v)
  p.add_argument("--beams", type=int, nargs="*", default=[1, 4], help="1 = greedy")
  p.add_argument("--tarp", nargs="*", default=["none", "dynamic"], choices=TARPS)
  a = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from mltd_jax import decode

  model = build(a, jnp.dtype(a.dtype))
  params = model.init_params(jax.random.key(0))
  ids = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.prompt)).astype(np.int32)
  baseline = {}
  for beams in a.beams:
    for kind in a.tarp:
      variables = variables_for(kind, model, params, a.rank)
      run = lambda: decode.generate(model, variables, ids, num_beams=beams, max_new_tokens=a.new)  # noqa: E731
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      first = time.perf_counter() - t0
      jax.block_until_ready(run())  # warm-up, untimed
      times = []
      for _ in range(a.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
      med = statistics.median(times)
      if kind == "none":
        baseline[beams] = med
      row = {
        "impl": "mltd_jax",
        "family": a.family,
        "search": "greedy" if beams == 1 else "beam",
        "num_beams": beams,
        "tarp": kind,
        "rank": a.rank if kind != "none" else 0,
        **{k: getattr(a, k) for k in ("layers", "d", "heads", "vocab", "batch", "prompt", "new", "dtype")},
        "median_s": round(med, 5),
        "tokens_per_s": round(a.batch * a.new / med, 1),
        "first_call_s": round(first, 2),
        "cost_vs_none": round(med / baseline[beams], 3) if beams in baseline else None,
        "device": jax.devices()[0].device_kind,
      }
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
