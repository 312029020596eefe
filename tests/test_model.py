"""The GPT module: shapes, causality, banded (local) attention against a
masked dense reference, rotary positions, initial loss, parameter counts,
and that a tiny model can memorize one batch."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (REPO, param_shapes, random_params, tiny_config,
                      tiny_model_config, train_steps)
from model import GPT, GPTConfig, KVCache, resize_vocab
from model.attention import banded_attention, rotary
from test_recipe import RECIPE
from trainer import config as config_lib
from trainer import objectives

B, L = 4, 16


def _tokens(seed, shape=(B, L), vocab=37):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _init(cfg, seed=0):
  return GPT(cfg), random_params(cfg, seed)


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


VARIANTS = {
    "learned-tied": {},
    "sinusoidal": dict(position="sinusoidal"),
    "untied": dict(tie_embeddings=False),
    "scan": dict(scan_layers=True),
    "remat-full": dict(remat="full"),
    "remat-full-scan-untied-nobias": dict(remat="full", scan_layers=True,
                                          tie_embeddings=False, use_bias=False),
    "rope": dict(position="rope"),
    "dense-local": dict(attention_pattern="dense,local", local_window=5),
    "dense-local-scan-remat": dict(attention_pattern="dense,local",
                                   local_window=5, scan_layers=True,
                                   remat="full"),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_logits_shape_and_dtype(overrides):
  cfg = tiny_model_config(**overrides)
  model, params = _init(cfg)
  tokens = _tokens(1)
  logits = jax.jit(model.apply)({"params": params}, tokens)
  assert logits.shape == (B, L, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  if overrides.get("scan_layers") and len(cfg.pattern) > 1:
    # One repeat of the pattern scanned: a block per place, stacked.
    assert set(params["blocks"]) == {"block_0", "block_1"}
    assert params["blocks"]["block_1"]["Attention_0"]["qkv_kernel"].shape == (
        1, 32, 3, 2, 16)
  elif overrides.get("scan_layers"):
    assert "blocks" in params and "block_0" not in params
    assert params["blocks"]["Attention_0"]["qkv_kernel"].shape == (2, 32, 3, 2,
                                                                   16)
  else:
    assert {"block_0", "block_1"} <= set(params) and "block_2" not in params
  assert ("lm_head" in params) == (not cfg.tie_embeddings)
  assert ("wpe" in params) == (cfg.position == "learned")


def test_inputs_shorter_than_the_context():
  model, params = _init(tiny_model_config())
  tokens = _tokens(1)
  apply = jax.jit(model.apply)
  full = apply({"params": params}, tokens)
  short = apply({"params": params}, tokens[:, :5])
  assert short.shape == (B, 5, 37)
  np.testing.assert_allclose(short, full[:, :5], atol=1e-5)


def test_bf16_compute_still_returns_float32_logits():
  cfg = tiny_model_config(dtype="bfloat16", num_layers=1)
  model, params = _init(cfg)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  logits = jax.jit(model.apply)({"params": params}, _tokens(1))
  assert logits.dtype == jnp.float32 and logits.shape == (B, L, 37)


def test_sinusoidal_positions_values():
  from model.gpt import sinusoidal_positions
  pe = np.asarray(sinusoidal_positions(6, 8))
  pos = np.arange(6)[:, None]
  freq = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  np.testing.assert_allclose(pe[:, 0::2], np.sin(pos * freq), atol=1e-6)
  np.testing.assert_allclose(pe[:, 1::2], np.cos(pos * freq), atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, dict(attention="xla"),
                                       dict(attention_chunks=3),
                                       dict(position="sinusoidal",
                                            scan_layers=True),
                                       dict(position="rope"),
                                       dict(attention_pattern="dense,local",
                                            local_window=3)],
                         ids=["einsum", "xla", "chunks3", "sinusoidal-scan",
                              "rope", "dense-local"])
def test_causality(overrides):
  cfg = tiny_model_config(**overrides)
  model, params = _init(cfg)
  apply = jax.jit(lambda t: model.apply({"params": params}, t))
  tokens = _tokens(2)
  base = np.asarray(apply(tokens))
  for t in (0, 5, L - 1):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    out = np.asarray(apply(changed))
    np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
    # Position t and every later one sees the change.
    diff = np.abs(out[:, t:] - base[:, t:]).max(axis=-1)
    assert diff.min() > 1e-5, (t, diff)


@pytest.mark.parametrize("length", [L, 5])
def test_attention_chunks_are_exact(length):
  """Query blocks that skip the keys after them change nothing: every block
  count gives the logits of XLA's own causal attention."""
  tokens = _tokens(3)[:, :length]
  params = random_params(tiny_model_config(), seed=4)
  reference = GPT(tiny_model_config(attention="xla")).apply(
      {"params": params}, tokens)
  for chunks in (1, 2, 3, 7, L + 4):
    logits = GPT(tiny_model_config(attention_chunks=chunks)).apply(
        {"params": params}, tokens)
    np.testing.assert_allclose(logits, reference, rtol=0, atol=2e-5,
                               err_msg=f"attention_chunks={chunks}")


