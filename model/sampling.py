"""Autoregressive sampling: one token at a time, with temperature, top-k, top-p.

The whole generation is one jitted `fori_loop` over a fixed-size token buffer;
each step re-reads the last `seq_len` tokens (no KV cache yet), so prompts and
outputs longer than the context slide the window.
"""

import functools

import jax
import jax.numpy as jnp


def sample_next(logits_BxV, rng, temperature: float, top_k: int = 0,
                top_p: float = 1.0):
  """One token id per row. temperature 0 is greedy (argmax)."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (at least one token).
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    cutoff_Bx1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV,
                                   jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1)


def generate(model, params, prompt_BxP, rng, *, max_new_tokens: int,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0):
  """Returns [B, P + max_new_tokens] ids: the prompt and its continuation."""
  B, P = prompt_BxP.shape
  if P == 0:
    raise ValueError("the prompt must hold at least one token")
  total = P + max_new_tokens
  window = min(model.cfg.seq_len, total)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def run(params, buf_BxT, rng):
    def step(t, carry):
      buf_BxT, rng = carry
      start = jnp.maximum(t - window, 0)
      ctx_BxW = jax.lax.dynamic_slice(buf_BxT, (0, start), (B, window))
      logits_BxWxV = model.apply({"params": params}, ctx_BxW)
      logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxWxV, t - 1 - start,
                                                axis=1, keepdims=False)
      rng, key = jax.random.split(rng)
      next_B = sample_next(logits_BxV, key, temperature, top_k, top_p)
      buf_BxT = jax.lax.dynamic_update_slice(
          buf_BxT, next_B[:, None].astype(buf_BxT.dtype), (0, t))
      return buf_BxT, rng
    return jax.lax.fori_loop(P, total, step, (buf_BxT, rng))[0]

  buf_BxT = jnp.zeros((B, total), jnp.int32).at[:, :P].set(prompt_BxP)
  return run(params, buf_BxT, rng)
