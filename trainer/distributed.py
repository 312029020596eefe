"""Joining a multi-process run through JAX's own distributed runtime.

Each process of a run calls `initialize` before touching any device. It joins
when the process count is given (flags, or the environment variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or when it is one
task of a SLURM job step with several tasks; `--distributed=cluster` lets JAX
detect the cluster itself (Cloud TPU VMs, SLURM, Open MPI).
"""

import os

import jax

from trainer.errors import ConfigError


def _env_int(name: str):
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={value!r} must be an integer") from None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """mode: "auto" (join when a multi-process launch is evident), "cluster"
  (always join, JAX detects the cluster), or "off"."""
  if mode == "off":
    return
  coordinator_address = (coordinator_address or
                         os.environ.get("JAX_COORDINATOR_ADDRESS"))
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  explicit = num_processes is not None
  slurm_tasks = _env_int("SLURM_NTASKS") or 1
  if mode == "auto" and not explicit and slurm_tasks == 1:
    return  # a single process: nothing to join
  if explicit:
    if coordinator_address is None or process_id is None:
      raise ConfigError(
          f"num_processes={num_processes} needs a coordinator address "
          "(--coordinator_address=HOST:PORT or JAX_COORDINATOR_ADDRESS) and "
          "this process's id (--process_id or JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"process_id={process_id} must be in "
                        f"[0, num_processes={num_processes})")
    if num_processes == 1:
      return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