# ------------------------------------------------------- banded attention


def _masked_dense_reference(q, k, v, window):
  """Softmax attention over all keys, masked to each query's band (numpy,
  float64): the definition banded_attention computes in blocks."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  L = q.shape[1]
  att = np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1])
  query, key = np.arange(L)[:, None], np.arange(L)[None, :]
  att = np.where((key <= query) & (key > query - window), att, -np.inf)
  probs = np.exp(att - att.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhqt,bthk->bqhk", probs, v)


def _qkv(seed, length):
  """Random queries, keys and values [2, length, 3 heads, 8]."""
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(key, (2, length, 3, 8)) for key in keys]


@pytest.mark.parametrize("length, window", [(16, 4), (19, 4), (12, 5),
                                            (7, 7), (5, 8), (64, 1)])
def test_banded_attention_equals_masked_dense(length, window):
  """Blocks of `window` queries against their own and the previous key
  block: the masked dense product's output, for lengths that are and are
  not multiples of the window, and windows as long as the input."""
  q, k, v = _qkv(0, length)
  out = jax.jit(banded_attention, static_argnums=3)(q, k, v, window)
  np.testing.assert_allclose(out, _masked_dense_reference(q, k, v, window),
                             rtol=0, atol=1e-6)


def test_keys_outside_the_band_get_zero_gradient():
  """The gradient of one query's output reaches exactly the keys and values
  of its band (its own and the window - 1 before it): exactly 0 elsewhere,
  in its own key block and the previous one too."""
  L, W = 24, 5
  q, k, v = _qkv(1, L)
  for query in (0, 3, 4, 5, 13, 23):
    grad_k, grad_v = jax.grad(
        lambda k, v: banded_attention(q, k, v, W)[:, query].sum(),
        argnums=(0, 1))(k, v)
    band = np.zeros(L, bool)
    band[max(0, query - W + 1):query + 1] = True
    per_key = lambda grad: np.abs(np.asarray(grad)).max(axis=(0, 2, 3))
    for grad in (grad_k, grad_v):
      assert (per_key(grad)[~band] == 0).all(), (query, per_key(grad))
    assert (per_key(grad_v)[band] > 0).all()
    # A lone key's score moves no probability: its gradient is 0 too.
    assert (per_key(grad_k)[band] > 0).all() == (band.sum() > 1)


def _apply(cfg, params, tokens):
  return np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, tokens))


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_local_layers_see_only_their_band(scan):
  """Two local layers of window 4: a token reaches the logits of the 3
  tokens after it through one layer, 6 through both, and none beyond; a
  dense layer in the pattern passes it on to every later token."""
  tokens = _tokens(6)
  changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % 37)
  for pattern, reach in (("local", 3 + 6), ("dense,local", L - 1)):
    cfg = tiny_model_config(attention_pattern=pattern, local_window=4,
                            scan_layers=scan)
    params = random_params(cfg, seed=7, std=0.3)
    diff = np.abs(_apply(cfg, params, changed) -
                  _apply(cfg, params, tokens)).max(axis=(0, 2))
    assert (diff[:3] == 0).all() and (diff[3:reach + 1] > 1e-5).all(), diff
    assert (diff[reach + 1:] <= 1e-6).all(), (pattern, diff)


def _to_scan(params, places: int):
  """Unrolled layers' params (block_0, block_1...) in the scanned layout of
  a pattern of `places`: blocks/block_j stacks blocks j, j + places..."""
  blocks = sorted((k for k in params if k.startswith("block_")),
                  key=lambda k: int(k.split("_")[1]))
  scanned = {f"block_{j}": jax.tree.map(
      lambda *x: np.stack(x), *[params[b] for b in blocks[j::places]])
             for j in range(places)}
  rest = {k: v for k, v in params.items() if k not in blocks}
  return {**rest, "blocks": scanned}


@pytest.mark.parametrize("attention, recipe", [("einsum", {}), ("xla", {}),
                                               ("einsum", RECIPE)],
                         ids=["einsum", "xla", "recipe"])
def test_alternating_pattern_scanned_equals_unrolled(attention, recipe):
  """4 layers of "dense,local": scanned over the 2 repeats of the pattern,
  with the same weights, the logits of the unrolled layers (the modern
  recipe's too); XLA's attention (its local_window_size) gives those of the
  einsum one's blocks."""
  fields = dict(num_layers=4, attention_pattern="dense,local",
                local_window=5, attention=attention, **recipe)
  cfg = tiny_model_config(**fields)
  params = random_params(cfg, seed=8, std=0.3)
  tokens = _tokens(9)
  unrolled = _apply(cfg, params, tokens)
  scanned = _apply(tiny_model_config(scan_layers=True, **fields),
                   _to_scan(params, 2), tokens)
  np.testing.assert_allclose(scanned, unrolled, rtol=0, atol=2e-5)
  if attention == "xla":
    np.testing.assert_allclose(
        unrolled, _apply(tiny_model_config(**{**fields, "attention":
                                               "einsum"}), params, tokens),
        rtol=0, atol=2e-5)


def test_attention_pattern_cycles_over_the_layers():
  cfg = tiny_model_config(num_layers=5, attention_pattern="dense, local,local",
                          local_window=4)
  assert cfg.layer_kinds == ("dense", "local", "local", "dense", "local")
  assert [cfg.window(kind) for kind in cfg.layer_kinds] == [16, 4, 4, 16, 4]
  assert tiny_model_config(local_window=99).window("local") == 16


@pytest.mark.parametrize("fields, message", [
    (dict(attention_pattern="dense,sparse"), "model.attention_pattern="
     "'dense,sparse' must list layer kinds separated by commas"),
    (dict(attention_pattern="dense,local", num_layers=3, scan_layers=True),
     "model.num_layers=3 must be a multiple of the 2 layers"),
    (dict(position="rope", d_model=30, num_heads=2),
     "model.position='rope' rotates pairs of dimensions: head_dim = d_model "
     "/ num_heads = 15 must be even"),
    (dict(value_embeds=2, num_layers=3), "model.value_embeds=2 tables go to "
     "the first and the last 2 layers, more than model.num_layers=3: set at "
     "most 1")])
def test_config_refuses_what_the_layers_cannot_be(fields, message):
  with pytest.raises(ValueError, match=message):
    tiny_model_config(**fields)


# --------------------------------------------------------- rotary positions


def test_rope_scores_depend_on_position_differences_alone():
  """Shifting every position by the same offset leaves the scores of
  rotated queries and keys unchanged (to float round-off); position 0 is
  no rotation, and other differences change the scores."""
  q, k, _ = _qkv(10, 12)
  pos = jnp.array([[0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144]] * 2)
  scores = lambda shift: jnp.einsum(
      "bqhk,bthk->bhqt", rotary(q, pos + shift, 10000.0),
      rotary(k, pos + shift, 10000.0))
  for shift in (1, 37, 500):
    np.testing.assert_allclose(scores(shift), scores(0), rtol=0, atol=5e-5)
  np.testing.assert_allclose(rotary(q, 0 * pos, 10000.0), q, atol=0)
  assert np.abs(scores(0) - jnp.einsum("bqhk,bthk->bhqt", q, k)).max() > 0.1


def test_rope_model_is_shift_invariant():
  """The whole model at positions shifted by 100 (through the cache's
  positions): the same logits, to float round-off."""
  cfg = tiny_model_config(position="rope", attention_pattern="dense,local",
                          local_window=5)
  params = random_params(cfg, seed=11, std=0.3)
  tokens = _tokens(12)
  step = jax.jit(lambda pos: GPT(cfg).apply(
      {"params": params}, tokens, cache=KVCache.empty(cfg, B),
      pos_BxL=pos)[0])
  pos = jnp.tile(jnp.arange(L), (B, 1))
  logits = step(pos)
  np.testing.assert_allclose(logits, _apply(cfg, params, tokens), rtol=0,
                             atol=1e-5)
  np.testing.assert_allclose(step(pos + 100), logits, rtol=0, atol=5e-5)


def test_initial_loss_is_log_vocab():
  cfg = tiny_model_config(vocab_size=65)
  model = GPT(cfg)
  tokens = _tokens(4, (8, L + 1), vocab=65)

  @jax.jit
  def init_and_apply(key):  # the real initializers
    return model.apply(model.init(key, tokens[:1, :-1]), tokens[:, :-1])

  logits = init_and_apply(jax.random.key(3))
  loss = float(objectives.cross_entropy(logits, tokens[:, 1:]).mean())
  assert abs(loss - math.log(65)) < 0.1, loss


PARAM_VARIANTS = {
    "default": {},
    "padded": dict(vocab_multiple=16),
    "padded-untied": dict(vocab_multiple=16, tie_embeddings=False),
    "no-bias": dict(use_bias=False),
    "untied": dict(tie_embeddings=False),
    "untied-no-bias": dict(tie_embeddings=False, use_bias=False),
    "sinusoidal": dict(position="sinusoidal"),
    "scan": dict(scan_layers=True),
    "scan-no-bias-sinusoidal-dff": dict(scan_layers=True, use_bias=False,
                                        position="sinusoidal", d_ff=48),
    "3-layers-4-heads": dict(num_layers=3, num_heads=4, seq_len=24),
    "rope": dict(position="rope"),
    "scan-dense-local": dict(scan_layers=True, attention_pattern="dense,local"),
    "recipe-padded": dict(RECIPE, vocab_multiple=16),
    "recipe-scan-no-bias": dict(RECIPE, scan_layers=True, use_bias=False),
}


@pytest.mark.parametrize("overrides", PARAM_VARIANTS.values(),
                         ids=PARAM_VARIANTS.keys())
def test_num_params_matches_param_tree(overrides):
  """num_params(padded=True) counts the tree; without `padded`, the real
  vocabulary's rows; without embeddings, neither (the same N)."""
  cfg = tiny_model_config(**overrides)
  assert _count(param_shapes(cfg)) == cfg.num_params(padded=True)

  def embedding(vocab):
    n = vocab * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    n += cfg.value_embeds * vocab * cfg.d_model
    n += cfg.seq_len * cfg.d_model if cfg.position == "learned" else 0
    return n + (0 if cfg.tie_embeddings or not cfg.use_bias else vocab)

  n = cfg.num_params(embeddings=False)
  assert n == cfg.num_params(embeddings=False, padded=True)
  assert cfg.num_params() == n + embedding(cfg.vocab_size)
  assert cfg.num_params(padded=True) == n + embedding(cfg.padded_vocab_size)
  assert cfg.padded_vocab_size == (48 if cfg.vocab_multiple == 16 else 37)


def test_flops_per_token_is_6n_whatever_the_vocabulary():
  """6 N D (N non-embedding): the vocabulary, its padding and the context
  do not change the count."""
  cfg = tiny_model_config(vocab_multiple=16)
  n = cfg.num_params(embeddings=False)
  assert cfg.flops_per_token() == 6 * n
  assert tiny_model_config(vocab_size=500, seq_len=64).flops_per_token() == (
      6 * n)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_padded_ids_get_no_probability_and_no_gradient(tied):
  """The logits of the real ids, the loss and its gradients are the
  unpadded model's, however large the padded rows; the padded ids' logits
  are float32's lowest (probability exactly 0) and their rows get no
  gradient."""
  unpadded = tiny_model_config(tie_embeddings=tied)
  padded = tiny_model_config(tie_embeddings=tied, vocab_multiple=16)
  params = random_params(unpadded, seed=6, std=0.3)
  params_padded = jax.tree.map(np.array, resize_vocab(params, 48))
  # Padded rows far larger than the real ones: unmasked, they would win.
  params_padded["Embed_0"]["embedding"][37:] = 10
  if not tied:
    params_padded["lm_head"]["kernel"][:, 37:] = 10
    params_padded["lm_head"]["bias"][37:] = 10
  tokens = np.asarray(_tokens(8, (B, L + 1)))

  def loss(model, params):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return objectives.cross_entropy(logits, tokens[:, 1:]).mean(), logits

  grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True),
                 static_argnums=0)
  (want_loss, want), want_grads = grad(GPT(unpadded), params)
  (got_loss, got), got_grads = grad(GPT(padded), params_padded)
  assert got.shape == (B, L, 48)
  np.testing.assert_allclose(got[..., :37], want, rtol=0, atol=1e-5)
  assert (got[..., 37:] == np.finfo(np.float32).min).all()
  # Different programs (37 and 48 columns): to round-off, with room (1e-5
  # is twenty float32 steps of this loss of ~5).
  assert abs(float(got_loss) - float(want_loss)) < 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0,
                                                      atol=1e-6),
               resize_vocab(got_grads, 37), want_grads)
  assert not np.any(got_grads["Embed_0"]["embedding"][37:])
  if not tied:
    assert not np.any(got_grads["lm_head"]["kernel"][:, 37:])


