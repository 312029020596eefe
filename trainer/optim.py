"""AdamW with the GPT-3 recipe: b1 0.9, b2 0.95, eps 1e-8, weight decay on
the matrices alone, global-norm clipping; under muP, per-layer learning
rates; Muon for the hidden matrices (train.optimizer="muon"); and the
learning-rate schedules. Which parameters are matrices, and which hidden,
is their role (model.roles), from their names: the same with layers scanned
(a layers axis on every per-layer parameter) or unrolled.

muP (model.parametrization="mup", Tensor Programs V, Table 3): Adam's step
of each hidden ("matrix-like": two dimensions that grow with the width)
weight is multiplied by mup_base_width / d_model, its learning rate going as
1 / fan_in; embeddings, biases, norms and the readout keep the global rate
(the readout's 1 / width is the model's output multiplier). The multiplier
comes before weight decay, so every weight decays by learning_rate *
weight_decay per step at any width (the mup package's default for AdamW):
the decay's timescale does not change with the width.

Muon (train.optimizer="muon"; Jordan et al. 2024, optax.contrib's
scale_by_muon): the hidden weights (the attention and MLP kernels) step
along their Nesterov momentum orthogonalized by 5 Newton-Schulz iterations,
each matrix on its own (muon_dimensions: Q, K and V apart, each layer of a
scanned model apart); every other parameter keeps AdamW exactly as above.
The update's scale is Moonshot's "consistent RMS" (Liu et al. 2025): an
orthogonalized fan_in x fan_out matrix, times 0.2 * sqrt(max(fan_in,
fan_out)), has RMS 0.2, about AdamW's. So one muon_learning_rate gives
every kernel the same step per entry whatever its shape (the MLP's D x 4D
and 4D x D alike, where optax's default, modded-nanogpt's sqrt(max(1,
fan_out / fan_in)), gives the down projection half the up projection's);
the rate is on AdamW's scale, and weight decay means what it means under
AdamW: decoupled, muon_learning_rate * weight_decay of each kernel per
step (at modded-nanogpt's rates of 0.02-0.05 on its scale, a decay several
times AdamW's). Its rate follows learning_rate's schedule, scaled to
muon_learning_rate.

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

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from model import GPTConfig, roles

OPTIMIZERS = ("adamw", "muon")
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


def lr_schedule(config, peak: float | None = None) -> optax.Schedule:
  """The learning rate by step, peaking at `peak` (default: the config's
  train.learning_rate)."""
  peak = config.train.learning_rate if peak is None else peak
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


# How Muon reads each hidden kernel as matrices, by name: (its rank without
# a layers axis, the reduction axes, the output axes). Flax kernels are
# [in, out]: the reduction axes are the inputs. Axes count from the end, so
# that scan_layers' leading layers axis is a batch axis (each layer's
# matrix apart), as is every axis not named: qkv_kernel's 3 (Q, K, V).
MUON_AXES = {
    "qkv_kernel": (4, -4, (-2, -1)),  # [D, 3, H, K]: D -> (H, K), per Q, K, V
    "out_kernel": (3, (-3, -2), -1),  # [H, K, D]: (H, K) -> D
    "kernel": (2, -2, -1),            # the MLP's Dense [D, F] and [F, D]
}
MUON_RMS = 0.2  # the RMS of every Muon update before its learning rate


def muon_dimensions(path, param):
  """The MuonDimensionNumbers of the parameter at `path` (a key path) if
  it is a hidden one, else None; a ValueError for a hidden parameter whose
  name or rank MUON_AXES does not know."""
  if roles.role(path) != roles.HIDDEN:
    return None
  name = roles.names(path)[-1]
  where = "/".join(roles.names(path))
  if name not in MUON_AXES:
    raise ValueError(f"hidden parameter {where} has no Muon axes; give it "
                     "some in trainer/optim.py's MUON_AXES")
  rank, reduction, output = MUON_AXES[name]
  if param.ndim not in (rank, rank + 1):  # unscanned, or a layers axis
    raise ValueError(f"hidden parameter {where} has shape {param.shape}; "
                     f"MUON_AXES reads it as rank {rank} (+1 scanned)")
  return optax.contrib.MuonDimensionNumbers(reduction, output)


def _dimension_tree(updates):
  """muon_dimensions of every leaf of `updates` (a tree optax.partition
  masks: its other leaves are empty nodes, left as they are)."""
  return jax.tree_util.tree_map_with_path(muon_dimensions, updates)


def _fans(param, dims) -> tuple[int, int]:
  axes = lambda a: (a,) if isinstance(a, int) else a
  size = lambda a: math.prod(param.shape[i] for i in axes(a))
  return size(dims.reduction_axis), size(dims.output_axis)


def scale_to_rms(rms: float) -> optax.GradientTransformation:
  """Orthogonalized updates times rms * sqrt(max(fan_in, fan_out)): RMS
  `rms` for a matrix of any shape (an orthogonal fan_in x fan_out one has
  RMS 1 / sqrt(max(fan_in, fan_out)))."""
  def scale(path, u):
    return u * (rms * math.sqrt(max(_fans(u, muon_dimensions(path, u)))))

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


def _muon(config) -> optax.GradientTransformation:
  """Muon's chain for the hidden kernels (the module's docstring)."""
  t = config.train
  return optax.chain(
      optax.contrib.scale_by_muon(beta=t.muon_momentum, nesterov=True,
                                  weight_dimension_numbers=_dimension_tree),
      scale_to_rms(MUON_RMS),
      optax.add_decayed_weights(t.weight_decay, decay_mask),
      optax.scale_by_learning_rate(lr_schedule(config,
                                               t.muon_learning_rate)))


def _adamw(config) -> optax.GradientTransformation:
  """Adam, muP's per-role multipliers (if any), weight decay on the roles
  of DECAYED, the learning rate: optax.adamw's chain under the standard
  parametrization, its state the same."""
  t = config.train
  # Shapes play no part: any vocabulary will do.
  multipliers = lr_multipliers(GPTConfig(**{**config.model, "vocab_size": 1}))
  return optax.chain(
      optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps),
      *([scale_by_role(multipliers)] if multipliers else []),
      optax.add_decayed_weights(t.weight_decay, decay_mask),
      optax.scale_by_learning_rate(lr_schedule(config)))


def _muon_labels(params):
  """"muon" or "adamw" for each parameter; a boxed one (nn.Partitioned, as
  state.state_shardings builds the state) labelled as a whole, so that the
  optimizer state masks whole boxes and keeps each kept box's axis names."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "muon" if roles.role(path) == roles.HIDDEN else "adamw",
      params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping, then train.optimizer: AdamW (_adamw) for every
  parameter, or Muon for the hidden ones and that AdamW for the rest. With
  train.skip_nonfinite_updates = N > 0, an update whose gradients are not
  finite is skipped, up to N in a row (optax.apply_if_finite)."""
  t = config.train
  update = _adamw(config)
  if t.optimizer == "muon":
    update = optax.partition({"muon": _muon(config), "adamw": update},
                             _muon_labels)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), update)
  if t.skip_nonfinite_updates > 0:
    tx = optax.apply_if_finite(tx, t.skip_nonfinite_updates)
  return tx
