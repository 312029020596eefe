"""AdamW with the GPT-3 recipe: b1 0.9, b2 0.95, eps 1e-8, weight decay on
matrices only, global-norm clipping, linear warmup then cosine decay."""

import jax
import optax


def lr_schedule(train_cfg) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate,
      warmup_steps=train_cfg.warmup_steps, decay_steps=train_cfg.steps,
      end_value=train_cfg.learning_rate * train_cfg.min_lr_ratio)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """With train.skip_nonfinite_updates = N > 0, an update whose gradients
  are not finite is skipped, up to N in a row (optax.apply_if_finite)."""
  decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(lr_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                  eps=train_cfg.eps, weight_decay=train_cfg.weight_decay,
                  mask=decay_matrices))
  if train_cfg.skip_nonfinite_updates > 0:
    tx = optax.apply_if_finite(tx, train_cfg.skip_nonfinite_updates)
  return tx
