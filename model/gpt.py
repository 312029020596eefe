"""A decoder-only GPT in flax.linen: a pure function of a parameter pytree.

Tensor names carry their shapes: B batch, L length, N = B * L tokens,
D d_model, H heads, K head dim, F MLP width, V the padded vocabulary, Q and
T the query and key positions of an attention block. Every parameter and
the main activations carry logical axis names; `trainer.sharding` maps them
to mesh axes.

Attention layers follow `attention_pattern`: "dense" ones see the whole
context, "local" ones (GPT-3's banded layers) the last `local_window` keys.
Cached generation calls the same modules with a `KVCache` (Z layers, W cache
slots): only attention's key/value source differs from training. The
architecture is model/config.py's GPTConfig, attention's kernels are in
model/attention.py, the cache in model/kv_cache.py.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import attend, einsum_f32, rotary, self_attention
from model.config import ACTIVATIONS, GPTConfig, REMAT_POLICIES
from model.kv_cache import KVCache


def _dense_init(scale: float = 1.0):
  return nn.initializers.normal(stddev=0.02 * scale)


def sinusoidal_positions(seq_len: int, d_model: int) -> jax.Array:
  """The fixed encoding of Vaswani et al. (2017), shape [L, D]."""
  pos_L1 = jnp.arange(seq_len, dtype=jnp.float32)[:, None]
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d_model, 2) / d_model)
  pe_LD = jnp.zeros((seq_len, d_model), jnp.float32)
  pe_LD = pe_LD.at[:, 0::2].set(jnp.sin(pos_L1 * freq))
  return pe_LD.at[:, 1::2].set(jnp.cos(pos_L1 * freq[: d_model // 2]))


def _rms_norm(cfg: GPTConfig, axis: str, name: str | None = None):
  """RMSNorm over the last axis (logical name `axis`): a gain, no bias,
  LayerNorm's epsilon."""
  return nn.RMSNorm(
      epsilon=1e-5, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis,)))


def _norm(cfg: GPTConfig, name: str | None = None) -> nn.Module:
  """The norm of cfg.norm over d_model: GPT-2's LayerNorm, or RMSNorm."""
  if cfg.norm == "rmsnorm":
    return _rms_norm(cfg, "embed", name)
  return nn.LayerNorm(
      epsilon=1e-5, use_bias=cfg.use_bias, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def _projection_init(cfg: GPTConfig):
  """The init of the residual projections (attention's and the MLP's
  output): GPT-2 scales them by 1/sqrt(2 * layers); zero_init_proj starts
  them at zero, so that each block starts as the identity."""
  if cfg.zero_init_proj:
    return nn.initializers.zeros
  return _dense_init(cfg.hidden_init_scale / math.sqrt(2 * cfg.num_layers))


class Attention(nn.Module):
  """The attention of a layer at place `place` of the attention pattern."""
  cfg: GPTConfig
  place: int = 0

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool, pos_BxL, cache=None,
               layer=None, mask_Bx1xLxT=None, value_embed_BxLxD=None):
    """Tokens at positions pos_BxL. With a `cache`, they also attend to the
    keys and values of their ring's layer `layer` under `mask_Bx1xLxT`, and
    theirs go into it; returns the output and the cache. Without one,
    `mask_Bx1xLxT` (if given: packed sequences' segments) narrows the causal
    (or banded) mask further. `value_embed_BxLxD`, if given, is added to the
    values (before the cache stores them)."""
    cfg = self.cfg
    B, L, D = x_BxLxD.shape
    H, K = cfg.num_heads, cfg.head_dim
    param = lambda name, shape, names, init: self.param(
        name, nn.with_logical_partitioning(init, names), shape,
        cfg.param_dtype).astype(cfg.dtype)
    zeros = nn.initializers.zeros
    w_Dx3xHxK = param("qkv_kernel", (D, 3, H, K),
                      ("embed", None, "heads", "head_dim"),
                      _dense_init(cfg.hidden_init_scale))
    # Projections contract over flattened tokens (N = B * L): one contracting
    # dimension in the weight gradients, which XLA:CPU runs much faster.
    qkv_Nx3xHxK = jnp.einsum("nd,dshk->nshk", x_BxLxD.reshape(B * L, D),
                             w_Dx3xHxK)
    if cfg.use_bias:
      qkv_Nx3xHxK += param("qkv_bias", (3, H, K), (None, "heads", "head_dim"),
                           zeros)
    qkv_BxLx3xHxK = qkv_Nx3xHxK.reshape(B, L, 3, H, K)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
    if value_embed_BxLxD is not None:
      v_BxLxHxK = v_BxLxHxK + value_embed_BxLxD.reshape(B, L, H, K)
    if cfg.qk_norm:  # before rotary positions and the cache
      q_BxLxHxK = _rms_norm(cfg, "head_dim", "q_norm")(q_BxLxHxK)
      k_BxLxHxK = _rms_norm(cfg, "head_dim", "k_norm")(k_BxLxHxK)
    if cfg.position == "rope":
      q_BxLxHxK = rotary(q_BxLxHxK, pos_BxL, cfg.rope_base)
      k_BxLxHxK = rotary(k_BxLxHxK, pos_BxL, cfg.rope_base)
    # muP: q.k / head_dim, from this and every path's 1 / sqrt(head_dim).
    if cfg.attention_mult != 1:
      q_BxLxHxK = q_BxLxHxK * cfg.attention_mult
    dropout = lambda probs: nn.Dropout(cfg.dropout)(probs, deterministic)
    window = cfg.window(cfg.pattern[self.place])
    if cache is not None:
      cache, k_BxTxHxK, v_BxTxHxK = cache.update(self.place, layer, k_BxLxHxK,
                                                 v_BxLxHxK)
      out_BxLxHxK = attend(q_BxLxHxK * (1.0 / math.sqrt(K)), k_BxTxHxK,
                           v_BxTxHxK, mask_Bx1xLxT, dropout)
    else:
      out_BxLxHxK = self_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK,
                                   cfg.attention, window,
                                   cfg.attention_chunks, dropout, mask_Bx1xLxT)
    out_BxLxHxK = nn.with_logical_constraint(
        out_BxLxHxK, ("batch", "length", "heads", "head_dim"))
    w_HxKxD = param("out_kernel", (H, K, D), ("heads", "head_dim", "embed"),
                    _projection_init(cfg))
    y_NxD = jnp.einsum("nhk,hkd->nd", out_BxLxHxK.reshape(B * L, H, K),
                       w_HxKxD)
    if cfg.use_bias:
      y_NxD += param("out_bias", (D,), ("embed",), zeros)
    return y_NxD.reshape(B, L, D), cache


