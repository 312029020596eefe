"""A train step compiled and timed on random tokens, apart from any input
pipeline: what benchmarks.train_throughput and research.scaling measure."""

import time

import flax.linen as nn
import jax
import numpy as np

from trainer import run as run_lib, sharding
from trainer import state as state_lib


def jax_runner(config, vocab_size):
  """Returns (model config, compile seconds, run(steps) -> seconds)."""
  mesh = sharding.make_mesh(config.mesh)
  model, tx, rules, shardings = run_lib.model_and_optimizer(
      config, vocab_size, mesh)
  rng = np.random.default_rng(0)
  shape = (config.train.batch_size, config.model.seq_len + 1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = state_lib.init_state(model, tx, shardings, seed=0)
    step = state_lib.make_train_step(model, tx, shardings, grad_accum_steps=1,
                                     seed=0)
    batches = [sharding.to_global(rng.integers(0, vocab_size, shape, np.int32),
                                  sharding.batch_sharding(mesh), shape)
               for _ in range(2)]
    t = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t
  holder = {"state": state}

  def run(steps):
    t = time.perf_counter()
    for i in range(steps):
      holder["state"], m = compiled(holder["state"], batches[i % 2])
    jax.block_until_ready(m)
    return time.perf_counter() - t

  run(2)  # warm-up
  return model.cfg, compile_s, run
