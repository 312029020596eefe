"""What checkpoint checksums cost: SHA-256 MB/s over a saved train state.

  python -m benchmarks.checkpoint_checksums             # GPT-2 small, 1.5 GB
  python -m benchmarks.checkpoint_checksums --num_layers=2 --d_model=192

The state has the shapes of configs/gpt2_small.py's train state (params and
Adam's moments, from abstract shapes as launch/memory.py builds them; layers
and width can be changed), filled with random float32 numbers
(incompressible, like trained weights). It is saved once through
trainer.checkpoint (the checksums are taken in Orbax's background thread
before the commit); then the benchmark times hashing the committed files
again (what the save added) and a verification (what every restore adds).
The files are fresh in the page cache: this is the hashing speed, not the
disk's.
"""

import argparse
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from configs import gpt2_small
from trainer import checkpoint, run as run_lib, sharding
from trainer import state as state_lib


def random_state(config, seed: int = 0):
  """The config's train state with random leaves (the step as saved)."""
  mesh = sharding.make_mesh(config.mesh)
  model, tx, _, shardings = run_lib.model_and_optimizer(
      config, config.model.vocab_size, mesh)
  abstract = state_lib.abstract_state(model, tx, shardings)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jax.device_put(
          rng.standard_normal(s.shape, np.float32).astype(s.dtype)
          if s.shape else np.zeros((), s.dtype), s.sharding), abstract)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_layers", type=int, default=12)
  parser.add_argument("--d_model", type=int, default=768)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  config = gpt2_small.get_config()
  config.model.update(num_layers=args.num_layers, d_model=args.d_model)
  state = random_state(config)
  workdir = tempfile.mkdtemp(prefix="checksums_")
  try:
    saver = checkpoint.Checkpointer(workdir, keep=1)
    start = time.perf_counter()
    saver.save(1, state, {"step": 1})
    saver.close()
    save_s = time.perf_counter() - start
    step_dir = os.path.join(saver.directory, "1")
    names = [os.path.relpath(os.path.join(d, f), step_dir)
             for d, _, files in os.walk(step_dir) for f in files]
    size = sum(os.path.getsize(os.path.join(step_dir, n)) for n in names)
    reader = checkpoint.Checkpointer(workdir, keep=1, read_only=True)
    hash_s, verify_s = [], []
    for _ in range(args.repeats):
      start = time.perf_counter()
      checkpoint.sha256s(step_dir, names)
      hash_s.append(time.perf_counter() - start)
      start = time.perf_counter()
      reader.verify(1)
      verify_s.append(time.perf_counter() - start)
    reader.close()
    mb = size / 1e6
    print(f"{config.model.num_layers} layers x {config.model.d_model}: "
          f"{mb:,.0f} MB in {len(names)} files, saved and committed in "
          f"{save_s:.1f} s")
    print(f"checksums at save: {np.median(hash_s):.2f} s "
          f"({mb / np.median(hash_s):,.0f} MB/s, "
          f"{checkpoint.HASH_THREADS} threads)")
    print(f"verification at restore: {np.median(verify_s):.2f} s "
          f"({mb / np.median(verify_s):,.0f} MB/s)")
  finally:
    shutil.rmtree(workdir)


if __name__ == "__main__":
  main()
