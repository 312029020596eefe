"""The modern recipe (model.norm, qk_norm, activation, zero_init_proj,
logit_softcap, value_embeds): a model with all of it against a float64
reference written out here, the soft cap on the float32 logits with the
padded ids masked, and the zero init. Its parameter counts, cache, scan,
roles, sharding names and export refusals are tested beside GPT-2's (the
RECIPE variants of test_model, test_generate, test_roles, test_hf_gpt2)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import random_params, tiny_model_config
from model import GPT, resize_vocab

# Every field of the recipe away from GPT-2's value, the readout untied (a
# soft cap of 3 is below the largest logits of these models: it acts).
RECIPE = dict(norm="rmsnorm", qk_norm=True, activation="relu2",
              zero_init_proj=True, logit_softcap=3.0, tie_embeddings=False,
              value_embeds=1)


def _rms_norm(x, gain):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * gain


def _block(blk, x, value_embed):
  """A block of the recipe: pre-RMSNorm, queries and keys RMS-normed per
  head, the values plus `value_embed` if given, causal softmax attention,
  a ReLU^2 MLP."""
  att, mlp, L = blk["Attention_0"], blk["MLP_0"], x.shape[1]
  h = _rms_norm(x, blk["RMSNorm_0"]["scale"])
  qkv = np.einsum("bld,dshk->blshk", h, att["qkv_kernel"]) + att["qkv_bias"]
  q = _rms_norm(qkv[:, :, 0], att["q_norm"]["scale"])
  k = _rms_norm(qkv[:, :, 1], att["k_norm"]["scale"])
  v = qkv[:, :, 2]
  if value_embed is not None:
    v = v + value_embed.reshape(v.shape)
  scores = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqt,bthk->bqhk", probs, v)
  x = x + np.einsum("blhk,hkd->bld", out, att["out_kernel"]) + att["out_bias"]
  h = _rms_norm(x, blk["RMSNorm_1"]["scale"])
  h = h @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"]
  return x + np.maximum(h, 0) ** 2 @ mlp["Dense_1"]["kernel"] + (
      mlp["Dense_1"]["bias"])


def _reference(p, tokens, cap):
  """The recipe in float64 numpy, 3 layers: one value-embedding table, whose
  lookup the first and the last layer add to their values, the final
  RMSNorm, the untied head and the soft cap."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = p["Embed_0"]["embedding"][tokens] + p["wpe"][:tokens.shape[1]]
  value_embed = p["value_embeds"][0][tokens]
  for i, table in enumerate((value_embed, None, value_embed)):
    x = _block(p[f"block_{i}"], x, table)
  h = _rms_norm(x, p["ln_f"]["scale"])
  logits = h @ p["lm_head"]["kernel"] + p["lm_head"]["bias"]
  return cap * np.tanh(logits / cap), logits


def test_recipe_model_computes_the_reference():
  """Gains off 1 so that each norm counts. The params of the unpadded
  vocabulary (37 ids) padded to 48 (resize_vocab: the value embeddings too)
  give the same logits, the padded ids' float32's lowest after the cap,
  which acts (uncapped logits exceed it)."""
  cfg = tiny_model_config(num_layers=3, **RECIPE)
  params = random_params(cfg, seed=3, std=0.3)
  rng = np.random.default_rng(4)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (a + rng.normal(0, 0.3, a.shape).astype(np.float32)
                       if path[-1].key == "scale" else a), params)
  tokens = rng.integers(0, 37, (2, cfg.seq_len))
  padded = tiny_model_config(num_layers=3, vocab_multiple=16, **RECIPE)
  logits = np.asarray(jax.jit(GPT(padded).apply)(
      {"params": resize_vocab(params, 48)}, tokens))
  want, uncapped = _reference(params, tokens, cfg.logit_softcap)
  assert np.abs(uncapped[..., :37]).max() > 2 * cfg.logit_softcap
  np.testing.assert_allclose(logits[..., :37], want[..., :37], rtol=0,
                             atol=2e-5)
  assert (logits[..., 37:] == np.finfo(np.float32).min).all()


def test_soft_cap_applies_to_float32_logits_in_bfloat16():
  """The cap's tanh runs on the readout's float32 logits: with bfloat16
  compute, no logit is rounded to bfloat16 after it."""
  cfg = tiny_model_config(dtype="bfloat16", **RECIPE)
  params = random_params(cfg, seed=5, std=0.3)
  tokens = np.random.default_rng(5).integers(0, 37, (2, cfg.seq_len))
  logits = np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, tokens))
  assert logits.dtype == np.float32
  assert np.abs(logits).max() <= cfg.logit_softcap
  as_bf16 = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32)
  assert (as_bf16 != logits).mean() > 0.9


def test_zero_init_proj_starts_the_output_projections_at_zero():
  """Attention's and the MLP's output and the untied head start at 0, the
  other matrices as GPT-2's (whose init test_mup checks)."""
  cfg = tiny_model_config(num_layers=1, **{**RECIPE, "value_embeds": 0})
  params = jax.jit(GPT(cfg).init)(
      jax.random.key(0), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
  params = jax.tree.map(np.asarray, nn.unbox(params))
  block = params["block_0"]
  for zero in (block["Attention_0"]["out_kernel"],
               block["MLP_0"]["Dense_1"]["kernel"],
               params["lm_head"]["kernel"]):
    assert not zero.any()
  for kept in (block["Attention_0"]["qkv_kernel"],
               block["MLP_0"]["Dense_0"]["kernel"],
               params["Embed_0"]["embedding"]):
    assert 0.015 < kept.std() < 0.025
