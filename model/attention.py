"""Attention's kernels: softmax attention under a mask, causal in blocks of
queries, banded in blocks of keys, or jax.nn.dot_product_attention's (XLA,
cuDNN); rotary positions; the einsum summed in float32.

Tensor names as in model/gpt.py: B batch, L length, H heads, K head dim, Q
and T the query and key positions of an attention block.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


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


def self_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, implementation: str,
                   window: int, chunks: int, dropout=lambda p: p,
                   mask_Bx1xLxL=None):
  """Attention of L tokens to their own keys, by `implementation` (one of
  model.config.ATTENTIONS): each query sees its own key and the window - 1
  before it, within `mask_Bx1xLxL` (packed sequences' segments) if given.
  "einsum" is this module's kernels (causal in `chunks` query blocks while L
  fits the window, else banded); "xla" and "cudnn" are
  jax.nn.dot_product_attention's."""
  L, K = q_BxLxHxK.shape[1], q_BxLxHxK.shape[-1]
  if implementation == "einsum" and L <= window:
    return causal_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, chunks, dropout,
                            mask_Bx1xLxL)
  if implementation == "einsum" and mask_Bx1xLxL is None:
    return banded_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, window, dropout)
  if implementation == "einsum":  # banded within segments: every score
    return attend(q_BxLxHxK * (1.0 / math.sqrt(K)), k_BxLxHxK, v_BxLxHxK,
                  mask_Bx1xLxL & band_mask(L, window), dropout)
  return jax.nn.dot_product_attention(
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_Bx1xLxL, is_causal=True,
      local_window_size=(window - 1, 0) if L > window else None,
      implementation=implementation)
