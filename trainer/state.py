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

from trainer import objectives
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
  step faster (docs/performance.md). Other backends keep their defaults."""
  if jax.default_backend() != "cpu":
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": ""}


def make_train_step(model, tx, shardings, *, grad_accum_steps: int,
                    seed: int, objective: str = "next-token",
                    dpo_beta: float = 0.1):
  """The jitted update, with the state (sharded as `shardings`, from
  `state_shardings`) and the batch shardings declared in and out; gradients
  of `grad_accum_steps` microbatches are averaged before one optimizer
  step. The loss is `objective`'s (trainer.objectives); for dpo the step
  takes the frozen reference params as a third argument,
  train_step(state, batch, ref_params), sharded like the params."""
  dropout = model.cfg.dropout > 0
  spec = objectives.OBJECTIVES[objective]

  def loss_fn(params, batch, rng, ref_params, denominator):
    return spec.loss(model, params, batch, rng=rng, dropout=dropout,
                     ref_params=ref_params, beta=dpo_beta,
                     denominator=denominator)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch, ref_params=None):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    # Each microbatch's sums (sft: the loss, dpo: the KL metrics) over the
    # global batch's target counts, so that the average over microbatches
    # is the global batch's value.
    denominator = (None if spec.denominator is None else
                   jax.tree.map(lambda n: n / grad_accum_steps,
                                spec.denominator(batch)))
    if grad_accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng, ref_params,
                                   denominator)
    else:
      # Row i of microbatch j is row i * accum + j: each device's rows stay local.
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // grad_accum_steps,
                              grad_accum_steps, *x.shape[1:]).swapaxes(0, 1),
          batch)

      def accumulate(carry, xs):
        part, i = xs
        out = grad_fn(state.params, part, jax.random.fold_in(rng, i),
                      ref_params, denominator)
        return jax.tree.map(jnp.add, carry, out), None

      zeros = jax.tree.map(
          jnp.zeros_like,
          jax.eval_shape(grad_fn, state.params, jax.tree.map(
              lambda x: x[0], micro), rng, ref_params, denominator))
      ((loss, aux), grads), _ = jax.lax.scan(
          accumulate, zeros, (micro, jnp.arange(grad_accum_steps)))
      loss, aux, grads = jax.tree.map(lambda x: x / grad_accum_steps,
                                      (loss, aux, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1,
                           params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    if spec.batch_metrics:
      metrics.update(spec.batch_metrics(batch))
    if isinstance(opt_state, optax.ApplyIfFiniteState):
      metrics.update(skipped_updates=opt_state.total_notfinite,
                     nonfinite_streak=opt_state.notfinite_count)
    return new_state, metrics

  mesh = jax.tree.leaves(shardings)[0].mesh
  in_shardings = (shardings, sharding_lib.batch_sharding(mesh))
  if spec.uses_reference:
    in_shardings += (shardings.params,)
  return jax.jit(train_step, donate_argnums=(0,), in_shardings=in_shardings,
                 out_shardings=(shardings, NamedSharding(mesh, P())),
                 compiler_options=compiler_options())


def make_eval_step(model, objective: str = "next-token",
                   dpo_beta: float = 0.1):
  """Sums over the rows a mask keeps: eval_step(params, batch, mask_B,
  token_bytes_V) -> [nats, target tokens, target bytes] for next-token and
  sft; for dpo with the reference params last, a dict of sums
  (objectives.dpo_eval). objectives.summarize makes either an eval
  record."""
  spec = objectives.OBJECTIVES[objective]

  def eval_step(params, batch, mask_B, token_bytes_V, ref_params=None):
    return spec.eval(model, params, batch, mask_B, token_bytes_V,
                     ref_params=ref_params, beta=dpo_beta)

  return jax.jit(eval_step, compiler_options=compiler_options())

