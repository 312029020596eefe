"""SFT demonstration: a small character model learns "a+b=" from scratch.

  python -m benchmarks.sft_arithmetic            # both runs: 2 minutes on a quiet machine here
  python -m benchmarks.sft_arithmetic --only response

Every sum a + b of two numbers below 10^digits (10,000 for 2 digits) is an
example {"prompt": "a+b=", "response": "<a+b>"}, the numbers zero-padded to
a fixed width ("07+45=", "052"; --plain: "7+45=", "52"); 1,000 of them, drawn at
random, are held out (val.jsonl, data.holdout=('val',)) and never trained
on. Two runs of train.py with train.objective=sft, identical but for
train.sft_loss_on: "response" (the loss on the answer digits and the
closing end-of-text, the default) and "all" (on every token of the example,
the operands too, which no model can predict). Each run keeps a checkpoint
every --every steps; the exact match on the held-out sums (greedy decoding
from "a+b=" until end-of-text, the answer exactly right) is measured at
each. Wall times are train.py's own (startup, data preparation,
compilation, evals and checkpoints included), measured on a shared 2-core
CPU.
"""

import argparse
import json
import os
import random
import time

from benchmarks import posttrain


def texts(digits: int, padded: bool):
  """(prompt of a, b; answer of a, b): "7+45=", "52", or zero-padded to a
  fixed width, "07+45=", "052"."""
  if not padded:
    return (lambda a, b: f"{a}+{b}="), (lambda a, b: str(a + b))
  return ((lambda a, b: f"{a:0{digits}d}+{b:0{digits}d}="),
          (lambda a, b: f"{a + b:0{digits + 1}d}"))


def make_data(root: str, digits: int, held_out: int, seed: int,
              padded: bool):
  """train.jsonl and val.jsonl under root/data; the held-out (a, b)."""
  top = 10 ** digits
  pairs = [(a, b) for a in range(top) for b in range(top)]
  random.Random(seed).shuffle(pairs)
  val, train = pairs[:held_out], pairs[held_out:]
  prompt, answer = texts(digits, padded)
  example = lambda a, b: {"prompt": prompt(a, b), "response": answer(a, b)}
  posttrain.write_jsonl(os.path.join(root, "data", "train.jsonl"),
                        [example(a, b) for a, b in train])
  posttrain.write_jsonl(os.path.join(root, "data", "val.jsonl"),
                        [example(a, b) for a, b in val])
  return val


def overrides(root: str, args, loss_on: str) -> dict:
  return {
      "train.objective": "sft", "train.sft_loss_on": loss_on,
      "data.source": os.path.join(root, "data"), "data.holdout": ("val",),
      "data.cache_dir": os.path.join(root, "cache"),
      "model.num_layers": args.layers, "model.d_model": args.width,
      "model.num_heads": args.width // 32, "model.seq_len": 32,
      "train.batch_size": args.batch, "train.steps": args.steps,
      "train.learning_rate": args.lr, "train.warmup_steps": 50,
      "train.schedule": "cosine",
      "train.log_every_steps": 50,
      "eval.every_steps": args.every, "eval.max_batches": 0,
      "checkpoint.every_steps": args.every, "checkpoint.keep": 1000,
      "checkpoint.keep_best": False,
      "sample.prompt": texts(args.digits, not args.plain)[0](12, 34),
      "sample.max_new_tokens": args.digits + 3,
  }


def exact_match(completer, params, val, digits: int, padded: bool) -> float:
  prompt, answer = texts(digits, padded)
  made = completer.complete(params, [prompt(a, b) for a, b in val],
                            max_new_tokens=digits + 3)
  return sum(got == answer(a, b) for got, (a, b) in zip(made, val)) / len(val)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/bench/sft_arithmetic")
  p.add_argument("--only", choices=("response", "all"))
  p.add_argument("--digits", type=int, default=2)
  p.add_argument("--plain", action="store_true",
                 help="numbers as written (7+45=52), not zero-padded to a "
                 "fixed width (07+45=052)")
  p.add_argument("--held-out", type=int, default=1000)
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--every", type=int, default=200)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=5e-3)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  root = os.path.abspath(args.out)
  padded = not args.plain
  val = make_data(root, args.digits, args.held_out, args.seed, padded)
  log = os.path.join(root, "train.log")
  results = {"digits": args.digits, "zero_padded": padded,
             "held_out": len(val), "runs": {}}
  for loss_on in ([args.only] if args.only else ["response", "all"]):
    workdir = os.path.join(root, f"loss_on_{loss_on}")
    if os.path.exists(workdir):
      raise SystemExit(f"{workdir} exists; remove it or pick another --out")
    wall = posttrain.train_py(workdir, overrides(root, args, loss_on), log)
    curve = {}
    with posttrain.Completer(workdir) as completer:
      t = time.perf_counter()
      for step in completer.steps():
        curve[step] = exact_match(completer, completer.params(step), val,
                                  args.digits, padded)
      scoring = time.perf_counter() - t
    recs = posttrain.records(workdir)
    first = [r for r in recs if "first_step_time_s" in r][0]
    step_ms = [r["step_time_ms"] for r in recs if "step_time_ms" in r]
    final_eval = [r for r in recs if "eval_loss" in r][-1]
    results["runs"][loss_on] = {
        "train_py_wall_s": round(wall, 1),
        "first_step_s": round(first["first_step_time_s"], 1),
        "median_step_ms": round(sorted(step_ms)[len(step_ms) // 2], 1),
        "steps": args.steps, "exact_match_by_step": curve,
        "final_exact_match": curve[max(curve)],
        "first_step_at_95": min((s for s, v in curve.items() if v >= 0.95),
                                default=None),
        # over the held-out tokens the run's loss covers
        "final_eval_loss": round(final_eval["eval_loss"], 4),
        "scoring_s": round(scoring, 1)}
    print(json.dumps({loss_on: results["runs"][loss_on]}), flush=True)
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(f"\nheld-out exact match ({len(val)} sums a+b, a, b < "
        f"{10 ** args.digits}), by step:")
  steps = sorted({s for r in results["runs"].values()
                  for s in r["exact_match_by_step"]})
  print("loss on    " + "".join(f"{s:>8}" for s in steps) + "   wall (train.py)")
  for loss_on, r in results["runs"].items():
    print(f"{loss_on:<10} " + "".join(
        f"{r['exact_match_by_step'].get(s, float('nan')):>8.3f}" for s in steps)
        + f"   {r['train_py_wall_s']:.0f} s")


if __name__ == "__main__":
  main()