def test_gpt2_small_closed_form_is_124m():
  cfg = GPTConfig(vocab_size=50257, num_layers=12, d_model=768, num_heads=12,
                  seq_len=1024)
  assert cfg.num_params() == 124_439_808


def test_gpt2_small_config_param_count():
  path = os.path.join(REPO, "configs", "gpt2_small.py")
  spec = importlib.util.spec_from_file_location("gpt2_small", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.data.tokenizer == "byte"
  cfg = config_lib.model_config(config, vocab_size=256)
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.seq_len,
          cfg.vocab_size, cfg.padded_vocab_size) == (12, 768, 12, 1024,
                                                     50257, 50304)
  assert cfg.num_params() == 124_439_808
  assert _count(param_shapes(cfg)) == cfg.num_params(padded=True) == (
      124_439_808 + 47 * 768)


def test_heads_must_divide_the_width():
  """The config's other rules are trainer.config.RULES (test_config_rules)."""
  with pytest.raises(ValueError, match="d_model=30 is not divisible by "
                     "model.num_heads=4"):
    tiny_model_config(d_model=30, num_heads=4)


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_parameters_use_the_logical_axes_mesh_rules_may_name(scan):
  """model.LOGICAL_AXES is what config checks mesh.rules against; the
  recipe's norms name theirs (queries' and keys' gains: head_dim)."""
  import flax.linen as nn
  from configs import base
  from model.config import LOGICAL_AXES
  from trainer import sharding
  cfg = tiny_model_config(scan_layers=scan, **RECIPE)
  boxed = jax.eval_shape(GPT(cfg).init, jax.random.key(0),
                         jnp.zeros((1, cfg.seq_len), jnp.int32))
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x:
                          isinstance(x, jax.sharding.PartitionSpec))
  names = {name for spec in specs for name in spec if name}
  assert names <= set(LOGICAL_AXES)
  assert ("layers" in names) == scan and "embed" in names
  attention = nn.get_partition_spec(boxed)["params"][
      "blocks" if scan else "block_0"]["Attention_0"]
  for norm in ("q_norm", "k_norm"):
    assert tuple(attention[norm]["scale"]) == (
        ("layers", "head_dim") if scan else ("head_dim",))
  # The default rules split the value embeddings as the token table.
  rules = sharding.logical_rules(base.get_config().mesh)
  specs = nn.get_partition_spec(boxed)["params"]
  assert (nn.logical_to_mesh_axes(specs["value_embeds"], rules) ==
          jax.sharding.PartitionSpec(None, "tensor", "fsdp"))
  assert nn.logical_to_mesh_axes(specs["Embed_0"]["embedding"], rules) == (
      jax.sharding.PartitionSpec("tensor", "fsdp"))


