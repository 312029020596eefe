"""DPO demonstration: a synthetic preference for sorting up, not down.

  python -m benchmarks.dpo_synthetic          # 2 minutes on a quiet machine here

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
KL of the policy to the reference per token at the chosen and at the
rejected responses' tokens, all from the dpo run's final eval over every
held-out pair; the KL on the policy's own responses (sampled at temperature
1: the mean of log pi(y|x) - log pi_ref(y|x)); and how the two models
actually sort: greedy completions of the held-out
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
          "train.schedule": "cosine",
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


def _parse_args():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/bench/dpo_synthetic")
  p.add_argument("--train", type=int, default=6000)
  p.add_argument("--held-out", type=int, default=500)
  p.add_argument("--sft-steps", type=int, default=1000)
  p.add_argument("--dpo-steps", type=int, default=100)
  p.add_argument("--every", type=int, default=25,
                 help="dpo: eval and keep a checkpoint every this many steps")
  p.add_argument("--beta", type=float, default=0.1)
  p.add_argument("--dpo-lr", type=float, default=3e-5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dpo-name", default="dpo",
                 help="the dpo run's workdir under --out; with a base run "
                 "already there (same --out), only the dpo run trains")
  return p.parse_args()


def _train(args, root: str, base: str, dpo: str) -> dict:
  """The base run (unless it is there already) and the dpo run from it;
  train.py's wall seconds of each run trained."""
  log = os.path.join(root, "train.log")
  cache = os.path.join(root, "cache")
  walls = {}
  if not os.path.exists(base):
    walls["base"] = posttrain.train_py(base, {
        **COMMON, "train.objective": "sft",
        "data.source": os.path.join(root, "data", "sft"),
        "data.cache_dir": cache, "train.steps": args.sft_steps,
        "train.batch_size": 32, "train.learning_rate": 3e-3,
        "eval.every_steps": 200, "eval.max_batches": 4,
        "checkpoint.every_steps": 200}, log)
  walls["dpo"] = posttrain.train_py(dpo, {
      **COMMON, "train.objective": "dpo", "train.dpo_beta": args.beta,
      "data.source": os.path.join(root, "data", "dpo"),
      "data.cache_dir": cache, "checkpoint.init_from": base,
      "train.steps": args.dpo_steps, "train.batch_size": 32,
      "train.learning_rate": args.dpo_lr, "train.warmup_steps": 10,
      "eval.every_steps": args.every, "eval.max_batches": 0,
      "checkpoint.every_steps": args.every, "checkpoint.keep": 1000}, log)
  return walls


def _by_step(base: str, dpo: str, val: list, recs: list) -> list:
  """The base model (step 0) and each kept dpo checkpoint on the held-out
  prompts: greedy directions, sampled KL and the dpo run's eval there."""
  evals = {r["step"]: r for r in recs if "eval_loss" in r}
  prompts = [p + ">" for p in val]
  from trainer import run as run_lib
  with posttrain.Completer(base) as completer:
    rows = [{"step": 0, **directions(
        completer, completer.params(completer.steps()[-1]), val),
             "reward_accuracy": 0.0, "kl_sampled": 0.0}]
  with posttrain.Completer(dpo) as completer:
    ref = run_lib.load_reference(completer.run, dpo)
    for step in completer.steps():
      params = completer.params(step)
      kl = completer.sampled_kl(params, ref, prompts, max_new_tokens=9)
      e = evals[step]
      rows.append({"step": step, **directions(completer, params, val),
                   "reward_accuracy": e["eval_reward_accuracy"],
                   "reward_margin": e["eval_reward_margin"],
                   "reward_chosen": e["eval_reward_chosen"],
                   "reward_rejected": e["eval_reward_rejected"],
                   "kl_sampled": kl["kl_sequence"],
                   "kl_sampled_per_token": kl["kl_per_token"],
                   "kl_ref_chosen": e["eval_kl_ref_chosen"],
                   "kl_ref_rejected": e["eval_kl_ref_rejected"],
                   "eval_loss": e["eval_loss"]})
  return rows


def _print_table(val: list, rows: list) -> None:
  print(f"\nheld-out prompts ({len(val)}): reward accuracy and KL to the "
        "reference (sampled responses, nats per response); greedy "
        "completions")
  print(f"{'step':>5} {'reward acc':>10} {'margin':>7} {'KL':>6} "
        f"{'ascending':>9} {'descending':>10} {'neither':>7}")
  for r in rows:
    print(f"{r['step']:>5} {r['reward_accuracy']:>10.3f} "
          f"{r.get('reward_margin', 0.0):>7.3f} {r['kl_sampled']:>6.3f} "
          f"{r['ascending']:>9.3f} {r['descending']:>10.3f} "
          f"{r['neither']:>7.3f}")


def main():
  args = _parse_args()
  root = os.path.abspath(args.out)
  base, dpo = os.path.join(root, "base"), os.path.join(root, args.dpo_name)
  if os.path.exists(dpo):
    raise SystemExit(f"{dpo} exists; remove it or pick another --dpo-name")
  val = make_data(root, args.train, args.held_out, args.seed)
  walls = _train(args, root, base, dpo)
  recs = posttrain.records(dpo)
  rows = _by_step(base, dpo, val, recs)
  results = {
      "held_out_prompts": len(val), "beta": args.beta,
      "dpo_learning_rate": args.dpo_lr, "dpo_steps": args.dpo_steps,
      "dpo_step_1_loss": [r for r in recs if "loss" in r][0]["loss"],
      "by_step": rows,
      "train_py_wall_s": {k: round(v, 1) for k, v in walls.items()}}
  with open(os.path.join(root, f"results_{args.dpo_name}.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps({k: v for k, v in results.items() if k != "by_step"}))
  _print_table(val, rows)


if __name__ == "__main__":
  main()
