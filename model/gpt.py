"""A decoder-only GPT in flax.linen: a pure function of a parameter pytree.

Tensor names carry their shapes: B batch, L length, N = B * L tokens,
D d_model, H heads, K head dim, F MLP width, V the padded vocabulary, Q and
T the query and key positions of an attention block. Every parameter and
the main activations carry logical axis names; `trainer.sharding` maps them
to mesh axes.

Attention layers follow `attention_pattern`: "dense" ones see the whole
context, "local" ones (GPT-3's banded layers) the last `local_window` keys.
Cached generation calls the same modules with a `KVCache` (Z layers, W cache
slots): only attention's key/value source differs from training.
"""

import dataclasses
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
POSITIONS = ("learned", "sinusoidal", "rope")
LAYER_KINDS = ("dense", "local")
PARAMETRIZATIONS = ("standard", "mup")
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
  rope_base: float = 10000.0  # position="rope": base of the frequencies
  tie_embeddings: bool = True
  use_bias: bool = True
  dropout: float = 0.0
  scan_layers: bool = False
  remat: str = "none"  # a key of REMAT_POLICIES
  dtype: str = "float32"  # compute dtype (DTYPES); parameters: param_dtype
  param_dtype: str = "float32"
  attention: str = "einsum"  # one of ATTENTIONS
  attention_chunks: int = 2  # query blocks of the einsum attention
  # Layer kinds, comma-separated, repeated over the layers in order:
  # "dense,local" alternates them, starting with a dense layer.
  attention_pattern: str = "dense"
  local_window: int = 256  # keys a local layer's query sees, its own included
  vocab_multiple: int = 1  # pad the vocabulary to a multiple of this
  parametrization: str = "standard"  # one of PARAMETRIZATIONS
  mup_base_width: int = 96  # muP: the d_model at which it equals standard
  mup_base_heads: int = 0  # muP: the base model's heads (0: num_heads)

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(
          f"model.d_model={self.d_model} is not divisible by "
          f"model.num_heads={self.num_heads}; pick heads that divide it")
    if not set(self.pattern) <= set(LAYER_KINDS):
      raise ValueError(
          f"model.attention_pattern={self.attention_pattern!r} must list "
          f"layer kinds separated by commas, each one of {list(LAYER_KINDS)}"
          " (e.g. 'dense,local')")
    if self.scan_layers and self.num_layers % len(self.pattern):
      raise ValueError(
          f"model.num_layers={self.num_layers} must be a multiple of the "
          f"{len(self.pattern)} layers of model.attention_pattern="
          f"{self.attention_pattern!r} with model.scan_layers=True (it scans "
          "over repeats of the pattern)")
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(
          f"model.position='rope' rotates pairs of dimensions: head_dim = "
          f"d_model / num_heads = {self.head_dim} must be even")
    if self.vocab_multiple < 1:
      raise ValueError(f"model.vocab_multiple={self.vocab_multiple} must be "
                       ">= 1 (1: no padding)")
    if self.dropout and self.attention != "einsum":
      raise ValueError(
          f"model.dropout={self.dropout} drops attention probabilities too, "
          f"which model.attention={self.attention!r} "
          "(jax.nn.dot_product_attention) cannot: use model.attention="
          "'einsum' or model.dropout=0")
    if self.parametrization == "mup":
      self._check_mup()

  def _check_mup(self):
    """muP scales every hidden width with d_model, the heads' size among
    them: the MLP's width is 4 * d_model and the heads stay those of the
    base model (attention_mult assumes head_dim grows with the width)."""
    if self.d_ff:
      raise ValueError(
          "model.parametrization='mup' scales the MLP with d_model: set "
          f"model.d_ff=0 (4 * d_model), not {self.d_ff}")
    if self.mup_base_heads and self.mup_base_heads != self.num_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} differs from muP's base model's "
          f"model.mup_base_heads={self.mup_base_heads}: muP's attention "
          "scale keeps the heads fixed as the width grows (head_dim grows "
          f"with it); set model.num_heads={self.mup_base_heads}")
    if self.mup_base_width < 1 or self.mup_base_width % self.num_heads:
      raise ValueError(
          f"model.mup_base_width={self.mup_base_width} must be a positive "
          f"multiple of model.num_heads={self.num_heads}: muP's base model "
          "is this one at d_model = mup_base_width, with the same heads")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return self.d_ff or 4 * self.d_model

  # muP (Tensor Programs V): the model at d_model = mup_base_width is the
  # standard one, bit for bit; wider (or narrower) ones scale as below, and
  # trainer.optim scales the hidden weights' Adam updates by 1 / width_mult.
  @property
  def width_mult(self) -> float:
    """d_model / mup_base_width under muP; 1 under the standard
    parametrization."""
    if self.parametrization == "mup":
      return self.d_model / self.mup_base_width
    return 1.0

  @property
  def hidden_init_scale(self) -> float:
    """Multiplies the init std of the hidden (width x width) weights: their
    variance goes as 1 / fan_in under muP."""
    return math.sqrt(1 / self.width_mult)

  @property
  def attention_mult(self) -> float:
    """Multiplies the queries, on top of attention's 1 / sqrt(head_dim):
    sqrt(base head_dim / head_dim) under muP, so that q.k is divided by
    head_dim (times sqrt(the base model's head_dim): 1 / sqrt(head_dim) at
    the base width)."""
    return math.sqrt(1 / self.width_mult)

  @property
  def attention_scale(self) -> float:
    """What q.k is multiplied by in all: 1 / sqrt(head_dim) (standard); muP's
    sqrt(base head_dim) / head_dim."""
    return 1.0 / math.sqrt(self.head_dim) * self.attention_mult

  @property
  def output_mult(self) -> float:
    """Multiplies the readout's input (the tied embedding or lm_head): muP's
    1 / width_mult keeps the logits' updates independent of the width."""
    return 1 / self.width_mult

  @property
  def pattern(self) -> tuple[str, ...]:
    return tuple(kind.strip() for kind in self.attention_pattern.split(","))

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """Each layer's kind: the pattern repeated over the layers."""
    return tuple(self.pattern[i % len(self.pattern)]
                 for i in range(self.num_layers))

  def window(self, kind: str) -> int:
    """Keys a query of a `kind` layer sees: its own and the window - 1
    before it. A dense layer's is the context, so that a sequence longer
    than that (sampling with rotary positions) keeps each layer within the
    context it was trained on."""
    if kind == "dense":
      return self.seq_len
    return min(self.local_window, self.seq_len)

  @property
  def cache_rolls(self) -> bool:
    """Whether a cached key stays valid once older tokens leave the window:
    true of rotary positions (relative), not of absolute ones."""
    return self.position == "rope"

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

  def flops_per_token(self) -> float:
    """Training FLOPs per token in the project's one convention, C = 6 N D
    (Kaplan et al., 2020): N the non-embedding parameters, each costing 2
    FLOPs per token forward and 4 backward. It leaves out the attention
    score and value matmuls (PaLM adds 12 * layers * d_model * context) and
    the output layer (6 * d_model * vocabulary), so MFU against it is lower
    than PaLM's by their share (docs/model.md, "FLOPs").
    """
    return 6 * self.num_params(embeddings=False)


