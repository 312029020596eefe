"""Sampling from a GPT: prefill the prompts in one pass, then one token per
step from a key/value cache, with temperature, top-k and top-p.

Prompts of different lengths are left-padded into one batch, so that every
row writes the same cache slot at each step; padded slots hold position -1
and are masked. The token loop runs in Python around a jitted prefill and a
jitted decode step: the host needs each token anyway (to stream it to a
callback, detokenize it for stop strings and stop finished rows), and it
dispatches step t + 1 before it reads token t, so that this host work
overlaps the device's.

Past the context window `window_start` decides what each token sees. With
learned or sinusoidal absolute positions a cached key is only valid for the
window it was computed in, so the window cannot slide a token at a time:
when the cache is full it restarts on the last half of the context, which is
prefilled again, and the new tokens decode into the freed slots. With seq_len
S that is one prefill of ceil(S / 2) tokens every S - ceil(S / 2) + 1 new
tokens (64 tokens every 65 at S = 128), and each token then sees the last
ceil(S / 2) to S tokens.

Rotary positions are relative: a cached key stays valid, so the cache rolls
instead (each layer's ring keeps its last S keys, a local layer its band),
with no prefill again. Every token, at every layer, then attends to the S
keys up to its own of that layer: the forward of the whole sequence with
each layer's attention cut to the context, which the uncached reference
runs. A token's prediction can so depend on tokens up to layers * (S - 1)
before it, through the keys of earlier tokens, as in sliding-window models
(Mistral's rolling buffer); the logits stay those of a model attending to S
keys per layer, the length it was trained on.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.kv_cache import KVCache


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


def window_start(n: int, seq_len: int, rolls: bool = False) -> int:
  """The context policy: column n of the batch (prompts right-aligned, so
  that every row makes its column n in the same step) is predicted from
  columns [window_start(n), n), less any left padding.

  Up to seq_len columns the window holds them all; then it restarts on the
  last ceil(seq_len / 2) and grows back to seq_len before the next restart.
  A prompt alone, or among prompts of its length, sees exactly that; a
  shorter one restarts with the batch, so past the context its window
  depends on the longest prompt. A cache that `rolls` (GPTConfig.cache_rolls)
  never restarts: the window holds every column, each layer attending to
  the last seq_len. Both samplers follow this function.
  """
  if rolls or n <= seq_len:
    return 0
  keep = (seq_len + 1) // 2
  return n - keep - (n - seq_len - 1) % (seq_len - keep + 1)


def _left_pad(prompts, max_new_tokens: int):
  """The prompts, right-aligned in one [B, P + max_new_tokens] buffer, and
  each row's number of padding columns."""
  rows = [np.asarray(p, np.int32).ravel() for p in prompts]
  if not rows or min(r.size for r in rows) == 0:
    raise ValueError("each prompt must hold at least one token")
  P = max(r.size for r in rows)
  buf_BxN = np.zeros((len(rows), P + max_new_tokens), np.int32)
  pad_B = np.array([P - r.size for r in rows])
  for row, pad, r in zip(buf_BxN, pad_B, rows):
    row[pad:P] = r
  return buf_BxN, pad_B


