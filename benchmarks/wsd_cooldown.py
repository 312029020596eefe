"""Many token budgets from one run: cooldown branches of a stable run against
cosine runs trained from scratch to each budget.

  python -m benchmarks.wsd_cooldown                       # the 4 x 128 model
  python -m benchmarks.wsd_cooldown --budgets 100 200 --root /tmp/wsd

A stable run (`train.schedule=constant`) trains to the last branch point and
keeps a checkpoint at each; from each, `--mode=cooldown` decays over
`--decay_fraction` of the budget (the 1-sqrt shape) to the budget's step. A
cosine run from scratch trains each budget. All runs share the config, seed
and data order; each ends with a full held-out eval. Prints a table of
held-out losses and the steps each family cost. Runs live under --root and
a second invocation resumes or reuses them.
"""

import argparse
import json
import os

from absl import flags

import layout
from configs import shakespeare_4x128
from trainer import loop, saved_config


def branch_points(budgets, decay_fraction):
  """(from_step, decay steps) of each budget's branch."""
  points = []
  for budget in budgets:
    steps = max(1, round(decay_fraction * budget))
    points.append((budget - steps, steps))
  return points


def _final_eval(workdir):
  """The held-out loss of the run's last eval (on the whole split)."""
  with open(os.path.join(workdir, layout.METRICS)) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if "eval_loss" in r][-1]["eval_loss"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--budgets", type=int, nargs="+",
                      default=[300, 600, 900, 1200])
  parser.add_argument("--decay_fraction", type=float, default=0.2)
  parser.add_argument("--root", default="runs/bench_wsd")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # loop.train runs without absl's app.run

  base = shakespeare_4x128.get_config()
  base.sample.max_new_tokens = 100
  base.eval.every_steps = max(args.budgets)  # the final eval only
  points = branch_points(args.budgets, args.decay_fraction)

  stable = base.copy_and_resolve_references()
  stable.train.update(schedule="constant", steps=max(s for s, _ in points))
  stable.checkpoint.keep_steps = tuple(sorted({s for s, _ in points}))
  stable_dir = os.path.join(args.root, "stable")
  loop.train(stable, stable_dir)
  saved = saved_config.load_saved(stable_dir)
  rows = []
  for budget, (start, steps) in zip(args.budgets, points):
    cooldown = base.cooldown.copy_and_resolve_references()
    cooldown.update(from_step=start, steps=steps)
    branch, branch_dir = saved_config.cooldown_branch(saved, cooldown,
                                                      stable_dir)
    loop.train(branch, branch_dir)
    cosine = base.copy_and_resolve_references()
    cosine.train.steps = budget
    cosine_dir = os.path.join(args.root, f"cosine_{budget}")
    loop.train(cosine, cosine_dir)
    rows.append((budget, start, steps, _final_eval(branch_dir),
                 _final_eval(cosine_dir)))

  family = stable.train.steps + sum(steps for _, steps in points)
  from_scratch = sum(args.budgets)
  print(f"\n{'budget':>7} {'branch from':>12} {'decay':>6} "
        f"{'branch loss':>12} {'cosine loss':>12} {'difference':>11}")
  for budget, start, steps, branch_loss, cosine_loss in rows:
    print(f"{budget:>7} {start:>12} {steps:>6} {branch_loss:>12.4f} "
          f"{cosine_loss:>12.4f} {branch_loss - cosine_loss:>+11.4f}")
  print(f"steps: stable run {stable.train.steps} + branches "
        f"{family - stable.train.steps} = {family}; cosine runs "
        f"{from_scratch}; the family costs {family / from_scratch:.0%}")


if __name__ == "__main__":
  main()