CACHE_AXES = ("layers", "batch", "length", "heads", "head_dim")


@flax.struct.dataclass
class KVRing:
  """The keys and values of the layers at place j of a pattern of P kinds
  (layers j, j + P, j + 2P...) for the last W columns of the batch, W their
  kind's window: column c in slot c % W. pos_BxW: each slot's position (-1:
  free, or left padding)."""
  k_ZxBxWxHxK: jax.Array
  v_ZxBxWxHxK: jax.Array
  pos_BxW: jax.Array

  @classmethod
  def empty(cls, cfg: GPTConfig, place: int, batch: int) -> "KVRing":
    layers = len(range(place, cfg.num_layers, len(cfg.pattern)))
    W = cfg.window(cfg.pattern[place])
    shape = (layers, batch, W, cfg.num_heads, cfg.head_dim)
    zeros = lambda: nn.with_logical_constraint(jnp.zeros(shape, cfg.dtype),
                                               CACHE_AXES)
    pos_BxW = nn.with_logical_constraint(
        jnp.full((batch, W), -1, jnp.int32), ("batch", "length"))
    return cls(zeros(), zeros(), pos_BxW)

  def _slots(self, first, L: int):
    """The slots of the last min(L, W) of columns [first, first + L): the
    ring keeps no more, and the step attends to its own keys directly."""
    W = self.pos_BxW.shape[1]
    M = min(L, W)
    return (first + L - M + jnp.arange(M)) % W, L - M

  def claim(self, pos_BxL, first, fresh: bool):
    """Columns [first, first + L) for tokens at positions pos_BxL, and which
    keys those attend to (mask_Bx1xLxT, over the keys `update` returns):
    those at their position and the W - 1 before it."""
    L, W = pos_BxL.shape[1], self.pos_BxW.shape[1]
    slots_M, skip = self._slots(first, L)
    pos_BxW = nn.with_logical_constraint(
        self.pos_BxW.at[:, slots_M].set(pos_BxL[:, skip:]),
        ("batch", "length"))
    if L == 1:
      key_pos_BxT = pos_BxW
    elif fresh:
      key_pos_BxT = pos_BxL
    else:
      key_pos_BxT = jnp.concatenate([self.pos_BxW, pos_BxL], axis=1)
    key_pos_Bx1x1xT = key_pos_BxT[:, None, None, :]
    query_pos_Bx1xLx1 = pos_BxL[:, None, :, None]
    mask_Bx1xLxT = ((key_pos_Bx1x1xT >= 0) &
                    (key_pos_Bx1x1xT <= query_pos_Bx1xLx1) &
                    (key_pos_Bx1x1xT > query_pos_Bx1xLx1 - W))
    return self.replace(pos_BxW=pos_BxW), mask_Bx1xLxT

  def update(self, layer, k_BxLxHxK, v_BxLxHxK, first, fresh: bool):
    """The ring with layer `layer`'s keys and values of columns [first,
    first + L) written, and the keys and values those attend to.

    One token (decoding) writes its slot first and reads the ring, which
    then holds its whole band: XLA writes the slot in place. A longer step
    may overwrite keys its first tokens need, and its slots may wrap around:
    it attends to its own keys, after those of the ring before its write
    unless the cache is `fresh` (a prefill), and scatters its last W. (Per
    decoding step, a scatter cost ~8% of cached decoding's speed, a read
    before the write ~7%; the ring's keys in a prefill 1.5x its time.)"""
    L = k_BxLxHxK.shape[1]
    slots_M, skip = self._slots(first, L)

    def update(ring_ZxBxWxHxK, new_BxLxHxK):
      new_BxLxHxK = new_BxLxHxK.astype(ring_ZxBxWxHxK.dtype)
      constrain = lambda x: nn.with_logical_constraint(x, CACHE_AXES)
      if L == 1:
        ring_ZxBxWxHxK = constrain(jax.lax.dynamic_update_slice(
            ring_ZxBxWxHxK, new_BxLxHxK[None], (layer, 0, slots_M[0], 0, 0)))
        return ring_ZxBxWxHxK, ring_ZxBxWxHxK[layer]
      seen_BxTxHxK = new_BxLxHxK if fresh else jnp.concatenate(
          [ring_ZxBxWxHxK[layer], new_BxLxHxK], axis=1)
      # (layer, slots) index the ring apart: the update is [M, B, H, K].
      return constrain(ring_ZxBxWxHxK.at[layer, :, slots_M].set(
          jnp.swapaxes(new_BxLxHxK[:, skip:], 0, 1))), seen_BxTxHxK

    k_ZxBxWxHxK, k_BxTxHxK = update(self.k_ZxBxWxHxK, k_BxLxHxK)
    v_ZxBxWxHxK, v_BxTxHxK = update(self.v_ZxBxWxHxK, v_BxLxHxK)
    return (self.replace(k_ZxBxWxHxK=k_ZxBxWxHxK, v_ZxBxWxHxK=v_ZxBxWxHxK),
            k_BxTxHxK, v_BxTxHxK)


