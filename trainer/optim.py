"""AdamW with the GPT-3 recipe: b1 0.9, b2 0.95, eps 1e-8, weight decay on
matrices only, global-norm clipping; under muP, per-layer learning rates;
and the learning-rate schedules.

muP (model.parametrization="mup", Tensor Programs V, Table 3): Adam's step
of each hidden ("matrix-like": two dimensions that grow with the width)
weight is multiplied by mup_base_width / d_model, its learning rate going as
1 / fan_in; embeddings, biases, norms and the readout keep the global rate
(the readout's 1 / width is the model's output multiplier). The multiplier
comes before weight decay, so every weight decays by learning_rate *
weight_decay per step at any width (the mup package's default for AdamW):
the decay's timescale does not change with the width.

Every schedule is linear warmup, then a constant phase, then a decay of some
shape to `min_lr_ratio` of the peak:
- cosine: the decay takes all steps after warmup (no constant phase), or
  those up to `cosine_steps`, after which the rate holds at its floor;
- wsd (warmup-stable-decay): the decay takes the last `decay_fraction` of
  the steps, so any checkpoint of the stable phase can branch into a short
  cooldown of its own (`--mode=cooldown`): one run, many token budgets;
- constant: no decay;
- a cooldown branch (`cooldown.steps` > 0): its parent's warmup and stable
  phase up to `cooldown.from_step`, then a decay over `cooldown.steps`.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from model import GPT, GPTConfig

SCHEDULES = ("cosine", "wsd", "constant")
# Decay shapes: progress p in [0, 1] -> fraction of the way still to go.
DECAY_SHAPES = {
    "linear": lambda p: 1 - p,
    "cosine": lambda p: 0.5 * (1 + jnp.cos(math.pi * p)),
    "1-sqrt": lambda p: 1 - jnp.sqrt(p),
}


def decay_phase(config) -> tuple[int, int, str]:
  """(first step of the decay, its length in steps, its shape)."""
  t, cooldown = config.train, config.cooldown
  if cooldown.steps > 0:
    return cooldown.from_step, cooldown.steps, cooldown.shape or t.decay_shape
  if t.schedule == "cosine":
    return t.warmup_steps, _cosine_end(t) - t.warmup_steps, "cosine"
  if t.schedule == "wsd":
    steps = max(1, round(t.decay_fraction * t.steps))
    return t.steps - steps, steps, t.decay_shape
  return t.steps, 0, t.decay_shape  # constant: the decay never starts


def warmup_limit(config) -> int:
  """The step by which the warmup must end: where the decay starts, or, for
  cosine, whose decay starts when the warmup ends, the last step."""
  if config.train.schedule == "cosine" and config.cooldown.steps == 0:
    return config.train.steps
  return decay_phase(config)[0]


def _cosine_end(t) -> int:
  """The step where cosine reaches its floor: cosine_steps, or the last
  step if that is sooner (a short run of a long config still decays)."""
  return min(t.cosine_steps or t.steps, t.steps)


def lr_schedule(config) -> optax.Schedule:
  peak = config.train.learning_rate
  end = peak * config.train.min_lr_ratio
  warmup = config.train.warmup_steps
  start, length, shape = decay_phase(config)
  still_to_go = DECAY_SHAPES[shape]

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    progress = jnp.clip((count - start) / max(length, 1), 0.0, 1.0)
    decayed = end + (peak - end) * still_to_go(progress)
    return jnp.where(count < warmup, peak * count / max(warmup, 1), decayed)

  return schedule


def matrix_like(cfg: GPTConfig):
  """A tree of bools like the params: which have two dimensions that grow
  with the width. Found as the mup package finds them, from the parameter
  shapes of the model at its d_model and at twice that (the same heads):
  the attention and MLP kernels, not the embeddings, biases, norms or
  lm_head."""
  def shapes(d_model: int):
    wider = dataclasses.replace(cfg, d_model=d_model,
                                parametrization="standard")
    tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
    return nn.unbox(jax.eval_shape(GPT(wider).init, jax.random.key(0),
                                   tokens))["params"]

  grows = lambda a, b: sum(x != y for x, y in zip(a.shape, b.shape))
  return jax.tree.map(lambda a, b: grows(a, b) >= 2, shapes(cfg.d_model),
                      shapes(2 * cfg.d_model))


def mup_lr_multipliers(cfg: GPTConfig):
  """Each parameter's learning-rate multiplier, as a tree like the params:
  1 / width_mult for the hidden weights, 1 for the rest; None under the
  standard parametrization."""
  if cfg.parametrization != "mup":
    return None
  return jax.tree.map(lambda hidden: 1 / cfg.width_mult if hidden else 1.0,
                      matrix_like(cfg))


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its entry in `multipliers` (a
  tree like the params of Python floats; 1 leaves it as it is)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u if m == 1 else u * m, updates,
                        multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


def make_optimizer(config) -> optax.GradientTransformation:
  """With train.skip_nonfinite_updates = N > 0, an update whose gradients
  are not finite is skipped, up to N in a row (optax.apply_if_finite).
  AdamW is optax.adamw's chain (Adam, weight decay, learning rate), with
  muP's per-parameter multipliers after Adam; the standard
  parametrization's chain is optax.adamw's, its state the same."""
  t = config.train
  decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  multipliers = None
  if config.model.parametrization == "mup":  # shapes only: any vocabulary
    multipliers = mup_lr_multipliers(
        GPTConfig(**{**config.model, "vocab_size": 1}))
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.chain(
          optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps),
          *([scale_by_multipliers(multipliers)] if multipliers else []),
          optax.add_decayed_weights(t.weight_decay, decay_matrices),
          optax.scale_by_learning_rate(lr_schedule(config))))
  if t.skip_nonfinite_updates > 0:
    tx = optax.apply_if_finite(tx, t.skip_nonfinite_updates)
  return tx
