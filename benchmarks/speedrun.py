"""Time to a target held-out loss on the built-in corpus: the speedrun.

  python -m benchmarks.speedrun                         # the default config
  python -m benchmarks.speedrun --seeds 2 --target 1.583
  python -m benchmarks.speedrun --config=configs/speedrun.py --seeds 2
  python -m benchmarks.speedrun --set model.norm=rmsnorm train.steps=2400

Trains the config (with --set's overrides) as a user does, `python train.py`,
one workdir per seed (train.seed 0, 1, ...) under --root, evaluating the whole
validation split every --every steps. For each seed it reports the training
time until the held-out loss first reaches --target: wall and CPU seconds of
the steps alone (the loop's train_time_s and train_cpu_time_s:
compilation, evals and saves left out; the evals' time is reported apart),
with the steps and tokens; then the final loss and the whole process's wall
time. Over seeds: the mean and the spread (min to max). The default target,
1.583 nats per character, is the held-out loss of a counted 6-gram with
plain Kneser-Ney smoothing (`python -m research.ngram`; docs/ngram.md).

Losses are nats per byte of held-out text (eval_bits_per_byte * ln 2),
whatever the tokenizer: per character on the built-in corpus, which is
ASCII: a character model's eval_loss (but for its end-of-text targets,
which spell no byte: ~1e-5 here), and a BPE model's on the same text.

A workdir is named by the config's file name and a hash of its fields, the
overrides and --every, so that a second invocation of the same config reuses
finished runs and resumes unfinished ones (a resumed run's clock starts
again, so its seed is reported as not timed), and an edited config trains
anew.
"""

import argparse
import hashlib
import json
import math
import os
import statistics
import sys

from benchmarks import posttrain
from benchmarks.train_throughput import load_config

TARGET = 1.583  # nats/char: the plain Kneser-Ney 6-gram's (docs/ngram.md)


def _parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/default.py")
  p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                 help="config overrides, e.g. train.steps=2400")
  p.add_argument("--target", type=float, default=TARGET,
                 help="held-out loss to reach, nats per byte")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--every", type=int, default=200,
                 help="steps between evals of the whole validation split")
  p.add_argument("--root", default="runs/speedrun")
  args = p.parse_args()
  for override in args.set:
    if "=" not in override:
      p.error(f"--set {override!r}: give KEY=VALUE, e.g. train.steps=2400")
  return args


def workdir(args, seed: int) -> str:
  """<root>/<config>-<hash of its fields and the overrides>/seed_<seed>."""
  name = os.path.splitext(os.path.basename(args.config))[0]
  key = json.dumps([load_config(args.config).to_json(), args.set, args.every])
  digest = hashlib.sha256(key.encode()).hexdigest()[:8]
  return os.path.join(args.root, f"{name}-{digest}", f"seed_{seed}")


def nats_per_byte(record: dict) -> float:
  """An eval record's held-out loss per byte of text, in nats."""
  return record["eval_bits_per_byte"] * math.log(2)


def time_to_target(records: list[dict], target: float) -> dict:
  """A run's numbers from its metrics.jsonl records: the first eval at or
  below `target` and the training clock at its step (None: never reached),
  the final eval, and the evals' time. The clock restarts in a resumed run:
  it is then not timed (a ValueError)."""
  steps = {r["step"]: r for r in records if "loss" in r}
  if not all({"train_time_s", "train_cpu_time_s"} <= set(r)
             for r in steps.values()):
    raise ValueError("its metrics.jsonl has no training clock (train_time_s "
                     "and train_cpu_time_s); remove its workdir and run it "
                     "again")
  clock = [r["train_time_s"] for _, r in sorted(steps.items())]
  if clock != sorted(clock):
    raise ValueError("the run was resumed, so its clock restarted; remove "
                     "its workdir and run it again")
  evals = [r for r in records if "eval_loss" in r]
  if not evals:
    raise ValueError("the run logged no eval")
  if not all("eval_bits_per_byte" in r for r in evals):
    raise ValueError("its evals have no eval_bits_per_byte (written before "
                     "it was logged); remove its workdir and run it again")
  out = {"final_step": evals[-1]["step"],
         "final_loss": nats_per_byte(evals[-1]),
         "eval_s": sum(r["eval_time_s"] for r in evals)}
  reached = next((r for r in evals if nats_per_byte(r) <= target), None)
  if reached is None:
    return {**out, "reached": False}
  at = steps[reached["step"]]
  return {**out, "reached": True, "step": reached["step"],
          "loss": nats_per_byte(reached), "tokens": at["tokens_seen"],
          "train_s": at["train_time_s"],
          "train_cpu_s": at["train_cpu_time_s"]}


def _run_seed(args, seed: int) -> dict:
  directory = os.path.abspath(workdir(args, seed))
  os.makedirs(directory, exist_ok=True)
  overrides = dict(o.split("=", 1) for o in args.set)
  overrides.update({"train.seed": seed, "eval.every_steps": args.every,
                    "eval.max_batches": 0, "train.log_every_steps": args.every})
  command = [f"--config={os.path.abspath(args.config)}"] + [
      f"--config.{k}={v}" for k, v in overrides.items()]
  process_s = posttrain.run_logged(  # its output: <workdir>/speedrun.log
      command + [f"--workdir={directory}"],
      os.path.join(directory, "speedrun.log"))
  try:
    result = time_to_target(posttrain.records(directory), args.target)
  except ValueError as e:
    sys.exit(f"error: {directory}: {e}")
  return {"seed": seed, "workdir": directory,
          "process_s": round(process_s, 1), **result}


def _summary(rows: list[dict]) -> dict:
  """Mean and spread over the seeds that reached the target."""
  reached = [r for r in rows if r["reached"]]
  out = {"seeds": len(rows), "reached": len(reached)}
  for key in ("train_s", "train_cpu_s", "step", "tokens"):
    values = [r[key] for r in reached]
    if values:
      out[key] = {"mean": round(statistics.fmean(values), 1),
                  "min": round(min(values), 1), "max": round(max(values), 1)}
  losses = [r["final_loss"] for r in rows]
  out["final_loss"] = {"mean": round(statistics.fmean(losses), 4),
                       "min": round(min(losses), 4),
                       "max": round(max(losses), 4)}
  return out


def _line(r: dict) -> str:
  head = f"seed {r['seed']}: "
  tail = (f"; final {r['final_loss']:.4f} at step {r['final_step']}, evals "
          f"{r['eval_s']:.0f} s, train.py {r['process_s']:.0f} s")
  if not r["reached"]:
    return head + "did not reach the target" + tail
  return head + (f"{r['loss']:.4f} at step {r['step']} ({r['tokens']:,} "
                 f"tokens) after {r['train_s']:.1f} s of training "
                 f"({r['train_cpu_s']:.1f} CPU s)") + tail


def main():
  args = _parse_args()
  print(f"speedrun: {args.config} {' '.join(args.set)} to held-out loss "
        f"<= {args.target}, evals every {args.every} steps", flush=True)
  rows = []
  for seed in range(args.seeds):
    rows.append(_run_seed(args, seed))
    print(_line(rows[-1]), flush=True)
  print(json.dumps({"config": args.config, "set": args.set,
                    "target": args.target, "runs": rows,
                    "summary": _summary(rows)}, indent=1))


if __name__ == "__main__":
  main()