@flax.struct.dataclass
class KVCache:
  """The keys and values of every layer for the last tokens seen.

  A step claims the next L columns, the same in every row, for its tokens
  and their positions (`claim`); each layer then attends to its ring's keys
  and the step's own, and writes the step's into its ring (`update`).
  Attention masks by positions alone (-1: free, or left padding), so a ring
  keeps only its layers' window (seq_len slots for a dense layer,
  local_window for a local one) and rolls over once the columns outgrow
  it. Sharded like training: the batch over the data axes, the heads over
  tensor.
  """
  rings: tuple[KVRing, ...]  # one per place in the attention pattern
  length: jax.Array  # columns claimed
  # Static: no step has written the cache yet, so a step reads no ring.
  fresh: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def empty(cls, cfg: GPTConfig, batch: int) -> "KVCache":
    return cls(tuple(KVRing.empty(cfg, place, batch)
                     for place in range(len(cfg.pattern))),
               jnp.zeros((), jnp.int32))

  def claim(self, pos_BxL):
    """The next L columns for tokens at positions pos_BxL (-1: padding), and
    per ring the mask of the keys they attend to (`KVRing.claim`)."""
    claimed = [ring.claim(pos_BxL, self.length, self.fresh)
               for ring in self.rings]
    return (self.replace(rings=tuple(ring for ring, _ in claimed),
                         length=self.length + pos_BxL.shape[1]),
            tuple(mask for _, mask in claimed))

  def update(self, place: int, layer, k_BxLxHxK, v_BxLxHxK):
    """Ring `place`'s layer `layer` updated with the keys and values of the
    columns claimed last, and the keys and values those attend to
    (`KVRing.update`)."""
    first = self.length - k_BxLxHxK.shape[1]
    ring, k_BxTxHxK, v_BxTxHxK = self.rings[place].update(
        layer, k_BxLxHxK, v_BxLxHxK, first, self.fresh)
    rings = self.rings[:place] + (ring,) + self.rings[place + 1:]
    return self.replace(rings=rings), k_BxTxHxK, v_BxTxHxK

  def written(self) -> "KVCache":
    """The cache once a step has written it (GPT's call returns this)."""
    return self.replace(fresh=False)

  def next_pos(self):
    """pos_Bx1: each row's position after its newest token (which every
    ring holds)."""
    return jnp.max(self.rings[0].pos_BxW, axis=1, keepdims=True) + 1