def test_padding_trains_as_the_unpadded_model():
  """The default padding (37 ids to 128) changes no loss: the real rows'
  initial values are the unpadded table's (JAX's partitionable threefry
  draws each element by its index), and the padded ones are never used."""
  batch = np.asarray(_tokens(9, (4, L + 1)))
  runs = {}
  for multiple in (1, 128):
    config = tiny_config(steps=3)
    config.model.update(num_layers=1, vocab_multiple=multiple)
    runs[multiple] = train_steps(config, [batch] * 3)
  (want, want_norms, want_state), (got, got_norms, got_state) = runs.values()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_norms, want_norms, rtol=1e-5)
  assert got_state.params["Embed_0"]["embedding"].shape == (128, 32)
  np.testing.assert_allclose(
      resize_vocab(got_state.params, 37)["Embed_0"]["embedding"],
      want_state.params["Embed_0"]["embedding"], rtol=0, atol=1e-6)


# --------------------------------------------------------------- golden

def _golden():
  from fixtures import make_golden_logits
  return make_golden_logits, np.load(make_golden_logits.OUT)


GOLDEN_PATHS = {  # equivalent implementations of the same forward pass
    "default": {}, "attention_chunks=3": dict(attention_chunks=3),
    "xla-attention": dict(attention="xla"), "scan": dict(scan_layers=True),
    "remat-full": dict(remat="full"), "kv-cache": None}


