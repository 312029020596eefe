"""Decoding speed: the cached sampler against the uncached reference.

  python -m benchmarks.decode                    # 4 x 128 model, batch 1 and 8
  python -m benchmarks.decode --batch 8 --rounds 9

The model of configs/shakespeare_4x128.py with random weights (vocab 85) continues a
random prompt of --prompt tokens by --new tokens (temperature 0.8). Rounds
alternate between the two samplers, so that machine noise hits both alike;
times are medians over rounds, after a warm-up call that compiles. Reported
per batch size: tokens/s of each (new tokens, prefill included), their
ratio, and for the cached sampler the time per token of the last 64 new
tokens over that of the first 64 (a cache that grows would make it > 1).
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import shakespeare_4x128
from model import GPT, generate, generate_uncached
from trainer import config as config_lib


def _timed_cached(model, params, prompts, new_tokens):
  """(seconds, seconds per token over the first 64 and the last 64)."""
  stamps = []
  t = time.perf_counter()
  generate(model, params, prompts, jax.random.key(0),
           max_new_tokens=new_tokens,
           on_token=lambda *_: stamps.append(time.perf_counter()))
  total = time.perf_counter() - t
  return total, (stamps[64] - stamps[0]) / 64, (stamps[-1] - stamps[-65]) / 64


def _timed_uncached(model, params, prompts, new_tokens):
  t = time.perf_counter()
  generate_uncached(model, params, prompts, jax.random.key(0),
                    max_new_tokens=new_tokens)
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
  p.add_argument("--new", type=int, default=512,
                 help="new tokens (at least 65)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--vocab", type=int, default=85)
  args = p.parse_args()
  if args.new < 65:
    p.error("--new must be at least 65: the first and last 64 are timed")

  cfg = config_lib.model_config(shakespeare_4x128.get_config(), args.vocab)
  model = GPT(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(
      (1, cfg.seq_len), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  result = {"model": f"{cfg.num_layers}x{cfg.d_model}x{cfg.num_heads}, "
                     f"context {cfg.seq_len}, vocab {cfg.vocab_size}",
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "prompt_tokens": args.prompt, "new_tokens": args.new}
  for batch in args.batch:
    prompts = rng.integers(0, args.vocab, (batch, args.prompt))
    _timed_cached(model, params, prompts, args.new)  # compile
    _timed_uncached(model, params, prompts, args.new)
    cached, first, last, uncached = [], [], [], []
    for _ in range(args.rounds):
      total, first_s, last_s = _timed_cached(model, params, prompts, args.new)
      cached.append(total)
      first.append(first_s)
      last.append(last_s)
      uncached.append(_timed_uncached(model, params, prompts, args.new))
    tokens = batch * args.new
    cached_tps = tokens / statistics.median(cached)
    uncached_tps = tokens / statistics.median(uncached)
    result[f"batch_{batch}"] = {
        "cached_tokens_per_sec": round(cached_tps),
        "uncached_tokens_per_sec": round(uncached_tps),
        "cached_over_uncached": round(cached_tps / uncached_tps, 2),
        "cached_ms_per_step_first_64": round(1e3 * statistics.median(first),
                                             3),
        "cached_ms_per_step_last_64": round(1e3 * statistics.median(last), 3),
        "last_64_over_first_64": round(statistics.median(
            [b / a for a, b in zip(first, last)]), 3)}
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
