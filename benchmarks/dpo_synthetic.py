"""DPO demonstration: a synthetic preference for sorting up, not down.

  python -m benchmarks.dpo_synthetic          # ~10 minutes here

A prompt is a string of 4 to 7 random digits and ">" ("4918>"); a response
lists its digits sorted, ascending ("1489") or descending ("9841"). Two runs
of train.py:

1. base (train.objective=sft): every training prompt once, with an
   ascending or a descending response at random (half each), so the base
   model sorts both ways about equally often;
2. dpo (train.objective=dpo, checkpoint.init_from=base, beta 0.1): pairs
   on the same prompts, the ascending response chosen, the descending one
   rejected; the reference is the base model.

Measured on prompts never trained on (--held-out of them): the held-out
reward accuracy (the share of pairs where the chosen response's implicit
reward beta * log(pi / pi_ref) beats the rejected one's), their margin, the
KL of the policy to the reference (per response token, and summed over a
response), all from the dpo run's final eval over every held-out pair; and
how the two models actually sort: greedy completions of the held-out
prompts, ascending, descending or neither. Wall times are train.py's own
(startup, preparation, compilation, evals, checkpoints included), on a
shared 2-core CPU.
"""

import argparse
import json
import os
import random

from benchmarks import posttrain


def make_data(root: str, train: int, held_out: int, seed: int):
  rng = random.Random(seed)
  prompts = set()
  while len(prompts) < train + held_out:
    prompts.add("".join(rng.choice("0123456789")
                        for _ in range(rng.randint(4, 7))))
  prompts = sorted(prompts)
  rng.shuffle(prompts)
  val, train_prompts = prompts[:held_out], prompts[held_out:]
  up = lambda p: "".join(sorted(p))
  down = lambda p: "".join(sorted(p, reverse=True))
  sft = lambda ps: [{"prompt": p + ">", "response": rng.choice([up, down])(p)}
                    for p in ps]
  pairs = lambda ps: [{"prompt": p + ">", "chosen": up(p),
                       "rejected": down(p)} for p in ps]
  for name, records in (("sft/train", sft(train_prompts)), ("sft/val", sft(val)),
                        ("dpo/train", pairs(train_prompts)),
                        ("dpo/val", pairs(val))):
    posttrain.write_jsonl(os.path.join(root, "data", name + ".jsonl"), records)
  return val


COMMON = {"model.num_layers": 2, "model.d_model": 128, "model.num_heads": 4,
          "model.seq_len": 32, "train.log_every_steps": 25,
          "data.holdout": ("val",), "checkpoint.keep_best": False,
          "sample.prompt": "3141>", "sample.max_new_tokens": 8}


def directions(completer, params, prompts) -> dict:
  made = completer.complete(params, [p + ">" for p in prompts],
                            max_new_tokens=9)
  up = sum(m == "".join(sorted(p)) for m, p in zip(made, prompts))
  down = sum(m == "".join(sorted(p, reverse=True)) for m, p in
             zip(made, prompts))
  n = len(prompts)
  return {"ascending": up / n, "descending": down / n,
          "neither": (n - up - down) / n}


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/bench/dpo_synthetic")
  p.add_argument("--train", type=int, default=6000)
  p.add_argument("--held-out", type=int, default=500)
  p.add_argument("--sft-steps", type=int, default=1000)
  p.add_argument("--dpo-steps", type=int, default=200)
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--dpo-lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  root = os.path.abspath(args.out)
  base, dpo = os.path.join(root, "base"), os.path.join(root, "dpo")
  for workdir in (base, dpo):
    if os.path.exists(workdir):
      raise SystemExit(f"{workdir} exists; remove it or pick another --out")
  val = make_data(root, args.train, args.held_out, args.seed)
  log = os.path.join(root, "train.log")
  cache = os.path.join(root, "cache")
  walls = {}
  walls["base"] = posttrain.train_py(base, {
      **COMMON, "train.objective": "sft",
      "data.source": os.path.join(root, "data", "sft"),
      "data.cache_dir": cache, "train.steps": args.sft_steps,
      "train.batch_size": 32, "train.learning_rate": 3e-3,
      "eval.every_steps": 250, "checkpoint.every_steps": 250}, log)
  walls["dpo"] = posttrain.train_py(dpo, {
      **COMMON, "train.objective": "dpo", "train.dpo_beta": args.beta,
      "data.source": os.path.join(root, "data", "dpo"),
      "data.cache_dir": cache, "checkpoint.init_from": base,
      "train.steps": args.dpo_steps, "train.batch_size": 32,
      "train.learning_rate": args.dpo_lr, "train.warmup_steps": 20,
      "train.min_lr_ratio": 0.1, "eval.every_steps": 50,
      "eval.max_batches": 4, "checkpoint.every_steps": 100}, log)
  recs = posttrain.records(dpo)
  final = [r for r in recs if "eval_loss" in r][-1]
  first = [r for r in recs if "loss" in r][0]
  behaviour = {}
  for name, workdir in (("base", base), ("dpo", dpo)):
    with posttrain.Completer(workdir) as completer:
      behaviour[name] = directions(
          completer, completer.params(completer.steps()[-1]), val)
  results = {
      "held_out_pairs": final["eval_pairs"], "beta": args.beta,
      "dpo_step_1_loss": first["loss"],
      "held_out": {k[len("eval_"):]: v for k, v in final.items()
                   if k.startswith("eval_")},
      "evals": [{k: r[k] for k in ("step", "eval_loss", "eval_reward_accuracy",
                                   "eval_reward_margin", "eval_kl_ref",
                                   "eval_kl_ref_sequence")}
                for r in recs if "eval_loss" in r],
      "greedy_completions_of_held_out_prompts": behaviour,
      "train_py_wall_s": {k: round(v, 1) for k, v in walls.items()}}
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