def _axis_rules() -> tuple:
  """The active logical-axis rules, hashable, to key the jitted steps by: jit
  does not see them, and a trace made under other rules would shard the
  cache wrongly."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in nn.get_logical_axis_rules())


@functools.lru_cache(maxsize=32)
def _jitted_steps(model, sampling: tuple, rules: tuple):
  """The jitted prefill and decode step of a model, sampling settings and
  logical-axis rules (static: a call then hashes none of them)."""

  def prefill(params, tokens_BxL, pos_BxL, rng, n):
    """A fresh cache holding the tokens, and the token after them (column n
    of the buffer, drawn with the key `fold_in(rng, n)`)."""
    with nn.logical_axis_rules(rules):
      logits_BxLxV, cache = model.apply(
          {"params": params}, tokens_BxL, pos_BxL=pos_BxL,
          cache=KVCache.empty(model.cfg, tokens_BxL.shape[0]))
    return sample_next(logits_BxLxV[:, -1], jax.random.fold_in(rng, n),
                       *sampling), cache

  def decode(params, cache, tokens_B, rng, n):
    """The cache with one more token per row, and the token after it."""
    with nn.logical_axis_rules(rules):
      logits_Bx1xV, cache = model.apply(
          {"params": params}, tokens_B[:, None], cache=cache,
          pos_BxL=cache.next_pos())
    return sample_next(logits_Bx1xV[:, -1], jax.random.fold_in(rng, n),
                       *sampling), cache

  return jax.jit(prefill), jax.jit(decode, donate_argnames="cache")


def generate(model, params, prompts, rng, *, max_new_tokens: int,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
             stop_token: int | None = None, stop_strings=(), to_text=None,
             on_token=None) -> list[np.ndarray]:
  """Continues each prompt (a sequence of ids; lengths may differ).

  Returns one array per prompt: the prompt and its continuation, which ends
  after max_new_tokens or with the token that is `stop_token` or completes
  one of `stop_strings` in the continuation's text (`to_text(ids) -> str`).
  Rows that stopped stop growing; the call returns once all have.
  `on_token(tokens_B, growing_B)` is called after every step with each row's
  new token and whether it belongs to the row's continuation. The token in
  column n of the batch (see `window_start`) is drawn with the key
  `fold_in(rng, n)`, as in `generate_uncached`.
  """
  if stop_strings and to_text is None:
    raise ValueError("stop_strings need to_text to detokenize")
  buf_BxN, pad_B = _left_pad(prompts, max_new_tokens)
  B, N = buf_BxN.shape
  P, S = N - max_new_tokens, model.cfg.seq_len
  policy = functools.partial(window_start, seq_len=S,
                             rolls=model.cfg.cache_rolls)
  prefill, decode = _jitted_steps(model, (temperature, top_k, top_p),
                                  _axis_rules())

  def restart(n, window, tokens_BxL):
    """A cache of columns [window, n) (tokens_BxL), and column n."""
    pos_BxL = np.arange(window, n) - np.maximum(pad_B, window)[:, None]
    return prefill(params, tokens_BxL, np.maximum(pos_BxL, -1), rng, n)

  end_B = np.full(B, N)  # one past each row's last column
  window = policy(P)
  if N > P:
    pending_B, cache = restart(P, window, buf_BxN[:, window:P])
  for n in range(P, N):
    # pending_B (still on the device) is column n; dispatch column n + 1.
    if n + 1 < N:
      window, last_window = policy(n + 1), window
      if window == last_window:  # the cache then holds [window, n]
        next_B, cache = decode(params, cache.spanning(n + 1 - window, S),
                               pending_B, rng, n + 1)
      else:
        next_B, cache = restart(n + 1, window, jnp.concatenate(
            [buf_BxN[:, window:n], pending_B[:, None]], axis=1))
    buf_BxN[:, n] = np.asarray(pending_B)
    growing_B = end_B > n
    for b in np.flatnonzero(growing_B):
      text = to_text(buf_BxN[b, P:n + 1]) if stop_strings else ""
      if (buf_BxN[b, n] == stop_token or
          any(stop in text for stop in stop_strings)):
        end_B[b] = n + 1
    if on_token is not None:
      on_token(buf_BxN[:, n].copy(), growing_B)
    if (end_B <= n + 1).all():
      break
    pending_B = next_B
  return [row[pad:end] for row, pad, end in zip(buf_BxN, pad_B, end_B)]


@functools.partial(jax.jit, static_argnames=("model", "sampling", "rules",
                                             "first", "C"))
def _uncached(params, buf_BxN, pad_B, window_N, rng, *, model, sampling,
              rules, first, C):
  """Fills columns [first, N) of the buffer, one full forward of C columns
  (from the window's start, any later ones unseen: causal) per column."""
  # C columns of room on the right, so that no slice is shifted to fit.
  buf_BxN = jnp.pad(buf_BxN, ((0, 0), (0, C)))

  def step(n, buf_BxN):
    begin_B = jnp.maximum(window_N[n], pad_B)
    ctx_BxC = jax.vmap(lambda row, b: jax.lax.dynamic_slice(row, (b,), (C,)))(
        buf_BxN, begin_B)
    with nn.logical_axis_rules(rules):
      logits_BxCxV = model.apply({"params": params}, ctx_BxC)
    logits_BxV = jnp.take_along_axis(
        logits_BxCxV, (n - 1 - begin_B)[:, None, None], axis=1)[:, 0]
    next_B = sample_next(logits_BxV, jax.random.fold_in(rng, n), *sampling)
    return buf_BxN.at[:, n].set(next_B)

  return jax.lax.fori_loop(first, buf_BxN.shape[1] - C, step, buf_BxN)[:, :-C]


def generate_uncached(model, params, prompts, rng, *, max_new_tokens: int,
                      temperature: float = 0.8, top_k: int = 0,
                      top_p: float = 1.0) -> list[np.ndarray]:
  """The reference for `generate` (tests and benchmarks): each token runs
  the plain forward over its whole window, as chosen by `window_start`, with
  the same per-token random keys, in one jitted loop; no stops. A window
  that never restarts (rotary positions) is the whole row: each forward
  then runs over all the columns."""
  buf_BxN, pad_B = _left_pad(prompts, max_new_tokens)
  N, S, rolls = buf_BxN.shape[1], model.cfg.seq_len, model.cfg.cache_rolls
  window_N = np.array([window_start(n, S, rolls) for n in range(N)])
  out_BxN = np.asarray(_uncached(
      params, buf_BxN, pad_B, window_N, rng, model=model,
      sampling=(temperature, top_k, top_p), rules=_axis_rules(),
      first=N - max_new_tokens, C=N if rolls else S))
  return [row[pad:] for row, pad in zip(out_BxN, pad_B)]
