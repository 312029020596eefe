"""Banded (local) attention against dense causal attention, forward+backward.

  python -m benchmarks.attention                      # context 1024, window 128
  python -m benchmarks.attention --context 2048 --window 256 --rounds 9

The two einsum kernels of model/gpt.py on random queries, keys and values in
the default model's head layout (configs/base.py: 3 heads of 32 today),
batch --batch: `causal_attention` (model.attention_chunks query blocks, as a dense
layer trains) and `banded_attention` (a local layer, model.local_window).
Each call is one jitted forward and backward (the gradients of q, k and v
for a fixed random output gradient). Rounds alternate between the two, so
that machine noise hits both alike; times are medians over rounds of --steps
calls, after a warm-up call that compiles. banded_over_dense is the ratio of
those medians (banded time / dense time).
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from configs import base
from model.attention import banded_attention, causal_attention


def _fwd_bwd(attention):
  """q, k, v, output gradient -> the gradients of q, k, v, jitted."""
  def loss(q, k, v, grad_out):
    return jnp.vdot(attention(q, k, v), grad_out)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--context", type=int, default=1024)
  p.add_argument("--window", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5, help="calls per round")
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()

  m = base.get_config().model
  H, K = m.num_heads, m.d_model // m.num_heads
  shape = (args.batch, args.context, H, K)
  q, k, v, grad_out = (jax.random.normal(key, shape) for key in
                       jax.random.split(jax.random.key(0), 4))
  kernels = {
      "dense": _fwd_bwd(lambda q, k, v: causal_attention(
          q, k, v, m.attention_chunks)),
      "banded": _fwd_bwd(lambda q, k, v: banded_attention(
          q, k, v, args.window))}
  for kernel in kernels.values():
    jax.block_until_ready(kernel(q, k, v, grad_out))  # compile
  times = {name: [] for name in kernels}
  for _ in range(args.rounds):
    for name, kernel in kernels.items():
      t = time.perf_counter()
      for _ in range(args.steps):
        out = kernel(q, k, v, grad_out)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t) / args.steps)

  ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
  print(json.dumps({
      "shape": f"batch {args.batch} x context {args.context} x {H} heads x "
               f"{K}, window {args.window}, float32, forward+backward",
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "rounds": f"{args.rounds} x {args.steps} calls, medians",
      "dense_ms": round(ms["dense"], 2), "banded_ms": round(ms["banded"], 2),
      "banded_over_dense": round(ms["banded"] / ms["dense"], 3)}, indent=1))


if __name__ == "__main__":
  main()
