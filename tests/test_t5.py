"""Our Flax T5 against transformers' PyTorch T5ForConditionalGeneration on the same random weights; HF I/O, the
TARP hook, the seq2seq loss, and exact meta-gradients and meta-training on a tiny T5."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import transformers

from mltd_jax import meta, models, tarp
from mltd_jax.data import Seq2SeqEncoder, word_level_tokenizer
from mltd_jax.models import t5
from mltd_jax.state import TrainState
from tests.helpers import perturbed_variables

# heads * d_kv (8) != d_model (12); 8 buckets up to distance 12, so the logarithmic buckets are used at length 9.
SIZE = dict(
  vocab_size=23,
  d_model=12,
  d_kv=4,
  d_ff=20,
  num_heads=2,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=12,
  pad_token_id=0,
  eos_token_id=1,
  decoder_start_token_id=0,
)
VARIANTS = {
  "original": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_layers=2, num_decoder_layers=1),
  "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=1, num_decoder_layers=2),
}


def make_hf(tmp_path, name):
  """A random transformers T5 of variant ``name``, saved to ``tmp_path / name``."""
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**SIZE, **VARIANTS[name])).eval()
  with torch.no_grad():
    for n, p in hf.named_parameters():
      if "layer_norm" in n:  # non-trivial norms, so that a misplaced one would show
        p.add_(0.1 * torch.randn_like(p))
    if name == "v1_1":  # transformers 5 ties lm_head even when asked not to; untie it as Flan-T5 checkpoints are
      hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight))
  out = tmp_path / name
  hf.save_pretrained(out, safe_serialization=True)
  if name == "original":  # as older checkpoints: tied copies stored, and an unused cross-attention bias table
    state = safetensors.numpy.load_file(out / "model.safetensors")
    for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
      state[key] = state["shared.weight"].copy()
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.ones((8, 2), np.float32)
    safetensors.numpy.save_file(state, out / "model.safetensors", metadata={"format": "pt"})
  return hf, out


def inputs(seed=0, b=3, s=9, t=6):
  """Source [b, s] and decoder inputs [b, t] with right and left padding in both (row 0 unpadded)."""
  rng = np.random.default_rng(seed)
  src, dec = rng.integers(2, SIZE["vocab_size"], (b, s)), rng.integers(2, SIZE["vocab_size"], (b, t))
  src_mask, dec_mask = np.ones((b, s), np.int32), np.ones((b, t), np.int32)
  src_mask[1, 6:], src_mask[2, :3] = 0, 0
  dec_mask[1, 4:], dec_mask[2, :2] = 0, 0
  return src.astype(np.int32), src_mask, dec.astype(np.int32), dec_mask


def hf_logits(hf, src, src_mask, dec, dec_mask):
  t = lambda x: None if x is None else torch.tensor(np.asarray(x, np.int64))  # noqa: E731
  with torch.no_grad():
    out = hf(input_ids=t(src), attention_mask=t(src_mask), decoder_input_ids=t(dec), decoder_attention_mask=t(dec_mask))
  return out.logits.numpy()


@functools.cache
def forward(config, dtype=jnp.float32):
  """The jitted forward of a config: one compile per config and input shapes, shared by the tests."""
  return jax.jit(t5.T5ForConditionalGeneration(config, dtype).apply)


def ours(model, params, src, src_mask, dec, dec_mask):
  return np.asarray(forward(model.config, model.dtype)({"params": params}, src, dec, src_mask, dec_mask))


def assert_params_equal(a, b):
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(x)[0] for x in (a, b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers_with_padding(tmp_path, name):
  hf, path = make_hf(tmp_path, name)
  model, params = models.from_pretrained(path)  # the family comes from config.json
  assert models.family_of(model) is t5.FAMILY and model.config == t5.T5Config(**SIZE, **VARIANTS[name])
  assert ("lm_head" in params) == (name == "v1_1")
  src, src_mask, dec, dec_mask = inputs()
  no_masks = ours(model, params, src, None, dec, None)
  np.testing.assert_allclose(no_masks, hf_logits(hf, src, None, dec, None), atol=1e-4, rtol=0)
  logits, ref = ours(model, params, src, src_mask, dec, dec_mask), hf_logits(hf, src, src_mask, dec, dec_mask)
  assert logits.dtype == np.float32 and logits.shape == (3, 6, SIZE["vocab_size"])
  valid = dec_mask.astype(bool)  # padded decoder positions are undefined in both
  np.testing.assert_allclose(logits[valid], ref[valid], atol=1e-4, rtol=0)
  assert np.abs(logits[valid] - no_masks[valid]).max() > 1e-3  # the masks did change something


def test_head_tied_by_transformers_5_loads_and_copies_are_checked(tmp_path):
  """transformers 5 ties an unscaled (v1.1) T5's head to ``shared`` and stores none: it loads as a copy of shared,
  with transformers' logits. A stored embedding or head copy that differs from ``shared`` is an error."""
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**SIZE, **VARIANTS["v1_1"])).eval()
  hf.save_pretrained(tmp_path / "tied", safe_serialization=True)
  state = safetensors.numpy.load_file(tmp_path / "tied" / "model.safetensors")
  if "lm_head.weight" in state:  # a transformers that stores it (as a copy) is covered too
    assert np.array_equal(state["lm_head.weight"], state["shared.weight"])
  model, params = models.from_pretrained(tmp_path / "tied")
  assert not model.config.tie_word_embeddings
  np.testing.assert_array_equal(np.asarray(params["lm_head"]["weight"]), state["shared.weight"].T)
  batch = inputs(seed=3)
  valid = batch[3].astype(bool)
  np.testing.assert_allclose(ours(model, params, *batch)[valid], hf_logits(hf, *batch)[valid], atol=1e-4, rtol=0)
  tied_cfg = t5.T5Config(**SIZE, **VARIANTS["original"])
  bad_copy = {**state, "decoder.embed_tokens.weight": state["shared.weight"] + 1}
  with pytest.raises(ValueError, match="decoder.embed_tokens.weight differs from shared.weight"):
    t5.from_state_dict(bad_copy, tied_cfg)
  with pytest.raises(ValueError, match="lm_head.weight differs from shared.weight.*scale_decoder_outputs=false"):
    t5.from_state_dict({**state, "lm_head.weight": state["shared.weight"] + 1}, tied_cfg)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_round_trip_through_transformers(tmp_path, name):
  cfg = t5.T5Config(**SIZE, **VARIANTS[name])
  model = t5.T5ForConditionalGeneration(cfg)
  params = model.init_params(jax.random.key(1))
  out = models.save_pretrained(model, params, tmp_path / "ours")
  hf, info = transformers.T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  hf.eval()
  batch = inputs(seed=2)
  valid = batch[3].astype(bool)
  np.testing.assert_allclose(ours(model, params, *batch)[valid], hf_logits(hf, *batch)[valid], atol=1e-4, rtol=0)
  hf.save_pretrained(tmp_path / "theirs", safe_serialization=True)  # transformers 5's own config.json flavour
  model2, params2 = models.from_pretrained(tmp_path / "theirs")
  assert model2.config == cfg
  assert_params_equal(params2, params)


