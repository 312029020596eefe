"""Config sweeps: expand a spec into runs of train.py, run them as a local
queue or a SLURM job array, show their progress and collect their results.

  python -m launch.sweep run configs/sweeps/lr.py --parallel 2
  python -m launch.sweep status configs/sweeps/lr.py
  python -m launch.sweep collect configs/sweeps/lr.py   # results.csv, .json
  python -m launch.sweep slurm configs/sweeps/lr.py --dry-run

A spec is a Python file whose get_sweep() returns plain data:

  {"base": "configs/default.py",       # every run starts from it (repo root)
   "overrides": {"train.steps": 300,   # every run (optional)
                 "train.schedule": "wsd"},
   "axes": [                           # the runs: the product of the axes
     {"grid": {"model.d_model": [64, 128], "train.learning_rate": [1e-3]}},
     {"zip": {"model.num_layers": [2, 4], "model.num_heads": [2, 4]}},
     {"list": [{"train.batch_size": 16},
               {"train.batch_size": 32, "train.warmup_steps": 20}]},
     {"random": {"n": 8, "seed": 0, "fields": {
         "train.weight_decay": ["log_uniform", 1e-3, 1e-1],
         "train.b2": ["uniform", 0.9, 0.99],
         "model.dropout": ["choice", [0.0, 0.1]]}}},
     {"seeds": [0, 1, 2]}],            # train.seed
   "budgets": [1e13, 3e13],            # IsoFLOP: train.steps per run (optional)
   "cooldowns": [0.25, 0.5]}           # WSD cooldown branches (optional)

The first axis varies slowest; no axes is one run. grid takes the product of
its lists, zip their i-th values together, list the given overrides one by
one, random n draws seeded by `seed` (uniform; log_uniform: uniform in log
space; choice: one of the values), seeds sets train.seed. A field may be set
in one place only: by one axis or by `overrides` (two places are an error,
not a precedence rule: a silently overridden value is a wrong run). Every
run's config is built as train.py builds it (config_flags parsing of the same
flags) and checked (trainer.config.validate), and so is every cooldown
branch, before anything starts; a bad spec stops with one line `error: ...`,
exit status 2, and nothing written.

Each run is named by its swept values and a hash of its config as train.py
builds it (the base's contents and every override; checkpoint.keep_steps
left out): `d_model=64,learning_rate=0.001-3fa2c1`, with its workdir
<root>/<name> (root: --root, default runs/sweeps/<spec stem>). Editing a
spec's values or its base therefore starts new runs instead of continuing
old ones with another config, and train.py refuses to resume a workdir
with another config anyway. `run` and `status` name the folders under the
root that hold no run of the spec; one that holds a run's config under
another name (runs were once named by their base's path and overrides) is
named with the `mv` that keeps its training.

IsoFLOP designs: "budgets": [C1, C2, ...] (FLOPs) trains every run of the
axes once per budget, its train.steps = round(C / FLOPs per step), FLOPs
as run.json counts them (6 N D, docs/model.md, "FLOPs"); the budget is the last
swept value and results.csv's `budget` column (a branch's: its
fraction of it), from which research.scaling groups IsoFLOP profiles.

Cooldown branches (train.schedule="wsd"): for a run of T steps and
train.decay_fraction f, budget b trains to T_b = round(b * T) (Python's
round) with K = max(1, round(f * T_b)) decay steps from step S = T_b - K of
the run, in <run workdir>/cooldowns/<S>+<K>. The run keeps its checkpoints at
every such S (checkpoint.keep_steps, added to its overrides; not in its
name: a new budget adds checkpoints to the existing runs; one still
training saves them once resumed, a finished one has S only if it saved
there anyway, else that branch fails naming the missing checkpoint). A
branch starts once its run's checkpoint at S exists.

`run` restarts safely: the same command again skips done runs (their final
checkpoint exists), resumes interrupted ones and retries failed ones; a lock
in each workdir keeps two sweep processes off one run. See docs/sweeps.md.
"""

import argparse
import os

import errors
from errors import BadInput
from launch.sweep.queue import Queue
from launch.sweep.results import collect
from launch.sweep.slurm import slurm
from launch.sweep.spec import Sweep, _stray_lines, load
from launch.sweep.status import Metrics
from launch.sweep.table import Display, _counts, _rows, _table


def _command_run(sweep: Sweep, args) -> int:
  os.makedirs(sweep.root, exist_ok=True)
  done = sum(t.done() for t in sweep.tasks)
  branches = len(sweep.tasks) - len(sweep.runs)
  what = _count(len(sweep.runs), "run")
  if branches:
    what += " and " + _count(branches, "cooldown branch")
  print("\n".join([*_stray_lines(sweep), f"sweep {sweep.spec}: {what} in "
                   f"{sweep.root}; {done} done, up to {args.parallel} at a "
                   "time"]), flush=True)
  return Queue(sweep, args.parallel, args.retries, Display(sweep.tasks)).run()


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith('h') else 's'}"


def _command_status(sweep: Sweep, args) -> int:
  rows = _rows(sweep.tasks, {t.name: Metrics(t.workdir) for t in sweep.tasks})
  print("\n".join(_stray_lines(sweep) + _table(rows) + [_counts(rows)]))
  return 0


def _command_collect(sweep: Sweep, args) -> int:
  rows = collect(sweep)
  print(f"{len(rows)} rows ({sum(not r['partial'] for r in rows)} done) in "
        f"{os.path.join(sweep.root, 'results.csv')} and results.json")
  return 0


def _command_slurm(sweep: Sweep, args) -> int:
  return slurm(sweep, args.parallel, args.dry_run)


COMMANDS = {
    "run": (_command_run, "run the sweep here, a queue of train.py processes"),
    "status": (_command_status, "print the table of runs once"),
    "collect": (_command_collect,
                "write results.csv and results.json at the root"),
    "slurm": (_command_slurm, "write (and submit) SLURM job array scripts")}


@errors.command
def main(argv: list) -> int:
  parser = errors.ArgumentParser(
      prog="python -m launch.sweep", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  sub = {}
  for name, (_, text) in COMMANDS.items():
    sub[name] = commands.add_parser(name, help=text, description=text)
    sub[name].add_argument("spec", help="the sweep's spec file")
    sub[name].add_argument("--root", help="where the runs' workdirs go "
                           "(default: runs/sweeps/<spec file stem>)")
  sub["run"].add_argument("--parallel", type=int, default=1,
                          help="runs at a time")
  sub["run"].add_argument("--retries", type=int, default=1,
                          help="retries of a failed run per invocation")
  sub["slurm"].add_argument("--parallel", type=int, default=0,
                            help="array tasks at a time (0: no limit)")
  sub["slurm"].add_argument("--dry-run", action="store_true",
                            help="write the scripts, print the commands")
  args = parser.parse_args(argv)
  if args.command == "run" and (args.parallel < 1 or args.retries < 0):
    raise BadInput("--parallel must be at least 1 and --retries at least 0")
  if args.command == "slurm" and args.parallel < 0:
    raise BadInput("--parallel must be at least 0")
  return COMMANDS[args.command][0](load(args.spec, args.root), args)
