"""A decoder-only GPT in flax.linen: a pure function of a parameter pytree.

Tensor names carry their shapes: B batch, L length, N = B * L tokens,
D d_model, H heads, K head dim, F MLP width, V the padded vocabulary, Q and
T the query and key positions of an attention block. Every parameter and
the main activations carry logical axis names; `trainer.sharding` maps them
to mesh axes.

Cached generation calls the same modules with a `KVCache` (Z layers, S cache
slots): only attention's key/value source differs from training.
"""

import dataclasses
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
POSITIONS = ("learned", "sinusoidal")
ATTENTIONS = ("einsum", "xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
# Every logical axis name the arrays below carry: mesh.rules maps these.
LOGICAL_AXES = ("batch", "length", "embed", "heads", "head_dim", "mlp",
                "vocab", "layers")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """The architecture. A run's values are checked by the rules in
  trainer/config.py; the class itself refuses only sizes that would make
  its derived ones (head_dim) wrong."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  seq_len: int
  d_ff: int = 0  # 0 means 4 * d_model
  position: str = "learned"  # one of POSITIONS
  tie_embeddings: bool = True
  use_bias: bool = True
  dropout: float = 0.0
  scan_layers: bool = False
  remat: str = "none"  # a key of REMAT_POLICIES
  dtype: str = "float32"  # compute dtype (DTYPES); parameters: param_dtype
  param_dtype: str = "float32"
  attention: str = "einsum"  # one of ATTENTIONS
  attention_chunks: int = 2  # query blocks of the einsum attention
  vocab_multiple: int = 1  # pad the vocabulary to a multiple of this

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(
          f"model.d_model={self.d_model} is not divisible by "
          f"model.num_heads={self.num_heads}; pick heads that divide it")
    if self.vocab_multiple < 1:
      raise ValueError(f"model.vocab_multiple={self.vocab_multiple} must be "
                       ">= 1 (1: no padding)")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def padded_vocab_size(self) -> int:
    """The rows of the embedding and the columns of the output layer: the
    vocabulary rounded up to a multiple of vocab_multiple, so that tensor
    parallelism can split it evenly. The padded ids' logits are masked."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  def num_params(self, embeddings: bool = True, padded: bool = False) -> int:
    """Closed-form parameter count of this architecture: the real
    vocabulary's embedding (and output layer, if untied), or with `padded`
    the padded one, as the param tree holds it. Without `embeddings`, no
    vocabulary or position table: the N of scaling laws, the same padded or
    not."""
    d, f, b = self.d_model, self.mlp_dim, int(self.use_bias)
    v = self.padded_vocab_size if padded else self.vocab_size
    attn = d * 3 * d + 3 * d * b + d * d + d * b
    mlp = d * f + f * b + f * d + d * b
    norms = 2 * d * (1 + b)
    block = attn + mlp + norms
    n = self.num_layers * block + d * (1 + b)  # blocks + final norm
    if embeddings:
      n += v * d
      n += self.seq_len * d if self.position == "learned" else 0
      n += 0 if self.tie_embeddings else d * v + b * v
    return n

  def flops_per_token(self, padded: bool = False) -> float:
    """Training FLOPs per token: 6 N + 12 * layers * d_model * seq_len.

    N counts the non-embedding parameters plus the output projection (a
    matmul with the vocabulary every token pays, tied or not): over the real
    vocabulary, the model's FLOPs (MFU does not rise by padding), or with
    `padded` over the padded one, which the step computes. The second term
    is the attention score and value matmuls (PaLM's convention, counted
    over the full, unmasked context).
    """
    v = self.padded_vocab_size if padded else self.vocab_size
    n = self.num_params(embeddings=False) + self.d_model * v
    return 6 * n + 12 * self.num_layers * self.d_model * self.seq_len


CACHE_AXES = ("layers", "batch", "length", "heads", "head_dim")


@flax.struct.dataclass
class KVCache:
  """The keys and values of every layer for the tokens seen so far.

  A step claims the next slots, the same in every row, for its tokens and
  their positions (`claim`); each layer then writes its keys and values
  there and attends to all slots (`write`). Attention masks by the slots'
  positions alone (-1: free, or left padding), so a cache that fills slots
  in another order (a rolling one) or a layer that sees only a band of them
  changes `claim` or `mask`, nothing else. Sharded like training: the batch
  over the data axes, the heads over tensor.
  """
  k_ZxBxSxHxK: jax.Array
  v_ZxBxSxHxK: jax.Array
  pos_BxS: jax.Array
  length: jax.Array  # slots claimed

  @classmethod
  def empty(cls, cfg: GPTConfig, batch: int) -> "KVCache":
    shape = (cfg.num_layers, batch, cfg.seq_len, cfg.num_heads, cfg.head_dim)
    zeros = lambda: nn.with_logical_constraint(jnp.zeros(shape, cfg.dtype),
                                               CACHE_AXES)
    pos_BxS = nn.with_logical_constraint(
        jnp.full((batch, cfg.seq_len), -1, jnp.int32), ("batch", "length"))
    return cls(zeros(), zeros(), pos_BxS, jnp.zeros((), jnp.int32))

  def claim(self, pos_BxL) -> "KVCache":
    """The next L slots (they must be free) for tokens at positions pos_BxL."""
    return self.replace(
        pos_BxS=jax.lax.dynamic_update_slice(self.pos_BxS, pos_BxL,
                                             (0, self.length)),
        length=self.length + pos_BxL.shape[1])

  def mask(self, pos_BxL):
    """Which slots the tokens at positions pos_BxL (claimed) attend to: those
    at their position or before; none for padding (-1)."""
    key_pos_Bx1x1xS = self.pos_BxS[:, None, None, :]
    return (key_pos_Bx1x1xS >= 0) & (key_pos_Bx1x1xS <=
                                     pos_BxL[:, None, :, None])

  def write(self, layer, k_BxLxHxK, v_BxLxHxK) -> "KVCache":
    """Layer `layer`'s keys and values of the tokens in the slots claimed
    last. Attention reads them back from the cache, after this write: a read
    before it would keep the old cache alive and cost XLA a copy of it."""
    at = (layer, 0, self.length - k_BxLxHxK.shape[1], 0, 0)
    write = lambda old, new: nn.with_logical_constraint(
        jax.lax.dynamic_update_slice(old, new[None].astype(old.dtype), at),
        CACHE_AXES)
    return self.replace(k_ZxBxSxHxK=write(self.k_ZxBxSxHxK, k_BxLxHxK),
                        v_ZxBxSxHxK=write(self.v_ZxBxSxHxK, v_BxLxHxK))


def _dense_init(scale: float = 1.0):
  return nn.initializers.normal(stddev=0.02 * scale)


def sinusoidal_positions(seq_len: int, d_model: int) -> jax.Array:
  """The fixed encoding of Vaswani et al. (2017), shape [L, D]."""
  pos_L1 = jnp.arange(seq_len, dtype=jnp.float32)[:, None]
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d_model, 2) / d_model)
  pe_LD = jnp.zeros((seq_len, d_model), jnp.float32)
  pe_LD = pe_LD.at[:, 0::2].set(jnp.sin(pos_L1 * freq))
  return pe_LD.at[:, 1::2].set(jnp.cos(pos_L1 * freq[: d_model // 2]))


def _layer_norm(cfg: GPTConfig, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=1e-5, use_bias=cfg.use_bias, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Attention(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool, cache=None, layer=None,
               mask_Bx1xLxS=None):
    """With a `cache`, the tokens' keys and values go into its slots for
    `layer` and the tokens attend to its slots under `mask_Bx1xLxS`; returns
    the output and the cache. Without one, `mask_Bx1xLxS` (if given)
    narrows causal attention further (packed sequences' segments)."""
    cfg = self.cfg
    B, L, D = x_BxLxD.shape
    H, K = cfg.num_heads, cfg.head_dim
    param = lambda name, shape, names, init: self.param(
        name, nn.with_logical_partitioning(init, names), shape,
        cfg.param_dtype).astype(cfg.dtype)
    zeros = nn.initializers.zeros
    w_Dx3xHxK = param("qkv_kernel", (D, 3, H, K),
                      ("embed", None, "heads", "head_dim"), _dense_init())
    # Projections contract over flattened tokens (N = B * L): one contracting
    # dimension in the weight gradients, which XLA:CPU runs much faster.
    qkv_Nx3xHxK = jnp.einsum("nd,dshk->nshk", x_BxLxD.reshape(B * L, D),
                             w_Dx3xHxK)
    if cfg.use_bias:
      qkv_Nx3xHxK += param("qkv_bias", (3, H, K), (None, "heads", "head_dim"),
                           zeros)
    qkv_BxLx3xHxK = qkv_Nx3xHxK.reshape(B, L, 3, H, K)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
    if cache is not None:
      cache = cache.write(layer, k_BxLxHxK, v_BxLxHxK)
      out_BxLxHxK = self._attend(
          q_BxLxHxK * (1.0 / math.sqrt(K)), cache.k_ZxBxSxHxK[layer],
          cache.v_ZxBxSxHxK[layer], mask_Bx1xLxS, deterministic)
    elif cfg.attention == "einsum":
      out_BxLxHxK = self._einsum_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK,
                                           deterministic, mask_Bx1xLxS)
    else:
      out_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_Bx1xLxS, is_causal=True,
          implementation=cfg.attention)
    out_BxLxHxK = nn.with_logical_constraint(
        out_BxLxHxK, ("batch", "length", "heads", "head_dim"))
    # GPT-2 scales the residual projections by 1/sqrt(2 * layers) at init.
    w_HxKxD = param("out_kernel", (H, K, D), ("heads", "head_dim", "embed"),
                    _dense_init(1 / math.sqrt(2 * cfg.num_layers)))
    y_NxD = jnp.einsum("nhk,hkd->nd", out_BxLxHxK.reshape(B * L, H, K),
                       w_HxKxD)
    if cfg.use_bias:
      y_NxD += param("out_bias", (D,), ("embed",), zeros)
    return y_NxD.reshape(B, L, D), cache

  def _einsum_attention(self, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, deterministic,
                        mask_Bx1xLxL=None):
    """Causal softmax attention, in `cfg.attention_chunks` blocks of queries
    (and within `mask_Bx1xLxL` if given).

    Block [lo, hi) scores only keys [0, hi): the keys after it are masked for
    all its queries, so skipping them is exact and saves part of the masked
    upper triangle (a quarter of the score and value matmuls with 2 blocks).
    """
    L = q_BxLxHxK.shape[1]
    q_BxLxHxK = q_BxLxHxK * (1.0 / math.sqrt(q_BxLxHxK.shape[-1]))
    chunks = min(self.cfg.attention_chunks, L)
    bounds = [L * i // chunks for i in range(chunks + 1)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      mask = causal_QxT = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]
      if mask_Bx1xLxL is not None:
        mask = causal_QxT & mask_Bx1xLxL[:, :, lo:hi, :hi]
      out.append(self._attend(q_BxLxHxK[:, lo:hi], k_BxLxHxK[:, :hi],
                              v_BxLxHxK[:, :hi], mask, deterministic))
    return jnp.concatenate(out, axis=1)

  def _attend(self, q_BxQxHxK, k_BxTxHxK, v_BxTxHxK, mask, deterministic):
    """Softmax attention of scaled queries; `mask` broadcasts to
    [B, H, Q, T]."""
    att_BxHxQxT = jnp.einsum("bqhk,bthk->bhqt", q_BxQxHxK, k_BxTxHxK)
    att_BxHxQxT = jnp.where(mask, att_BxHxQxT.astype(jnp.float32),
                            jnp.finfo(jnp.float32).min)
    probs_BxHxQxT = jax.nn.softmax(att_BxHxQxT, axis=-1).astype(
        v_BxTxHxK.dtype)
    probs_BxHxQxT = nn.Dropout(self.cfg.dropout)(probs_BxHxQxT, deterministic)
    return jnp.einsum("bhqt,bthk->bqhk", probs_BxHxQxT, v_BxTxHxK)


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
    h_NxF = dense(cfg.mlp_dim, ("embed", "mlp"), _dense_init())(
        x_BxLxD.reshape(B * L, D))
    h_BxLxF = nn.with_logical_constraint(h_NxF.reshape(B, L, -1),
                                         ("batch", "length", "mlp"))
    h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)  # GPT-2's tanh GELU
    y_NxD = dense(D, ("mlp", "embed"),
                  _dense_init(1 / math.sqrt(2 * cfg.num_layers)))(
                      h_BxLxF.reshape(B * L, -1))
    return y_NxD.reshape(B, L, D)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

  Carries (x, cache): with a KVCache, attention writes and reads its slots
  for `layer` (one cache through all layers, so that XLA updates it in
  place)."""
  cfg: GPTConfig

  @nn.compact
  def __call__(self, carry, deterministic: bool, layer=None,
               mask_Bx1xLxS=None):
    x_BxLxD, cache = carry
    drop = nn.Dropout(self.cfg.dropout)
    y_BxLxD, cache = Attention(self.cfg)(
        _layer_norm(self.cfg)(x_BxLxD), deterministic, cache, layer,
        mask_Bx1xLxS)
    x_BxLxD = x_BxLxD + drop(y_BxLxD, deterministic)
    x_BxLxD = x_BxLxD + drop(MLP(self.cfg)(_layer_norm(self.cfg)(x_BxLxD)),
                             deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    return (x_BxLxD, cache), None


class GPT(nn.Module):
  """tokens [B, L] int -> logits [B, L, V] float32, V the padded vocabulary:
  the logits of the padded ids are float32's lowest, so that every softmax,
  loss and sampler sees exactly the real vocabulary's distribution.

  With a `cache`, the tokens (at positions `pos_BxL`, -1 for padding) attend
  to it as well, and the call returns (logits, the cache with them added).

  Without one, `segment_ids` [B, L] keeps several sequences packed in a row
  apart: a token attends only to earlier tokens of its own segment; give
  `pos_BxL` (positions restarting at 0 with each segment) too, and each
  sequence's logits are those it would have alone.
  """
  cfg: GPTConfig

  @nn.compact
  def __call__(self, tokens_BxL, deterministic: bool = True,
               cache: KVCache | None = None, pos_BxL=None, segment_ids=None):
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
    if cfg.position == "learned":
      positions_SxD = self.param(
          "wpe", nn.with_logical_partitioning(_dense_init(0.5), (None, "embed")),
          (cfg.seq_len, cfg.d_model), cfg.param_dtype)
    else:
      positions_SxD = sinusoidal_positions(cfg.seq_len, cfg.d_model)
    if pos_BxL is None:
      x_BxLxD = x_BxLxD + positions_SxD[:L].astype(cfg.dtype)
    else:
      x_BxLxD = x_BxLxD + jnp.take(positions_SxD, jnp.maximum(pos_BxL, 0),
                                   axis=0).astype(cfg.dtype)
    x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat],
                       static_argnums=(2,))
    layers = mask_Bx1xLxS = None
    if cache is not None:
      cache = cache.claim(pos_BxL)
      mask_Bx1xLxS = cache.mask(pos_BxL)
      layers = jnp.arange(cfg.num_layers)
    elif segment_ids is not None:
      mask_Bx1xLxS = (segment_ids[:, None, :, None] ==
                      segment_ids[:, None, None, :])
    if cfg.scan_layers:
      (x_BxLxD, cache), _ = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True,
                                                          "dropout": True},
          in_axes=(nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="blocks")((x_BxLxD, cache), deterministic, layers,
                            mask_Bx1xLxS)
    else:
      for i in range(cfg.num_layers):
        (x_BxLxD, cache), _ = block(cfg, name=f"block_{i}")(
            (x_BxLxD, cache), deterministic, None if cache is None else i,
            mask_Bx1xLxS)

    x_BxLxD = _layer_norm(cfg, name="ln_f")(x_BxLxD)
    if cfg.tie_embeddings:
      logits_BxLxV = embed.attend(x_BxLxD)
    else:
      logits_BxLxV = nn.Dense(
          cfg.padded_vocab_size, use_bias=cfg.use_bias, dtype=cfg.dtype,
          param_dtype=cfg.param_dtype, name="lm_head",
          kernel_init=nn.with_logical_partitioning(_dense_init(),
                                                   ("embed", "vocab")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                 ("vocab",)))(x_BxLxD)
    logits_BxLxV = nn.with_logical_constraint(
        logits_BxLxV, ("batch", "length", "vocab")).astype(jnp.float32)
    if cfg.padded_vocab_size > cfg.vocab_size:  # no probability, no gradient
      real_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
      logits_BxLxV = jnp.where(real_V, logits_BxLxV,
                               jnp.finfo(jnp.float32).min)
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, cache


# The parameters with a vocabulary axis, by path, and that axis.
VOCAB_AXIS = {("Embed_0", "embedding"): 0, ("lm_head", "kernel"): 1,
              ("lm_head", "bias"): 0}


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
