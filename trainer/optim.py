"""AdamW with the GPT-3 recipe: b1 0.9, b2 0.95, eps 1e-8, weight decay on
the matrices alone, global-norm clipping; under muP, per-layer learning
rates; and the learning-rate schedules. Which parameters are matrices, and
which hidden, is their role (model.roles), from their names: the same with
layers scanned (a layers axis on every per-layer parameter) or unrolled.

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

import math

import jax
import jax.numpy as jnp
import optax

from model import GPTConfig, roles

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


# Which roles (model.roles) weight decay pulls toward 0: the matrices that
# hold what the model learned (the GPT-3 recipe, nanoGPT's), not biases or
# LayerNorm gains, scanned or not.
DECAYED = (roles.EMBEDDING, roles.POSITION, roles.HIDDEN, roles.HEAD)


def decay_mask(params):
  """A tree of bools like `params` (or updates): which weight decay takes."""
  return jax.tree.map(lambda role: role in DECAYED, roles.of(params))


def lr_multipliers(cfg: GPTConfig) -> dict[str, float]:
  """The learning-rate multiplier of each role that has one: under muP,
  1 / width_mult for the hidden weights (the attention and MLP kernels, the
  mup package's "matrix-like" ones: both dimensions grow with the width);
  none under the standard parametrization."""
  if cfg.parametrization != "mup":
    return {}
  return {roles.HIDDEN: 1 / cfg.width_mult}


def scale_by_role(multipliers: dict[str, float]
                  ) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its role's entry in
  `multipliers` (lr_multipliers; a role without one keeps its update)."""
  def scale(path, u):
    m = multipliers.get(roles.role(path), 1.0)
    return u if m == 1 else u * m

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


def make_optimizer(config) -> optax.GradientTransformation:
  """With train.skip_nonfinite_updates = N > 0, an update whose gradients
  are not finite is skipped, up to N in a row (optax.apply_if_finite).
  AdamW is optax.adamw's chain (Adam, weight decay on the roles of DECAYED,
  learning rate), with muP's per-role multipliers after Adam; the standard
  parametrization's chain is optax.adamw's, its state the same."""
  t = config.train
  # Shapes play no part: any vocabulary will do.
  multipliers = lr_multipliers(GPTConfig(**{**config.model, "vocab_size": 1}))
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.chain(
          optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps),
          *([scale_by_role(multipliers)] if multipliers else []),
          optax.add_decayed_weights(t.weight_decay, decay_mask),
          optax.scale_by_learning_rate(lr_schedule(config))))
  if t.skip_nonfinite_updates > 0:
    tx = optax.apply_if_finite(tx, t.skip_nonfinite_updates)
  return tx