def test_relative_position_bucket_matches_transformers():
  relative = np.arange(-300, 301)
  for buckets, distance in ((32, 128), (8, 12), (6, 7)):
    for bidirectional in (True, False):
      ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.tensor(relative), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
      )
      got = t5.relative_position_bucket(jnp.asarray(relative), bidirectional, buckets, distance)
      np.testing.assert_array_equal(np.asarray(got), ref.numpy(), err_msg=f"{buckets} {distance} {bidirectional}")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_dense_paths_and_default_targets(name):
  model = t5.T5ForConditionalGeneration(
    t5.T5Config(**{**SIZE, **VARIANTS[name], "num_layers": 1, "num_decoder_layers": 1})
  )
  ffn = ("wi_0", "wi_1", "wo") if name == "v1_1" else ("wi", "wo")
  block = lambda stack, layer, module, names: [(stack, "block", "0", "layer", layer, module, n) for n in names]  # noqa: E731
  targets = [
    *block("encoder", "0", "SelfAttention", "qkvo"),
    *block("encoder", "1", "DenseReluDense", ffn),
    *block("decoder", "0", "SelfAttention", "qkvo"),
    *block("decoder", "1", "EncDecAttention", "qkvo"),
    *block("decoder", "2", "DenseReluDense", ffn),
  ]
  paths = models.dense_paths(model)
  assert paths == sorted(targets + ([("lm_head",)] if name == "v1_1" else []))
  params = jax.eval_shape(model.init_params, jax.random.key(0))
  assert tarp.target_paths(params, t5.DEFAULT_TARGETS, paths) == sorted(targets)  # not lm_head


