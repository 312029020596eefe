"""One device mesh with named axes (data, fsdp, tensor); the model's logical
axis names are mapped onto it by rules from the config."""

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from trainer.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """The sizes on this many devices (each size's own rules, and at most one
  -1, are checked with the config: trainer/config.py)."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill "
                        f"{num_devices} devices: {known} does not divide it")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = "
        f"{math.prod(sizes)} but there are {num_devices} devices; make the "
        "product equal the device count (or set one axis to -1)")
  return tuple(sizes)


def check_layout(mesh_sizes: dict, model_cfg, batch_size: int,
                 grad_accum_steps: int = 1) -> None:
  """Refuses, before anything compiles, a layout the mesh cannot split."""
  data_parallel = mesh_sizes["data"] * mesh_sizes["fsdp"]
  if batch_size % (data_parallel * grad_accum_steps):
    raise ConfigError(
        f"train.batch_size={batch_size} is not divisible by the data-parallel "
        f"size {data_parallel} (mesh.data * mesh.fsdp) times "
        f"train.grad_accum_steps={grad_accum_steps}")
  tensor = mesh_sizes["tensor"]
  for name, size in (("num_heads", model_cfg.num_heads),
                     ("d_ff (the MLP width)", model_cfg.mlp_dim)):
    if size % tensor:
      raise ConfigError(f"model.{name} = {size} is not divisible by "
                        f"mesh.tensor={tensor}; tensor parallelism splits "
                        "attention heads and the MLP width evenly")


def check_even(abstract_tree) -> None:
  """Refuses arrays whose sharded dimensions do not split evenly (jit would),
  naming the array."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree):
    mesh = leaf.sharding.mesh
    for dim, (size, axes) in enumerate(zip(leaf.shape, leaf.sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else axes or ()
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        raise ConfigError(
            f"{jax.tree_util.keystr(path, simple=True, separator='/')} "
            f"{tuple(leaf.shape)}: dimension {dim} (size {size}) does not "
            f"split over mesh {'*'.join(axes)}={ways}; pick mesh sizes that "
            "divide it (for the vocabulary: a model.vocab_multiple they "
            "divide)")


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_rules(mesh_cfg) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in mesh_cfg.rules)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def process_rows(sharding: NamedSharding, global_shape: tuple) -> slice:
  """The rows of a global batch that this process's devices hold, as one
  range: what its data pipeline loads. Where devices of several processes
  hold the same rows (tensor parallelism across hosts), each of them loads
  those rows. A layout that gives a process rows in several ranges is
  refused."""
  batch = global_shape[0]
  ranges = sorted({index[0].indices(batch)[:2] for index in
                   sharding.addressable_devices_indices_map(
                       global_shape).values()})
  start, stop = ranges[0]
  for low, high in ranges[1:]:
    if low > stop:
      held = ", ".join(f"{a}-{b - 1}" for a, b in ranges)
      raise ConfigError(
          f"the mesh gives process {jax.process_index()} rows {held} of each "
          f"batch of {batch}, not one contiguous range; choose mesh sizes "
          "whose data and fsdp axes split the batch over processes in order "
          "(e.g. mesh.data = the number of processes)")
    stop = max(stop, high)
  return slice(start, stop)


def to_global(rows: np.ndarray, sharding: NamedSharding,
              global_shape: tuple) -> jax.Array:
  """This process's rows of a batch (process_rows) -> one global array
  sharded over the batch axes."""
  return jax.make_array_from_process_local_data(sharding, rows, global_shape)
