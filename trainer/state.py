"""The train state, its sharded initialization, and the jitted steps.

`train_step(state, batch) -> (state, metrics)` and `eval_step` are pure; the
loop in `trainer.loop` owns the host side.
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from trainer import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _boxed_state(model, tx, rng):
  """State whose leaves still carry their logical axis names."""
  dummy = jnp.zeros((1, model.cfg.seq_len), jnp.int32)
  params = model.init(rng, dummy)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params))


def state_shardings(model, tx, mesh, rules):
  """NamedShardings of the train state, from the logical names and rules."""
  boxed = jax.eval_shape(functools.partial(_boxed_state, model, tx),
                         jax.random.key(0))
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)


def init_state(model, tx, shardings, seed: int) -> TrainState:
  init = jax.jit(lambda rng: nn.unbox(_boxed_state(model, tx, rng)),
                 out_shardings=shardings)
  return init(jax.random.key(seed))


def abstract_state(model, tx, shardings) -> TrainState:
  """ShapeDtypeStructs with shardings: a restore target; nothing allocated."""
  shapes = jax.eval_shape(lambda: nn.unbox(_boxed_state(
      model, tx, jax.random.key(0))))
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


def compiler_options() -> dict[str, str] | None:
  """XLA:CPU hands dots to YNNPACK by default; its Eigen dots run our train
  step faster (README, Performance). Other backends keep their defaults."""
  if jax.default_backend() != "cpu":
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": ""}


def cross_entropy(logits_BxLxV, targets_BxL):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL)


def make_train_step(model, tx, shardings, *, grad_accum_steps: int,
                    seed: int):
  """The jitted update, with the state (sharded as `shardings`, from
  `state_shardings`) and the batch shardings declared in and out; gradients
  of `grad_accum_steps` microbatches are averaged before one optimizer
  step."""
  dropout = model.cfg.dropout > 0

  def loss_fn(params, tokens_BxL1, rng):
    logits_BxLxV = model.apply(
        {"params": params}, tokens_BxL1[:, :-1], deterministic=not dropout,
        rngs={"dropout": rng} if dropout else None)
    return cross_entropy(logits_BxLxV, tokens_BxL1[:, 1:]).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state: TrainState, tokens_BxL1):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if grad_accum_steps == 1:
      loss, grads = grad_fn(state.params, tokens_BxL1, rng)
    else:
      B = tokens_BxL1.shape[0]
      # Row i of microbatch j is row i * accum + j: each device's rows stay local.
      micro_AxBxL1 = tokens_BxL1.reshape(B // grad_accum_steps,
                                         grad_accum_steps, -1).swapaxes(0, 1)

      def accumulate(carry, xs):
        tokens, i = xs
        loss, grads = grad_fn(state.params, tokens, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32),
               jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(
          accumulate, zeros, (micro_AxBxL1, jnp.arange(grad_accum_steps)))
      loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1,
                           params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if isinstance(opt_state, optax.ApplyIfFiniteState):
      metrics.update(skipped_updates=opt_state.total_notfinite,
                     nonfinite_streak=opt_state.notfinite_count)
    return new_state, metrics

  mesh = jax.tree.leaves(shardings)[0].mesh
  return jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, NamedSharding(mesh, P())),
                 compiler_options=compiler_options())


def make_eval_step(model):
  """Sums over a batch: (nats, target tokens, target UTF-8 bytes)."""

  def eval_step(params, tokens_BxL1, mask_B, token_bytes_V):
    logits_BxLxV = model.apply({"params": params}, tokens_BxL1[:, :-1])
    targets_BxL = tokens_BxL1[:, 1:]
    weight_BxL = jnp.broadcast_to(mask_B[:, None], targets_BxL.shape)
    nats = jnp.sum(cross_entropy(logits_BxLxV, targets_BxL) * weight_BxL)
    num_bytes = jnp.sum(token_bytes_V[targets_BxL] * weight_BxL)
    return jnp.stack([nats, jnp.sum(weight_BxL), num_bytes.astype(jnp.float32)])

  return jax.jit(eval_step, compiler_options=compiler_options())
