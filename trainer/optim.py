"""AdamW with the GPT-3 recipe: b1 0.9, b2 0.95, eps 1e-8, weight decay on
matrices only, global-norm clipping; and the learning-rate schedules.

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

import math

import jax
import jax.numpy as jnp
import optax

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


def make_optimizer(config) -> optax.GradientTransformation:
  """With train.skip_nonfinite_updates = N > 0, an update whose gradients
  are not finite is skipped, up to N in a row (optax.apply_if_finite)."""
  t = config.train
  decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(lr_schedule(config), b1=t.b1, b2=t.b2, eps=t.eps,
                  weight_decay=t.weight_decay, mask=decay_matrices))
  if t.skip_nonfinite_updates > 0:
    tx = optax.apply_if_finite(tx, t.skip_nonfinite_updates)
  return tx