@pytest.mark.parametrize("name", ["gpt2", "untied-sinusoidal-nobias"])
@pytest.mark.parametrize("path", GOLDEN_PATHS.values(), ids=GOLDEN_PATHS)
def test_forward_matches_golden_logits(name, path):
  """The committed logits of tests/fixtures/make_golden_logits.py's fixed
  parameters and tokens, to 1e-6, the padded ids' masked. Equivalent
  implementations differ by <= 2.1e-7 (measured, on logits up to 0.96);
  the MLP before attention, a missing residual or the two LayerNorms
  swapped moved them by 0.23 or more, the erf GELU for GPT-2's tanh one by
  8e-5. A deliberate change of the model regenerates them (see there)."""
  import dataclasses
  golden, want = _golden()
  cfg = golden.CONFIGS[name]
  tokens = want["tokens"]
  if path is None:  # the prefill of the sampler's cache
    cfg_path = cfg
    with jax.default_matmul_precision("highest"):
      got, _ = jax.jit(lambda params: GPT(cfg).apply(
          {"params": params}, tokens, cache=KVCache.empty(cfg, 2),
          pos_BxL=np.broadcast_to(np.arange(L), tokens.shape)))(
              golden.params(cfg))
  else:
    cfg_path = dataclasses.replace(cfg, **path)
    got = golden.logits(cfg_path, tokens)
  np.testing.assert_allclose(got, want[name], rtol=0, atol=1e-6)
  assert cfg_path.padded_vocab_size == 48 > cfg.vocab_size == 37


def test_golden_parameters_reveal_a_swapped_layer_norm():
  """The golden parameters make every LayerNorm and bias count: the two
  LayerNorms of a block swapped move the logits far past the tolerance."""
  golden, want = _golden()
  cfg = golden.CONFIGS["gpt2"]
  params = golden.params(cfg)
  block = params["block_1"]
  block["LayerNorm_0"], block["LayerNorm_1"] = (block["LayerNorm_1"],
                                                block["LayerNorm_0"])
  got = golden.logits(cfg, want["tokens"], params)
  assert np.abs(got - want["gpt2"]).max() > 1e-3


def test_tiny_model_overfits_one_batch():
  config = tiny_config()  # 150 steps, peak learning rate 1e-2
  batch = np.asarray(_tokens(5, (4, L + 1)))
  losses, _, state = train_steps(config, [batch] * config.train.steps)
  assert int(state.step) == 150
  assert abs(losses[0] - math.log(37)) < 0.1
  assert losses[-1] < 0.5, losses[::10]
