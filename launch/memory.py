"""Per-device memory of a config's train step on a mesh larger than this
machine: compiled ahead of time for fake CPU devices from abstract shapes, so
nothing is allocated.

  python -m launch.memory --config=configs/gpt2_small.py --devices=64 \
      --config.mesh.data=8 --config.mesh.fsdp=8
  python -m launch.memory --config=configs/gpt3_xl.py --devices=8 \
      --config.mesh.data=1 --config.mesh.fsdp=8 --json

XLA compiles one partitioned program that every device runs, so each number
is per device. The state bytes are exact (computed from the shardings too);
temporaries (activations, gradients, collective buffers) are what the CPU
compiler plans, an estimate for GPU/TPU, whose fusion and scheduling differ:
remat shows only with model.scan_layers=True (for unrolled layers the CPU
plan is the same with and without it).
"""

import json
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

import errors
from trainer import config as config_lib, run as run_lib, sharding
from trainer import state as state_lib
from trainer.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Config file; override fields with "
    "--config.a.b=value.", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile "
                                "for; the mesh must use all of them.",
                                lower_bound=1)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object (bytes).")

GIB = 2**30


def _device_bytes(tree) -> int:
  """Bytes of one device's shards."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) *
             leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def measure(config) -> dict:
  """Compiles the train step of `config` for the current (fake) devices."""
  config_lib.validate(config)
  if not config.model.vocab_size:
    raise ConfigError("model.vocab_size is 0 (the tokenizer's), unknown here; "
                      "give it, e.g. --config.model.vocab_size=2048")
  mesh = sharding.make_mesh(config.mesh)
  t = config.train
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  model, tx, rules, shardings = run_lib.model_and_optimizer(
      config, config.model.vocab_size, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = state_lib.abstract_state(model, tx, shardings)
    params_bytes = _device_bytes(state.params)
    state_bytes = _device_bytes(state)
    batch = jax.ShapeDtypeStruct((t.batch_size, model.cfg.seq_len + 1),
                                 jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
    train_step = state_lib.make_train_step(
        model, tx, shardings, grad_accum_steps=t.grad_accum_steps,
        seed=t.seed)
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
  m = compiled.memory_analysis()
  cfg = model.cfg
  return {
      "model": f"{cfg.num_layers}x{cfg.d_model}x{cfg.num_heads}",
      "params": cfg.num_params(padded=True),  # as stored
      "seq_len": cfg.seq_len, "remat": cfg.remat,
      "scan_layers": cfg.scan_layers,
      "devices": jax.device_count(), "mesh": dict(mesh.shape),
      "batch": t.batch_size, "grad_accum_steps": t.grad_accum_steps,
      "batch_per_device": t.batch_size // data_parallel,
      "params_bytes": params_bytes,
      "opt_state_bytes": state_bytes - params_bytes,
      "argument_bytes": m.argument_size_in_bytes,
      "output_bytes": m.output_size_in_bytes,
      "alias_bytes": m.alias_size_in_bytes,
      "temp_bytes": m.temp_size_in_bytes,
      # Donated outputs reuse their argument buffers. (XLA:CPU's own
      # peak_memory_in_bytes leaves the temporaries out.)
      "total_bytes": (m.argument_size_in_bytes + m.output_size_in_bytes
                      - m.alias_size_in_bytes + m.temp_size_in_bytes),
      "compile_s": round(compile_s, 1),
  }


def summary(r: dict) -> str:
  gib = lambda key: f"{r[key] / GIB:8.3f} GiB"
  mesh = " x ".join(f"{a} {n}" for a, n in r["mesh"].items())
  return "\n".join([
      f"model {r['model']} ({r['params'] / 1e6:.1f}M params), context "
      f"{r['seq_len']}, remat {r['remat']}, scan_layers {r['scan_layers']}",
      f"mesh {mesh} over {r['devices']} devices; batch {r['batch']} = "
      f"{r['batch_per_device']} sequences per data-parallel shard"
      f" in {r['grad_accum_steps']} microbatch(es)",
      "per device:",
      f"  parameters       {gib('params_bytes')}   (from the shardings)",
      f"  optimizer state  {gib('opt_state_bytes')}   (from the shardings)",
      f"  arguments        {gib('argument_bytes')}   (state + batch shard)",
      f"  outputs          {gib('output_bytes')}",
      f"  aliased          {gib('alias_bytes')}   (donated state)",
      f"  temporaries      {gib('temp_bytes')}   (activations, gradients, ...)",
      f"  total            {gib('total_bytes')}   "
      "(arguments + outputs - aliased + temporaries)",
      f"compiled in {r['compile_s']} s",
  ])


@errors.command
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Before any backend starts: fake CPU devices, even on an accelerator host.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  report = measure(_CONFIG.value)
  print(json.dumps(report) if _JSON.value else summary(report))


if __name__ == "__main__":
  app.run(main)
