"""Our Flax GPT-2 against transformers' PyTorch GPT2LMHeadModel on the same random weights, and hub I/O."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from mltd_jax import models
from mltd_jax.models import gpt2

CONFIGS = {
  "odd": dict(vocab_size=101, n_positions=32, n_embd=15, n_layer=2, n_head=3, activation_function="gelu_new"),
  "wide": dict(
    vocab_size=67,
    n_positions=24,
    n_embd=40,
    n_layer=3,
    n_head=5,
    n_inner=72,
    activation_function="gelu",
    layer_norm_epsilon=1e-6,
  ),
}


def make_hf(tmp_path, name):
  cfg = transformers.GPT2Config(**CONFIGS[name], bos_token_id=0, eos_token_id=0)
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # non-trivial layer norms, so that a swapped weight/bias would show; kernels x5, so that
    for n, p in hf.named_parameters():  # activations leave GELU's near-linear range (tanh GELU for exact: 6e-4 off)
      if "ln_" in n:
        p.add_(0.1 * torch.randn_like(p))
      elif p.ndim == 2:
        p.mul_(5.0)
  out = tmp_path / name
  hf.save_pretrained(out, safe_serialization=True)
  return hf, out


def hf_logits(hf, ids, mask=None, pos=None):
  with torch.no_grad():
    kw = {}
    if mask is not None:
      kw["attention_mask"] = torch.tensor(np.asarray(mask))
    if pos is not None:
      kw["position_ids"] = torch.tensor(np.asarray(pos))
    return hf(torch.tensor(np.asarray(ids)), **kw).logits.numpy()


def batch(vocab, b=3, t=11, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
  hf, path = make_hf(tmp_path, name)
  model, params = models.from_pretrained(path)
  ids = batch(CONFIGS[name]["vocab_size"])
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
  np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_with_padding(tmp_path, name):
  hf, path = make_hf(tmp_path, name)
  model, params = models.from_pretrained(path)
  ids = batch(CONFIGS[name]["vocab_size"], t=9)
  right = np.ones_like(ids)
  right[0, 6:] = 0
  right[2, 3:] = 0  # noqa: E702
  left = np.ones_like(ids)
  left[1, :4] = 0  # noqa: E702
  for mask in (right, left):
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    ours = np.asarray(model.apply({"params": params}, ids, attention_mask=mask, position_ids=pos))
    ref = hf_logits(hf, ids, mask, pos)
    valid = mask.astype(bool)  # padded query positions are undefined in both
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5, rtol=0)


def test_loss_matches_transformers(tmp_path):
  """`gpt2.make_loss` (the next-token NLL summed over the target tokens, and their count) against transformers'
  loss with labels on the same weights: right padding ignored, and ``weights`` leaving out one real target token as
  a label of -100 does."""
  hf, path = make_hf(tmp_path, "wide")
  model, params = models.from_pretrained(path)
  ids = batch(CONFIGS["wide"]["vocab_size"], t=9)
  mask = np.ones_like(ids)
  mask[0, 6:] = 0
  mask[2, 3:] = 0
  weights = mask.copy()
  weights[1, 4] = 0  # target token 4 of row 1 does not count
  loss_fn = gpt2.make_loss(model)
  for w in (None, weights):
    labels = np.where((mask if w is None else w) == 1, ids, -100)
    with torch.no_grad():
      out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels, dtype=torch.long))
    ref = out.loss.item()
    b = {"ids": ids, "mask": mask} if w is None else {"ids": ids, "mask": mask, "weights": w}
    total, count = loss_fn({"params": params}, b, None)
    assert int(count) == int((labels[:, 1:] != -100).sum())
    np.testing.assert_allclose(float(total) / float(count), ref, rtol=1e-5)


def test_save_pretrained_round_trip(tmp_path):
  cfg = gpt2.GPT2Config(**CONFIGS["odd"], bos_token_id=0, eos_token_id=0)
  model = gpt2.GPT2LMHeadModel(cfg)
  params = model.init_params(jax.random.key(1))
  out = models.save_pretrained(model, params, tmp_path / "ours")
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = batch(cfg.vocab_size, seed=3)
  ours = np.asarray(model.apply({"params": params}, ids))
  np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=1e-4, rtol=0)
  model2, params2 = models.from_pretrained(out)
  assert model2.config == cfg
  np.testing.assert_array_equal(np.asarray(model2.apply({"params": params2}, ids)), ours)


def test_bfloat16_compute_keeps_float32_params_and_logits(tmp_path):
  _, path = make_hf(tmp_path, "odd")
  model, params = models.from_pretrained(path, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  ids = batch(CONFIGS["odd"]["vocab_size"])
  logits = model.apply({"params": params}, ids)
  ref = models.from_pretrained(path)[0].apply({"params": params}, ids)
  assert logits.dtype == jnp.float32
  err, spread = float(jnp.abs(logits - ref).max()), float(jnp.abs(ref).max())
  assert err < 0.02 * spread, (err, spread)  # bfloat16 operands: ~3 significant digits per product
  if jax.default_backend() == "cpu":  # `matmul.mixed`: every product narrow, attention's two included
    eqns = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids))(params))
    n_layer = model.config.n_layer
    assert eqns.count("lowp_matmul[") == 6 * n_layer + 1, "4 dense kernels and 2 attention products per block, LM head"


def test_layer_norm_backward_matches_torch_to_second_order():
  """`layers.layer_norm`'s written-out backward (a custom VJP) against torch's layer norm in float64: the gradient
  w.r.t. input, weight and bias, and a forward-over-reverse Hessian-vector product (how `mltd_jax.meta`
  differentiates it) against torch's double backward; in float32 against JAX's derivative of the formula; the
  module uses it in any compute dtype and keeps transformers' parameter names."""
  from mltd_jax.models import layers

  rng = np.random.default_rng(0)
  x, c, dx, dw, db = (rng.standard_normal(s) for s in [(3, 5, 7), (3, 5, 7), (3, 5, 7), (7,), (7,)])
  w, b = 1 + 0.3 * rng.standard_normal(7), 0.2 * rng.standard_normal(7)
  eps = 1e-5
  with jax.enable_x64(True):
    f = lambda x, w, b: jnp.sum(layers.layer_norm(x, w, b, eps) * c)  # noqa: E731
    args = tuple(jnp.asarray(v) for v in (x, w, b))
    grads = jax.grad(f, argnums=(0, 1, 2))(*args)
    hvp = jax.jvp(lambda *a: jax.grad(f, argnums=(0, 1, 2))(*a), args, tuple(map(jnp.asarray, (dx, dw, db))))[1]
    assert "custom_vjp_call" in str(jax.make_jaxpr(f)(*args))  # the written-out backward, not a derived one
  assert set(jax.eval_shape(layers.LayerNorm(eps).init, jax.random.key(0), x[0])["params"]) == {"weight", "bias"}
  module = layers.LayerNorm(eps, jnp.bfloat16)  # float32 inside, whatever the compute dtype
  apply = lambda x, v: module.apply(v, x).astype(jnp.float32).sum()  # noqa: E731
  x32, v32 = jnp.asarray(x, jnp.float32), {"params": {"weight": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b)}}
  assert "custom_vjp_call" in str(jax.make_jaxpr(apply)(x32, v32))  # the module uses the written-out backward

  def plain(x, w):  # the formula, differentiated by JAX
    return ((x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + eps) * w).sum()

  want32 = jax.grad(plain, argnums=(0, 1))(x32, v32["params"]["weight"])
  got32 = jax.grad(lambda x, v: layers.layer_norm(x, v["params"]["weight"], v["params"]["bias"], eps).sum(),
                   argnums=(0, 1))(x32, v32)  # fmt: skip
  np.testing.assert_allclose(got32[0], want32[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got32[1]["params"]["weight"], want32[1], rtol=1e-5, atol=1e-5)
  tx, tw, tb = (torch.tensor(v, requires_grad=True) for v in (x, w, b))
  out = (torch.nn.functional.layer_norm(tx, (7,), tw, tb, eps) * torch.tensor(c)).sum()
  want = torch.autograd.grad(out, (tx, tw, tb), create_graph=True)
  tangent = sum((g * torch.tensor(t)).sum() for g, t in zip(want, (dx, dw, db)))
  want_hvp = torch.autograd.grad(tangent, (tx, tw, tb), allow_unused=True)  # None for the bias: no second derivative
  want_hvp = [torch.zeros_like(t) if h is None else h for h, t in zip(want_hvp, (tx, tw, tb))]
  for got, ref in zip((*grads, *hvp), (*want, *want_hvp)):
    np.testing.assert_allclose(np.asarray(got), ref.detach().numpy(), rtol=1e-9, atol=1e-11)


def test_missing_config_names_the_file(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.from_pretrained(tmp_path)


def test_other_model_type_is_refused(tmp_path):
  _, path = make_hf(tmp_path, "odd")
  cfg = json.loads((path / "config.json").read_text())
  cfg["model_type"] = "bert"
  (path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config.json.*model_type='bert'"):
    models.from_pretrained(path)


def test_shape_mismatch_names_file_and_key(tmp_path):
  _, path = make_hf(tmp_path, "odd")
  state = safetensors.numpy.load_file(path / "model.safetensors")
  state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"][:, :7].copy()
  safetensors.numpy.save_file(state, path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model.safetensors.*h.1.mlp.c_fc.weight.*shape"):
    models.from_pretrained(path)


def test_untied_output_head_is_refused(tmp_path):
  """Our GPT-2 scores with wte: a config with an untied head, or a file whose lm_head.weight differs from wte, is an
  error (a tied copy, as torch.save of the state dict writes, loads)."""
  _, path = make_hf(tmp_path, "odd")
  state = safetensors.numpy.load_file(path / "model.safetensors")
  state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0
  safetensors.numpy.save_file(state, path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"lm_head.weight differs from transformer.wte.weight.*tie_word_embeddings"):
    models.from_pretrained(path)
  cfg = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
  with pytest.raises(ValueError, match="'tie_word_embeddings': False"):
    models.from_pretrained(path)


def test_pickle_checkpoint_refused_unless_allowed(tmp_path):
  hf, path = make_hf(tmp_path, "odd")
  (path / "model.safetensors").unlink()
  torch.save(hf.state_dict(), path / "pytorch_model.bin")
  with pytest.raises(ValueError, match="pytorch_model.bin.*pickle"):
    models.from_pretrained(path)
  model, params = models.from_pretrained(path, allow_pickle=True)
  ids = batch(CONFIGS["odd"]["vocab_size"])
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)), hf_logits(hf, ids), atol=1e-5)


def test_missing_local_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    models.from_pretrained(tmp_path / "nope")


def test_hub_name_offline_says_what_to_do(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(OSError, match="could not download 'no-such-org/no-such-model'.*local directory"):
    models.from_pretrained("no-such-org/no-such-model")