def _dense_init(scale: float = 1.0):
  return nn.initializers.normal(stddev=0.02 * scale)


def sinusoidal_positions(seq_len: int, d_model: int) -> jax.Array:
  """The fixed encoding of Vaswani et al. (2017), shape [L, D]."""
  pos_L1 = jnp.arange(seq_len, dtype=jnp.float32)[:, None]
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d_model, 2) / d_model)
  pe_LD = jnp.zeros((seq_len, d_model), jnp.float32)
  pe_LD = pe_LD.at[:, 0::2].set(jnp.sin(pos_L1 * freq))
  return pe_LD.at[:, 1::2].set(jnp.cos(pos_L1 * freq[: d_model // 2]))


def rotary(x_BxLxHxK, pos_BxL, base: float):
  """Rotary positions (Su et al. 2021) in the half-split form of GPT-NeoX
  and LLaMA: dimension i < K/2 and dimension i + K/2 form a pair, rotated by
  the angle pos * base^(-2i/K). The dot product of a rotated query and key
  then depends on their positions through the difference alone."""
  K = x_BxLxHxK.shape[-1]
  freq_K2 = base ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
  angle_BxLx1xK2 = pos_BxL[:, :, None, None].astype(jnp.float32) * freq_K2
  cos_BxLx1xK2, sin_BxLx1xK2 = jnp.cos(angle_BxLx1xK2), jnp.sin(angle_BxLx1xK2)
  x1_BxLxHxK2, x2_BxLxHxK2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, -1)
  return jnp.concatenate(
      [x1_BxLxHxK2 * cos_BxLx1xK2 - x2_BxLxHxK2 * sin_BxLx1xK2,
       x2_BxLxHxK2 * cos_BxLx1xK2 + x1_BxLxHxK2 * sin_BxLx1xK2],
      axis=-1).astype(x_BxLxHxK.dtype)


def einsum_f32(spec: str, a, b):
  """jnp.einsum(spec, a, b) in float32: of bfloat16 operands, their products
  summed and returned in float32 (as GPU and TPU matmul units do), not
  rounded back to bfloat16. Its backward pass is that of a bfloat16 einsum
  whose result is cast to float32 (the cotangent rounded to bfloat16), so
  the gradient's matmuls stay in bfloat16. Of float32 operands, the plain
  einsum."""
  if a.dtype == b.dtype == jnp.float32:
    return jnp.einsum(spec, a, b)
  return _einsum_f32(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(spec: str, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_forward(spec: str, a, b):
  return _einsum_f32(spec, a, b), (a, b)


def _einsum_f32_backward(spec: str, operands, g):
  a, b = operands
  g = g.astype(jnp.result_type(a, b))
  transpose = lambda f, x: jax.linear_transpose(f, x)(g)[0]
  return (transpose(lambda a: jnp.einsum(spec, a, b), a),
          transpose(lambda b: jnp.einsum(spec, a, b), b))


_einsum_f32.defvjp(_einsum_f32_forward, _einsum_f32_backward)


def attend(q_BxQxHxK, k_BxTxHxK, v_BxTxHxK, mask, dropout=lambda p: p):
  """Softmax attention of scaled queries; `mask` broadcasts to [B, H, Q, T];
  `dropout` applies to the probabilities. B may be several dimensions. The
  scores and the softmax are float32 whatever the compute dtype."""
  att_BxHxQxT = einsum_f32("...qhk,...thk->...hqt", q_BxQxHxK, k_BxTxHxK)
  att_BxHxQxT = jnp.where(mask, att_BxHxQxT, jnp.finfo(jnp.float32).min)
  probs_BxHxQxT = jax.nn.softmax(att_BxHxQxT, axis=-1).astype(v_BxTxHxK.dtype)
  return jnp.einsum("...hqt,...thk->...qhk", dropout(probs_BxHxQxT),
                    v_BxTxHxK)


def causal_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, chunks: int,
                     dropout=lambda p: p, mask_Bx1xLxL=None):
  """Causal softmax attention, in `chunks` blocks of queries (and within
  `mask_Bx1xLxL` if given).

  Block [lo, hi) scores only keys [0, hi): the keys after it are masked for
  all its queries, so skipping them is exact and saves part of the masked
  upper triangle (a quarter of the score and value matmuls with 2 blocks).
  """
  L = q_BxLxHxK.shape[1]
  q_BxLxHxK = q_BxLxHxK * (1.0 / math.sqrt(q_BxLxHxK.shape[-1]))
  chunks = min(chunks, L)
  bounds = [L * i // chunks for i in range(chunks + 1)]
  out = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    mask = causal_QxT = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]
    if mask_Bx1xLxL is not None:
      mask = causal_QxT & mask_Bx1xLxL[:, :, lo:hi, :hi]
    out.append(attend(q_BxLxHxK[:, lo:hi], k_BxLxHxK[:, :hi],
                      v_BxLxHxK[:, :hi], mask, dropout))
  return jnp.concatenate(out, axis=1)


def band_mask(L: int, window: int) -> np.ndarray:
  """[L, L]: query i sees keys i - window + 1 to i."""
  query_Lx1, key_1xL = np.arange(L)[:, None], np.arange(L)[None]
  return (key_1xL <= query_Lx1) & (key_1xL > query_Lx1 - window)


def banded_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, window: int,
                     dropout=lambda p: p):
  """Causal attention in which a query sees its own key and the window - 1
  before it, computed in blocks: query block i (positions [i W, i W + W),
  W = window) scores key blocks i - 1 and i alone, the two that hold its
  queries' bands. 2 L W scores instead of L^2; L padded to a multiple of W.
  """
  B, L, H, K = q_BxLxHxK.shape
  W, G = window, -(-L // window)  # G blocks
  pad = lambda x, before: jnp.pad(
      x, ((0, 0), (before, G * W - L), (0, 0), (0, 0)))
  q_BxGxWxHxK = pad(q_BxLxHxK, 0).reshape(B, G, W, H, K) * (1.0 /
                                                            math.sqrt(K))

  def pairs(x_BxLxHxK):
    """Key block i - 1 then key block i, for each i (a zero block before 0)."""
    blocks_BxGxWxHxK = pad(x_BxLxHxK, W).reshape(B, G + 1, W, H, K)
    return jnp.concatenate([blocks_BxGxWxHxK[:, :-1], blocks_BxGxWxHxK[:, 1:]],
                           axis=2)

  query_pos_Gx1xWx1 = np.arange(G * W).reshape(G, 1, W, 1)
  key_pos_Gx1x1x2W = ((np.arange(G) - 1) * W)[:, None, None, None] + np.arange(
      2 * W)
  band_Gx1xWx2W = ((key_pos_Gx1x1x2W >= 0) &
                   (key_pos_Gx1x1x2W <= query_pos_Gx1xWx1) &
                   (key_pos_Gx1x1x2W > query_pos_Gx1xWx1 - W))
  out_BxGxWxHxK = attend(q_BxGxWxHxK, pairs(k_BxLxHxK), pairs(v_BxLxHxK),
                         band_Gx1xWx2W, dropout)
  return out_BxGxWxHxK.reshape(B, G * W, H, K)[:, :L]


def _layer_norm(cfg: GPTConfig, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=1e-5, use_bias=cfg.use_bias, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Attention(nn.Module):
  """The attention of a layer at place `place` of the attention pattern."""
  cfg: GPTConfig
  place: int = 0

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool, pos_BxL, cache=None,
               layer=None, mask_Bx1xLxT=None):
    """Tokens at positions pos_BxL. With a `cache`, they also attend to the
    keys and values of their ring's layer `layer` under `mask_Bx1xLxT`, and
    theirs go into it; returns the output and the cache. Without one,
    `mask_Bx1xLxT` (if given: packed sequences' segments) narrows the causal
    (or banded) mask further."""
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
    elif cfg.attention == "einsum" and L <= window:
      out_BxLxHxK = causal_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK,
                                     cfg.attention_chunks, dropout,
                                     mask_Bx1xLxT)
    elif cfg.attention == "einsum" and mask_Bx1xLxT is None:
      out_BxLxHxK = banded_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, window,
                                     dropout)
    elif cfg.attention == "einsum":  # banded within segments: every score
      out_BxLxHxK = attend(q_BxLxHxK * (1.0 / math.sqrt(K)), k_BxLxHxK,
                           v_BxLxHxK, mask_Bx1xLxT & band_mask(L, window),
                           dropout)
    else:
      out_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_Bx1xLxT, is_causal=True,
          local_window_size=(window - 1, 0) if L > window else None,
          implementation=cfg.attention)
    out_BxLxHxK = nn.with_logical_constraint(
        out_BxLxHxK, ("batch", "length", "heads", "head_dim"))
    # GPT-2 scales the residual projections by 1/sqrt(2 * layers) at init.
    w_HxKxD = param("out_kernel", (H, K, D), ("heads", "head_dim", "embed"),
                    _dense_init(cfg.hidden_init_scale /
                                math.sqrt(2 * cfg.num_layers)))
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
    h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)  # GPT-2's tanh GELU
    y_NxD = dense(D, ("mlp", "embed"), _dense_init(
        cfg.hidden_init_scale / math.sqrt(2 * cfg.num_layers)))(
                      h_BxLxF.reshape(B * L, -1))
    return y_NxD.reshape(B, L, D)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)),
  at place `place` of the attention pattern.

  Carries (x, cache): with a KVCache, attention updates its ring's layer
  `layer` (one cache through all layers, so that XLA updates it in place);
  `masks` holds each ring's."""
  cfg: GPTConfig
  place: int = 0

  @nn.compact
  def __call__(self, carry, deterministic: bool, layer=None, masks=None,
               pos_BxL=None):
    x_BxLxD, cache = carry
    drop = nn.Dropout(self.cfg.dropout)
    y_BxLxD, cache = Attention(self.cfg, self.place)(
        _layer_norm(self.cfg)(x_BxLxD), deterministic, pos_BxL, cache, layer,
        None if masks is None else masks[self.place])
    x_BxLxD = x_BxLxD + drop(y_BxLxD, deterministic)
    x_BxLxD = x_BxLxD + drop(MLP(self.cfg)(_layer_norm(self.cfg)(x_BxLxD)),
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
               pos_BxL=None):
    for place in range(len(self.cfg.pattern)):
      carry, _ = Block(self.cfg, place, name=f"block_{place}")(
          carry, deterministic, layer, masks, pos_BxL)
    return carry, None


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

    places = len(cfg.pattern)
    repeats = masks = None
    if cache is not None:
      cache, masks = cache.claim(pos_BxL)
      repeats = jnp.arange(cfg.num_layers // places)
    elif segment_ids is not None:
      same_segment_Bx1xLxL = (segment_ids[:, None, :, None] ==
                              segment_ids[:, None, None, :])
      masks = (same_segment_Bx1xLxL,) * places
    if cfg.scan_layers:
      # A pattern of one kind scans its blocks; a longer one, its repeats.
      (x_BxLxD, cache), _ = nn.scan(
          _remat(cfg, Block if places == 1 else Pattern),
          variable_axes={"params": 0}, split_rngs={"params": True,
                                                   "dropout": True},
          in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast),
          length=cfg.num_layers // places,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="blocks")((x_BxLxD, cache), deterministic, repeats, masks,
                            pos_BxL)
    else:
      for i in range(cfg.num_layers):
        layer = None if cache is None else i // places  # in its ring
        (x_BxLxD, cache), _ = _remat(cfg, Block)(cfg, i % places,
                                                 name=f"block_{i}")(
            (x_BxLxD, cache), deterministic, layer, masks, pos_BxL)

    x_BxLxD = _layer_norm(cfg, name="ln_f")(x_BxLxD)
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
          kernel_init=nn.with_logical_partitioning(_dense_init(),
                                                   ("embed", "vocab")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                 ("vocab",)))(x_BxLxD)
    logits_BxLxV = nn.with_logical_constraint(
        logits_BxLxV, ("batch", "length", "vocab"))
    if cfg.padded_vocab_size > cfg.vocab_size:  # no probability, no gradient
      real_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
      logits_BxLxV = jnp.where(real_V, logits_BxLxV,
                               jnp.finfo(jnp.float32).min)
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, cache.written()


def _readout(x_BxLxD, kernel_DxV, dimension_numbers, precision=None):
  """nn.Dense's product for the untied readout (x's last axis with the
  kernel's first), summed in float32."""
  del dimension_numbers, precision
  return einsum_f32("bld,dv->blv", x_BxLxD, kernel_DxV)


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