class MLP(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    dense = lambda features, names, init: nn.Dense(
        features, use_bias=cfg.use_bias, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))
    B, L, D = x_BxLxD.shape
    # On flattened tokens, as in Attention: one contracting dimension.
    h_NxF = dense(cfg.mlp_dim, ("embed", "mlp"),
                  _dense_init(cfg.hidden_init_scale))(
        x_BxLxD.reshape(B * L, D))
    h_BxLxF = nn.with_logical_constraint(h_NxF.reshape(B, L, -1),
                                         ("batch", "length", "mlp"))
    h_BxLxF = ACTIVATIONS[cfg.activation](h_BxLxF)
    y_NxD = dense(D, ("mlp", "embed"), _projection_init(cfg))(
        h_BxLxF.reshape(B * L, -1))
    return y_NxD.reshape(B, L, D)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)),
  at place `place` of the attention pattern.

  Carries (x, cache): with a KVCache, attention updates its ring's layer
  `layer` (one cache through all layers, so that XLA updates it in place);
  `masks` holds each ring's. With value embeddings, `table` picks this
  layer's (_layer_value_embed)."""
  cfg: GPTConfig
  place: int = 0

  @nn.compact
  def __call__(self, carry, deterministic: bool, layer=None, masks=None,
               pos_BxL=None, value_embeds_ExBxLxD=None, table=None):
    x_BxLxD, cache = carry
    drop = nn.Dropout(self.cfg.dropout)
    y_BxLxD, cache = Attention(self.cfg, self.place)(
        _norm(self.cfg)(x_BxLxD), deterministic, pos_BxL, cache, layer,
        None if masks is None else masks[self.place],
        _layer_value_embed(value_embeds_ExBxLxD, table))
    x_BxLxD = x_BxLxD + drop(y_BxLxD, deterministic)
    x_BxLxD = x_BxLxD + drop(MLP(self.cfg)(_norm(self.cfg)(x_BxLxD)),
                             deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    return (x_BxLxD, cache), None


class Pattern(nn.Module):
  """One repeat of the attention pattern, a block per place: what
  scan_layers scans over when the pattern has several places, so that each
  place keeps its kind, its parameters stacked over the repeats. Called like
  Block; `layer` is the repeat, each place's layer in its ring.

  Remat applies to the whole repeat, not to each block in it: the scan then
  saves one input per repeat. (GPT-3 XL, "dense,local", full remat: 12.8 GiB
  per device in launch.memory's plan, against 14.2 with each block
  rematerialized, the same recomputation.)"""
  cfg: GPTConfig

  @nn.compact
  def __call__(self, carry, deterministic: bool, layer=None, masks=None,
               pos_BxL=None, value_embeds_ExBxLxD=None, tables=None):
    for place in range(len(self.cfg.pattern)):
      carry, _ = Block(self.cfg, place, name=f"block_{place}")(
          carry, deterministic, layer, masks, pos_BxL, value_embeds_ExBxLxD,
          None if tables is None else tables[place])
    return carry, None


def _layer_value_embed(value_embeds_ExBxLxD, table):
  """The lookup in value-embedding table `table` (a layer's: -1 for none),
  or None without value embeddings. Under nn.scan (or remat) `table` is
  traced: the lookup of table 0 then, zeroed where `table` is -1."""
  if value_embeds_ExBxLxD is None:
    return None
  if isinstance(table, int):
    return None if table < 0 else value_embeds_ExBxLxD[table]
  return jnp.where(table >= 0, value_embeds_ExBxLxD[jnp.maximum(table, 0)],
                   0)


def _remat(cfg: GPTConfig, module):
  """Block or Pattern, rematerialized as cfg.remat says."""
  if cfg.remat == "none":
    return module
  return nn.remat(module, policy=REMAT_POLICIES[cfg.remat],
                  static_argnums=(2,))


class GPT(nn.Module):
  """tokens [B, L] int -> logits [B, L, V] float32, V the padded vocabulary:
  the logits of the padded ids are float32's lowest, so that every softmax,
  loss and sampler sees exactly the real vocabulary's distribution.

  With a `cache`, the tokens (at positions `pos_BxL`, -1 for padding) attend
  to it as well, and the call returns (logits, the cache with them added).
  Without one, the tokens are at positions 0..L-1, or `pos_BxL` if given;
  L may exceed seq_len only with rotary positions, each layer still
  attending to its window (sampling past the context: model.sampling).
  `segment_ids` [B, L] keeps several sequences packed in a row apart: a
  token attends only to earlier tokens of its own segment; with `pos_BxL`
  restarting at 0 with each segment, each sequence's logits are those it
  would have alone (packed fine-tuning examples, trainer.objectives).
  """
  cfg: GPTConfig

  @nn.compact
  def __call__(self, tokens_BxL, deterministic: bool = True,
               cache: KVCache | None = None, pos_BxL=None, segment_ids=None):
    embed, x_BxLxD, pos_BxL = self._embed(tokens_BxL, deterministic, cache,
                                          pos_BxL)
    x_BxLxD, cache = self._blocks(x_BxLxD, deterministic, cache, pos_BxL,
                                  segment_ids, self._value_embeds(tokens_BxL))
    logits_BxLxV = self._logits(x_BxLxD, embed)
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, cache.written()

  def _embed(self, tokens_BxL, deterministic: bool, cache, pos_BxL):
    """The token embedding (returned for a tied readout), the input of the
    first block, and the tokens' positions (0..L-1 unless given)."""
    cfg = self.cfg
    L = tokens_BxL.shape[1]
    embed = nn.Embed(
        cfg.padded_vocab_size, cfg.d_model, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(_dense_init(),
                                                    ("vocab", "embed")))
    # Look up in the table gathered over its embed shards (FSDP's per-use
    # gather): a lookup in the sharded table would come out sharded over
    # embed, and moving that to the batch sharding costs a full copy.
    table_VxD = nn.with_logical_constraint(embed.embedding, ("vocab", None))
    x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(cfg.dtype)
    packed_positions = cache is None and pos_BxL is not None
    if cache is None and pos_BxL is None:
      pos_BxL = jnp.arange(L)[None]
    if cfg.position != "rope":  # rotary positions apply in attention
      if cfg.position == "learned":
        positions_SxD = self.param(
            "wpe", nn.with_logical_partitioning(_dense_init(0.5),
                                                (None, "embed")),
            (cfg.seq_len, cfg.d_model), cfg.param_dtype)
      else:
        positions_SxD = sinusoidal_positions(cfg.seq_len, cfg.d_model)
      if cache is None and not packed_positions:
        x_BxLxD = x_BxLxD + positions_SxD[:L].astype(cfg.dtype)
      else:
        x_BxLxD = x_BxLxD + jnp.take(positions_SxD, jnp.maximum(pos_BxL, 0),
                                     axis=0).astype(cfg.dtype)
    x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    return embed, x_BxLxD, pos_BxL

  def _value_embeds(self, tokens_BxL):
    """The lookups of the tokens in the value_embeds tables, [E, B, L, D]
    (modded-nanogpt's value embeddings), or None without them."""
    cfg = self.cfg
    if not cfg.value_embeds:
      return None
    tables_ExVxD = self.param(
        "value_embeds", nn.with_logical_partitioning(
            _dense_init(), (None, "vocab", "embed")),
        (cfg.value_embeds, cfg.padded_vocab_size, cfg.d_model),
        cfg.param_dtype)
    # Gathered over embed first, as the token table (_embed).
    tables_ExVxD = nn.with_logical_constraint(tables_ExVxD,
                                              (None, "vocab", None))
    return jnp.take(tables_ExVxD, tokens_BxL, axis=1).astype(cfg.dtype)

  def _blocks(self, x_BxLxD, deterministic: bool, cache, pos_BxL,
              segment_ids, value_embeds_ExBxLxD):
    """The blocks over x_BxLxD: scanned or one by one, with the cache's
    masks or those of the segments and the value embeddings' lookups;
    returns their output and the cache."""
    cfg = self.cfg
    places = len(cfg.pattern)
    repeats = masks = tables = None
    if cache is not None:
      cache, masks = cache.claim(pos_BxL)
      repeats = jnp.arange(cfg.num_layers // places)
    elif segment_ids is not None:
      same_segment_Bx1xLxL = (segment_ids[:, None, :, None] ==
                              segment_ids[:, None, None, :])
      masks = (same_segment_Bx1xLxL,) * places
    if value_embeds_ExBxLxD is not None:
      tables = cfg.value_embed_tables
    if cfg.scan_layers:
      if tables is not None:  # per repeat, per place of the pattern
        tables = jnp.array(tables).reshape(-1, places)
        tables = tables if places > 1 else tables[:, 0]
      # A pattern of one kind scans its blocks; a longer one, its repeats.
      (x_BxLxD, cache), _ = nn.scan(
          _remat(cfg, Block if places == 1 else Pattern),
          variable_axes={"params": 0}, split_rngs={"params": True,
                                                   "dropout": True},
          in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast, nn.broadcast,
                   0),
          length=cfg.num_layers // places,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="blocks")((x_BxLxD, cache), deterministic, repeats, masks,
                            pos_BxL, value_embeds_ExBxLxD, tables)
    else:
      for i in range(cfg.num_layers):
        layer = None if cache is None else i // places  # in its ring
        (x_BxLxD, cache), _ = _remat(cfg, Block)(cfg, i % places,
                                                 name=f"block_{i}")(
            (x_BxLxD, cache), deterministic, layer, masks, pos_BxL,
            value_embeds_ExBxLxD, None if tables is None else tables[i])
    return x_BxLxD, cache

  def _logits(self, x_BxLxD, embed: nn.Embed):
    """The final norm and the readout: logits [B, L, V], float32, soft-capped
    if cfg.logit_softcap, the padded ids' at float32's lowest."""
    cfg = self.cfg
    x_BxLxD = _norm(cfg, name="ln_f")(x_BxLxD)
    if cfg.output_mult != 1:  # muP away from its base width
      x_BxLxD = x_BxLxD * cfg.output_mult
    # The readout sums in float32 (einsum_f32): no logit is rounded to the
    # compute dtype.
    if cfg.tie_embeddings:
      logits_BxLxV = einsum_f32("bld,vd->blv", x_BxLxD,
                                embed.embedding.astype(cfg.dtype))
    else:
      logits_BxLxV = nn.Dense(
          cfg.padded_vocab_size, use_bias=cfg.use_bias, dtype=cfg.dtype,
          param_dtype=cfg.param_dtype, name="lm_head", dot_general=_readout,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.zeros if cfg.zero_init_proj else _dense_init(),
              ("embed", "vocab")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                 ("vocab",)))(x_BxLxD)
    logits_BxLxV = nn.with_logical_constraint(
        logits_BxLxV, ("batch", "length", "vocab"))
    if cfg.logit_softcap:  # Gemma 2's soft cap, on the float32 logits
      c = cfg.logit_softcap
      logits_BxLxV = c * jnp.tanh(logits_BxLxV.astype(jnp.float32) / c)
    if cfg.padded_vocab_size > cfg.vocab_size:  # no probability, no gradient
      real_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
      logits_BxLxV = jnp.where(real_V, logits_BxLxV,
                               jnp.finfo(jnp.float32).min)
    return logits_BxLxV


def _readout(x_BxLxD, kernel_DxV, dimension_numbers, precision=None):
  """nn.Dense's product for the untied readout (x's last axis with the
  kernel's first), summed in float32."""
  del dimension_numbers, precision
  return einsum_f32("bld,dv->blv", x_BxLxD, kernel_DxV)


# The parameters with a vocabulary axis, by path, and that axis.
VOCAB_AXIS = {("Embed_0", "embedding"): 0, ("lm_head", "kernel"): 1,
              ("lm_head", "bias"): 0, ("value_embeds",): 1}


def resize_vocab(params, size: int):
  """`params` with the vocabulary axis cut or zero-padded to `size`: from
  one padding of the same vocabulary to another (the rows of padded ids
  change nothing the model computes)."""
  def resize(path, x):
    axis = VOCAB_AXIS.get(tuple(key.key for key in path))
    if axis is None or x.shape[axis] == size:
      return x
    if x.shape[axis] > size:
      return jax.lax.slice_in_dim(x, 0, size, axis=axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)

  return jax.tree_util.tree_map_with_path(resize, params)