def test_tarp_zero_difference_is_the_base_model_and_reaches_both_stacks():
  model = t5.T5ForConditionalGeneration(t5.T5Config(**SIZE, **VARIANTS["v1_1"]))
  params, paths = model.init_params(jax.random.key(0)), models.dense_paths(model)
  src, src_mask, dec, dec_mask = inputs()
  run = jax.jit(lambda v: model.apply(v, src, dec, attention_mask=src_mask, decoder_attention_mask=dec_mask))
  base = run({"params": params})
  for kind in ("bilinear", "dynamic"):  # a static and a per-token difference
    diff = tarp.init(jax.random.key(1), params, tarp.TarpConfig(kind=kind, rank=2, targets=t5.DEFAULT_TARGETS), paths)
    assert set(diff) == {"encoder", "decoder"}
    np.testing.assert_array_equal(run({"params": params, "tarp": diff}), base)
  # A non-zero difference in the encoder alone changes the logits: TARP reaches the encoder, not only the decoder.
  diff["encoder"] = jax.tree.map(lambda x: x + 0.3, diff["encoder"])
  assert float(jnp.abs(run({"params": params, "tarp": diff}) - base).max()) > 1e-3


def test_loss_equals_transformers_labels_loss(tmp_path):
  hf, path = make_hf(tmp_path, "original")
  model, params = models.from_pretrained(path)
  src, src_mask, _, _ = inputs()
  rng = np.random.default_rng(5)
  target = rng.integers(2, SIZE["vocab_size"], (3, 6)).astype(np.int32)  # ids after the end are junk: never read
  target_mask = np.ones_like(target)
  target_mask[1, 4:], target_mask[2, 2:] = 0, 0
  batch = {"source_ids": src, "source_mask": src_mask, "target_ids": target, "target_mask": target_mask}
  loss_fn = t5.make_loss(model)

  labels = torch.tensor(np.where(target_mask > 0, target, -100).astype(np.int64))  # transformers' ignore index
  kw = dict(input_ids=torch.tensor(src.astype(np.int64)), attention_mask=torch.tensor(src_mask))
  with torch.no_grad():
    ref = float(hf(**kw, labels=labels).loss)
    # Weights drop a token from the loss but not from the decoder's input: the reference keeps its input too.
    weights = target_mask.copy()
    weights[:, 1] = 0
    some = torch.tensor(np.where(weights > 0, target, -100).astype(np.int64))
    ref_weighted = float(hf(**kw, decoder_input_ids=hf._shift_right(labels), labels=some).loss)
  loss_fn = jax.jit(loss_fn)
  total, count = loss_fn({"params": params}, batch, None)  # default weights: the target mask
  assert int(count) == target_mask.sum()
  np.testing.assert_allclose(float(total / count), ref, rtol=1e-5)
  total, count = loss_fn({"params": params}, {**batch, "weights": weights}, None)
  assert int(count) == weights.sum()
  np.testing.assert_allclose(float(total / count), ref_weighted, rtol=1e-5)


