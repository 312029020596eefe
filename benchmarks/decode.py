"""Decoding speed: the cached sampler against the uncached reference, or
against Hugging Face transformers' GPT-2 `generate`.

  python -m benchmarks.decode                    # 4 x 128 model, batch 1 and 8
  python -m benchmarks.decode --batch 8 --rounds 9
  python -m benchmarks.decode --config=configs/gpt2_small.py --vocab=50257 \
      --prompt 32 --new 256 --temperature 0 --hf   # GPT-2 small vs transformers

A config's model (default configs/shakespeare_4x128.py, vocab 85) with random
weights continues a random prompt of --prompt tokens by --new tokens. Rounds
alternate between the samplers, so that machine noise hits both alike; times
are medians over rounds, after a warm-up call that compiles. Reported per
batch size: tokens/s of each (new tokens, prefill included), their ratio,
wall and CPU seconds per round, and for the cached sampler the time per token
of the last 64 new tokens over that of the first 64 (a cache that grows
would make it > 1).

--hf times `GPT2LMHeadModel.generate` of transformers (PyTorch, eager, its
KV cache; not a project dependency) on a GPT-2 of the same shape and random
weights instead of the uncached reference: greedy when --temperature is 0,
sampling otherwise, never stopping early.
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.train_throughput import load_config
from model import GPT, generate, generate_uncached
from trainer import config as config_lib


def _timed(fn) -> tuple[float, float, object]:
  """(wall seconds, CPU seconds of this process, fn's result)."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return time.perf_counter() - wall, time.process_time() - cpu, out


def _cached(model, params, prompts, new_tokens, temperature):
  """run() -> seconds per token over the first 64 and the last 64."""
  def run():
    stamps = []
    generate(model, params, prompts, jax.random.key(0),
             max_new_tokens=new_tokens, temperature=temperature,
             on_token=lambda *_: stamps.append(time.perf_counter()))
    return (stamps[64] - stamps[0]) / 64, (stamps[-1] - stamps[-65]) / 64
  return run


def _uncached(model, params, prompts, new_tokens, temperature):
  def run():
    generate_uncached(model, params, prompts, jax.random.key(0),
                      max_new_tokens=new_tokens, temperature=temperature)
  return run


def _hf(cfg, prompts, new_tokens, temperature):
  """transformers' GPT-2 of cfg's shape, random weights, generating."""
  try:
    import torch
    import transformers
  except ImportError:
    sys.exit("error: --hf needs PyTorch and transformers (pip install torch "
             "transformers); they are not project dependencies")
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model,
      n_layer=cfg.num_layers, n_head=cfg.num_heads)).eval()
  tokens = torch.as_tensor(np.asarray(prompts), dtype=torch.long)
  sampling = (dict(do_sample=False) if temperature == 0 else
              dict(do_sample=True, temperature=temperature, top_k=0))

  def run():
    with torch.inference_mode():
      model.generate(tokens, attention_mask=torch.ones_like(tokens),
                     max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     use_cache=True, pad_token_id=0, **sampling)
  return run


def _parse_args():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="configs/shakespeare_4x128.py")
  p.add_argument("--vocab", type=int, default=85)
  p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
  p.add_argument("--new", type=int, default=512,
                 help="new tokens (at least 65)")
  p.add_argument("--temperature", type=float, default=0.8,
                 help="0: greedy")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--hf", action="store_true",
                 help="against transformers' generate, not the uncached "
                 "reference")
  args = p.parse_args()
  if args.new < 65:
    p.error("--new must be at least 65: the first and last 64 are timed")
  return args


def _time_batch(model, params, prompts, args) -> dict:
  """One batch size's rounds, alternating the cached sampler and the
  other one; their medians and ratio."""
  other_name = "hf" if args.hf else "uncached"
  cached = _cached(model, params, prompts, args.new, args.temperature)
  other = (_hf(model.cfg, prompts, args.new, args.temperature) if args.hf
           else _uncached(model, params, prompts, args.new, args.temperature))
  cached()  # compile, warm up
  other()
  rounds = {"cached": [], other_name: []}
  per_token = []
  for _ in range(args.rounds):
    wall, cpu, first_last = _timed(cached)
    rounds["cached"].append((wall, cpu))
    per_token.append(first_last)
    rounds[other_name].append(_timed(other)[:2])
  tokens = len(prompts) * args.new
  out = {}
  for name, times in rounds.items():
    wall = statistics.median(w for w, _ in times)
    out[f"{name}_tokens_per_sec"] = round(tokens / wall, 1)
    out[f"{name}_wall_s"] = round(wall, 3)
    out[f"{name}_cpu_s"] = round(statistics.median(c for _, c in times), 3)
  out[f"cached_over_{other_name}"] = round(
      out["cached_tokens_per_sec"] / out[f"{other_name}_tokens_per_sec"], 3)
  first = statistics.median(f for f, _ in per_token)
  last = statistics.median(l for _, l in per_token)
  out.update({"cached_ms_per_step_first_64": round(1e3 * first, 3),
              "cached_ms_per_step_last_64": round(1e3 * last, 3),
              "last_64_over_first_64": round(statistics.median(
                  l / f for f, l in per_token), 3)})
  return out


def main():
  args = _parse_args()
  cfg = config_lib.model_config(load_config(args.config), args.vocab)
  model = GPT(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(
      (1, cfg.seq_len), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  result = {"model": f"{cfg.num_layers}x{cfg.d_model}x{cfg.num_heads}, "
                     f"context {cfg.seq_len}, vocab {cfg.vocab_size}",
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "prompt_tokens": args.prompt, "new_tokens": args.new,
            "temperature": args.temperature}
  for batch in args.batch:
    prompts = rng.integers(0, args.vocab, (batch, args.prompt))
    result[f"batch_{batch}"] = _time_batch(model, params, prompts, args)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
