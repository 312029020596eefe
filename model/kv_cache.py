"""The KV cache of generation: per place of the attention pattern, a ring
holding its layers' keys and values (KVRing), all in one KVCache that the
GPT's modules read and write (Z layers, W cache slots, other names as in
model/gpt.py)."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import GPTConfig

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

  def claim(self, pos_BxL, first, fresh: bool, span: int):
    """Columns [first, first + L) for tokens at positions pos_BxL, and which
    keys those attend to (mask_Bx1xLxT, over the keys `update` returns):
    those at their position and the W - 1 before it."""
    L, W = pos_BxL.shape[1], self.pos_BxW.shape[1]
    slots_M, skip = self._slots(first, L)
    pos_BxW = nn.with_logical_constraint(
        self.pos_BxW.at[:, slots_M].set(pos_BxL[:, skip:]),
        ("batch", "length"))
    if L == 1:
      key_pos_BxT = pos_BxW[:, :span]
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

  def update(self, layer, k_BxLxHxK, v_BxLxHxK, first, fresh: bool,
             span: int):
    """The ring with layer `layer`'s keys and values of columns [first,
    first + L) written, and the keys and values those attend to.

    One token (decoding) writes its slot first and reads the ring's first
    `span` slots, which then hold its whole band: XLA writes the slot in
    place. A longer step
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
        return ring_ZxBxWxHxK, ring_ZxBxWxHxK[layer, :, :span]
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
  # Static: a decoding step reads only the first `span` slots of each ring
  # (None: all), enough while the columns written, its own included, fit
  # (`spanning`): it skips the work of slots not yet written.
  span: int | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def empty(cls, cfg: GPTConfig, batch: int) -> "KVCache":
    return cls(tuple(KVRing.empty(cfg, place, batch)
                     for place in range(len(cfg.pattern))),
               jnp.zeros((), jnp.int32))

  def claim(self, pos_BxL):
    """The next L columns for tokens at positions pos_BxL (-1: padding), and
    per ring the mask of the keys they attend to (`KVRing.claim`)."""
    claimed = [ring.claim(pos_BxL, self.length, self.fresh, self.span)
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
        layer, k_BxLxHxK, v_BxLxHxK, first, self.fresh, self.span)
    rings = self.rings[:place] + (ring,) + self.rings[place + 1:]
    return self.replace(rings=rings), k_BxTxHxK, v_BxTxHxK

  def spanning(self, columns: int, seq_len: int) -> "KVCache":
    """The cache for a decoding step after which it holds `columns` columns
    (a host-side count): its span is the power of two from 64 up that
    covers them, so that few spans (each a compiled step) cover a context,
    none reading more than twice the slots written; past seq_len, all. A
    ring's first `columns` slots hold them until it rolls over, and then a
    span of W or more reads the whole ring."""
    span = max(64, 1 << (columns - 1).bit_length())
    return self.replace(span=None if span >= seq_len else span)

  def written(self) -> "KVCache":
    """The cache once a step has written it (GPT's call returns this)."""
    return self.replace(fresh=False)

  def next_pos(self):
    """pos_Bx1: each row's position after its newest token (which every
    ring holds)."""
    return jnp.max(self.rings[0].pos_BxW, axis=1, keepdims=True) + 1