def test_exact_meta_gradient_matches_finite_differences():
  cfg = t5.T5Config(**{**SIZE, **VARIANTS["v1_1"], "vocab_size": 13, "d_model": 8, "d_ff": 8, "num_decoder_layers": 1})

  def seq2seq(seed):
    r = np.random.default_rng(seed)
    mask_s, mask_t = np.ones((2, 5), np.int32), np.ones((2, 4), np.int32)
    mask_s[1, 3:], mask_t[1, 2:] = 0, 0
    ids = lambda n: r.integers(2, 13, (2, n)).astype(np.int32)  # noqa: E731
    return {"source_ids": ids(5), "source_mask": mask_s, "target_ids": ids(4), "target_mask": mask_t}

  t = {"support": seq2seq(1), "query": seq2seq(2)}
  inner = meta.InnerLoop(steps=2, lr=0.3, fast_regex="^tarp/")
  with jax.enable_x64(True):
    model = t5.T5ForConditionalGeneration(cfg, dtype=jnp.float64)
    params = model.init_params(jax.random.key(0))
    variables = perturbed_variables(model, params, "bilinear", scale=0.1, targets=t5.DEFAULT_TARGETS)
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
    loss_fn = t5.make_loss(model)
    # One compile: the finite differences read the value of the same jitted function.
    value_and_grad = jax.jit(jax.value_and_grad(lambda v: meta.task_loss(loss_fn, v, t, inner, jax.random.key(0))))
    _, grads = value_and_grad(variables)
    leaves, tree = jax.tree.flatten(variables)
    rng = np.random.default_rng(0)
    direction = tree.unflatten([jnp.asarray(rng.normal(size=x.shape)) for x in leaves])  # base and difference
    loss = lambda s: value_and_grad(jax.tree.map(lambda x, d: x + s * d, variables, direction))[0]  # noqa: E731
    central = lambda eps: (loss(eps) - loss(-eps)) / (2 * eps)  # noqa: E731
    fd = (4 * central(5e-7) - central(1e-6)) / 3  # Richardson: error O(eps^4)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6, atol=1e-9)
    assert float(jnp.abs(grads["tarp"]["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]["V"]).max()) > 0


def translation_task(encoder, words, seed, shots=4):
  """A task maps each source word to a target word by its own permutation; support and query share it."""
  rng = np.random.default_rng(seed)
  perm = dict(zip(words, rng.permutation(words)))

  def pairs():
    sources = [list(rng.choice(words, 3, replace=False)) for _ in range(shots)]
    return [(" ".join(s), " ".join(perm[w] for w in s)) for s in sources]

  return {"support": encoder.encode(pairs()), "query": encoder.encode(pairs())}


def test_tiny_t5_meta_trains_with_the_seq2seq_loss():
  words = [f"w{i}" for i in range(8)]
  tok = word_level_tokenizer(words)
  encoder = Seq2SeqEncoder(tok, source_len=4, target_len=4)
  size = {k: SIZE[k] for k in ("d_model", "d_kv", "d_ff", "num_heads", "relative_attention_num_buckets")}
  size.update(
    relative_attention_max_distance=12, num_layers=1, feed_forward_proj="gated-gelu", tie_word_embeddings=False
  )
  model, params = models.fresh("t5", size, tok, encoder.max_len, jax.random.key(0))
  family = models.family_of(model)
  assert family is t5.FAMILY and family.encoder == "seq2seq"
  assert (model.config.vocab_size, model.config.pad_token_id) == (len(tok), tok.pad_token_id)
  assert model.config.decoder_start_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
  diff = tarp.init(
    jax.random.key(1), params, tarp.TarpConfig(rank=2, targets=family.default_targets), models.dense_paths(model)
  )
  tx = optax.adam(1e-2)
  inner = meta.InnerLoop(steps=1, lr=0.3, fast_regex="^tarp/")  # second order; steps=2 is checked above
  step = jax.jit(meta.make_meta_step(family.make_loss(model), tx, inner), donate_argnums=0)
  batch = jax.tree.map(lambda *x: np.stack(x), *(translation_task(encoder, words, s) for s in (0, 1)))
  state = TrainState.create({"params": params, "tarp": diff}, tx)
  before = jax.tree.map(np.array, state.variables)
  seen = []
  for _ in range(5):
    state, metrics = step(state, batch, jax.random.key(2))
    seen.append(float(metrics["query_loss"]))
  assert np.all(np.diff(seen) < 0), seen
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.tree.map(np.array, state.variables))
  assert all(jax.tree.leaves(changed["params"])) and all(jax.tree.leaves(changed["tarp"]))


def test_dtype_policy_remat_and_dropout():
  cfg = t5.T5Config(**SIZE, **VARIANTS["original"])  # dropout_rate 0.1
  model = t5.T5ForConditionalGeneration(cfg)
  params = model.init_params(jax.random.key(0))
  src, src_mask, dec, dec_mask = inputs()
  base = ours(model, params, src, src_mask, dec, dec_mask)
  half = ours(t5.T5ForConditionalGeneration(cfg, jnp.bfloat16), params, src, src_mask, dec, dec_mask)
  assert half.dtype == np.float32 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert np.abs(half - base).max() < 0.1
  if jax.default_backend() == "cpu":  # `matmul.mixed`: every product narrow, attention's two included
    half_model = t5.T5ForConditionalGeneration(cfg, jnp.bfloat16)
    eqns = str(jax.make_jaxpr(lambda p: half_model.apply({"params": p}, src, dec, src_mask, dec_mask))(params))
    attentions = cfg.num_layers + 2 * cfg.num_decoder_layers  # encoder self; decoder self and cross
    want = len(models.dense_paths(model)) + 2 * attentions + 1  # every projection, q k^T and P v, the tied LM head
    assert eqns.count("lowp_matmul[") == want and "dot_general[" not in eqns
  remat = t5.T5ForConditionalGeneration(cfg, remat=True)  # the same layers and parameters under jax.checkpoint
  assert models.dense_paths(remat) == models.dense_paths(model)
  assert jax.tree.structure(jax.eval_shape(remat.init_params, jax.random.key(0))) == jax.tree.structure(params)
  train = jax.jit(
    lambda p, key: model.apply(p, src, dec, src_mask, dec_mask, deterministic=False, rngs={"dropout": key})
  )
  dropped = np.asarray(train({"params": params}, jax.random.key(3)))
  assert np.all(np.isfinite(dropped)) and np.abs(dropped - base).max() > 1e-3


def test_config_conversion_and_errors():
  assert t5.from_hf_config({}) == t5.T5Config()  # t5-small's sizes; tied, decoder starts with pad
  assert t5.T5Config().decoder_start_token_id == 0 and t5.T5Config(num_layers=3).num_decoder_layers == 3
  assert not t5.from_hf_config({"tie_word_embeddings": False}).tie_word_embeddings  # transformers 4 / Flan-T5
  # transformers 5 writes tie_word_embeddings=True for every T5 and keeps the variant in scale_decoder_outputs
  assert not t5.from_hf_config({"tie_word_embeddings": True, "scale_decoder_outputs": False}).tie_word_embeddings
  cfg = t5.T5Config(**SIZE, **VARIANTS["v1_1"])
  assert t5.from_hf_config(t5.to_hf_config(cfg)) == cfg
  with pytest.raises(ValueError, match=r"feed_forward_proj='gated-swiglu' is not supported"):
    t5.T5Config(feed_forward_proj="gated-swiglu")
  with pytest.raises(ValueError, match=r"relative_attention_num_buckets=2"):
    t5.T5Config(relative_attention_num_buckets=2)
  with pytest.raises(ValueError, match=r"is_encoder_decoder=False"):
    t5.from_hf_config({"is_encoder_decoder": False})
  with pytest.raises(ValueError, match=r"'dense_act_fn': 'relu'.*feed_forward_proj='gated-gelu'"):
    t5.from_hf_config({"feed_forward_proj": "gated-gelu", "dense_act_fn": "relu"})
  tok = word_level_tokenizer(["a"])
  with pytest.raises(ValueError, match=r"config.model.init has fields \['n_layer'\]"):
    t5.fresh_config({"n_layer": 1}, tok, 8, 0.0)
  with pytest.raises(ValueError, match=r"config.model.init sets \['vocab_size'\]"):
    t5.fresh_config({"vocab_size": 9}, tok, 8, 0.0)
