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
import csv
import ctypes
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings

from absl import flags
from ml_collections import config_flags

from launch.local import REPO, exit_status
from trainer import workdir_lock
from trainer.workdir_lock import HEARTBEAT_S, HOST, STALE_S
from trainer.workdir_lock import read_json as _read_json
from trainer.workdir_lock import write_json as _write_json

LOCK = "sweep.lock"
STATE = "sweep_state.json"
BUDGET = "budget"    # the swept value of a spec's budgets
LOG = "sweep.log"
REDRAW_S = 2         # the live table on a terminal
SUMMARY_S = 60       # the summary line otherwise
PREEMPTED = 75       # train.py saved and stopped; the same command resumes
DETERMINISTIC = {2: "bad input", 3: "diverged"}  # retrying cannot help


class SpecError(Exception):
  """A bad spec or command line: reported as one line, exit status 2."""


# --- the spec: runs and their configs ----------------------------------------

@dataclasses.dataclass
class Task:
  """One train.py process of a sweep: a run, or a cooldown branch of one."""
  name: str            # its workdir relative to the sweep root
  workdir: str
  args: list           # train.py's arguments
  steps: int           # done once the checkpoint of this step exists
  swept: dict          # the values the axes chose (a branch: its run's)
  parent: "Task | None" = None
  from_step: int = 0   # a branch: the run's checkpoint it starts from
  cost: float = 0.0    # its training FLOPs, roughly: the queue's priority
  budget: float | None = None  # the FLOPs the spec's budgets designed

  @property
  def kind(self) -> str:
    return "cooldown" if self.parent else "run"

  def done(self) -> bool:
    return os.path.isdir(_checkpoint(self.workdir, self.steps))

  def ready(self) -> bool:
    return (self.parent is None or self.parent.done() or
            os.path.isdir(_checkpoint(self.parent.workdir, self.from_step)))


@dataclasses.dataclass
class Sweep:
  spec: str
  root: str
  runs: list           # the Tasks of the runs, in expansion order
  tasks: list          # each run followed by its branches
  fields: list         # the swept fields, in order of appearance


def _checkpoint(workdir: str, step: int) -> str:
  """Orbax renames a checkpoint into place only once it is committed."""
  return os.path.join(workdir, "checkpoints", str(step))


def load(spec_path: str, root: str | None = None) -> Sweep:
  """Expands and checks a spec; raises SpecError."""
  if not os.path.isfile(spec_path):
    raise SpecError(f"{spec_path}: no such file")
  module_spec = importlib.util.spec_from_file_location("sweep_spec", spec_path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    spec = module.get_sweep()
  except Exception as e:  # noqa: BLE001 - whatever the file does wrong
    raise SpecError(f"{spec_path}: {type(e).__name__}: {e}") from None
  stem = os.path.splitext(os.path.basename(spec_path))[0]
  root = os.path.abspath(root or os.path.join("runs", "sweeps", stem))
  try:
    return _expand(spec, spec_path, root)
  except SpecError as e:
    raise SpecError(f"{spec_path}: {e}") from None


def _expand(spec, spec_path: str, root: str) -> Sweep:
  if not isinstance(spec, dict):
    raise SpecError("get_sweep() must return a dict")
  unknown = set(spec) - {"base", "overrides", "axes", "budgets",
                         "cooldowns"}
  if unknown:
    raise SpecError(f"unknown keys {sorted(unknown)}; a spec has base, "
                    "overrides, axes, budgets and cooldowns")
  base = spec.get("base")
  if not isinstance(base, str) or not os.path.isfile(
      os.path.join(REPO, base)):
    raise SpecError(f"base config {base!r} is not a file (a path relative to "
                    "the repository root, e.g. configs/default.py)")
  overrides = _fields(spec.get("overrides", {}), "overrides", allow_empty=True)
  axes = spec.get("axes", [])
  if not isinstance(axes, list):
    raise SpecError("axes must be a list")
  points = [_axis_points(axis, i) for i, axis in enumerate(axes)]
  owner = {field: "overrides" for field in overrides}
  for i, axis_points in enumerate(points):
    for field in dict.fromkeys(f for point in axis_points for f in point):
      if field in owner:
        raise SpecError(f"{field} is set by {owner[field]} and by axis {i}; "
                        "set each field in one place")
      owner[field] = f"axis {i}"
  flops_budgets = _flops_budgets(spec.get("budgets", []))
  if flops_budgets:
    if "train.steps" in owner:
      raise SpecError(f"train.steps is set by {owner['train.steps']} and by "
                      "budgets; set each field in one place")
    points.append([{BUDGET: c} for c in flops_budgets])
    owner[BUDGET] = "budgets"
  swept_fields = [f for f, where in owner.items() if where != "overrides"]
  budgets = _budgets(spec.get("cooldowns", []))

  runs, tasks, names = [], [], {}
  labels = _short_names(swept_fields)
  for index, combination in enumerate(itertools.product(*points)):
    swept = {k: v for point in combination for k, v in point.items()}
    label = ", ".join(f"{labels[k]}={v!r}" for k, v in swept.items())
    where = f"run {index} ({label or 'no swept fields'})"
    flops_budget = swept.pop(BUDGET, None)
    values, config = _canonical(base, {**overrides, **swept}, where)
    if flops_budget:
      steps = _budget_steps(config, flops_budget)
      values, config = _canonical(base, {**values, "train.steps": steps},
                                  where)
    digest = config_digest(config)
    branch_points = _branch_points(config, budgets, where) if budgets else []
    if branch_points:
      keep = set(config.checkpoint.keep_steps) | {s for s, _ in branch_points}
      values, config = _canonical(
          base, {**values, "checkpoint.keep_steps": tuple(sorted(keep))},
          where)
    swept = {k: values[k] for k in swept}
    if flops_budget:
      swept[BUDGET] = flops_budget
    name = _run_name(swept, labels, digest)
    if name in names:
      raise SpecError(f"runs {names[name]} and {index} have the same config "
                      f"({name}); make every run differ")
    names[name] = index
    workdir = os.path.join(root, name)
    step_flops = _step_flops(config)
    run = Task(name, workdir, [f"--config={base}", f"--workdir={workdir}",
                               *_flags(values)], config.train.steps, swept,
               cost=step_flops * config.train.steps, budget=flops_budget)
    runs.append(run)
    tasks.append(run)
    for fraction, (from_step, steps) in zip(budgets, branch_points):
      branch = f"{name}/cooldowns/{from_step}+{steps}"
      cooldown = {"from_step": from_step, "steps": steps,
                  "workdir": os.path.join(root, branch)}
      _check_branch(config, cooldown, workdir, f"{where}, {branch}")
      # The run's flags too: a branch takes the run's saved config, but the
      # mesh (and any cooldown.*) from its flags.
      tasks.append(Task(branch, cooldown["workdir"], [
          "--mode=cooldown", *run.args,
          *_flags({f"cooldown.{k}": v for k, v in cooldown.items()})],
          from_step + steps, swept, run, from_step, step_flops * steps,
          flops_budget and flops_budget * fraction))
  return Sweep(spec_path, root, runs, tasks,
               [f for f in swept_fields if f != BUDGET])


def _step_flops(config) -> float:
  """A train step's FLOPs as run.json counts them (6 N per token, N the
  non-embedding parameters: the vocabulary, unknown before the data is
  read, does not count)."""
  from trainer import config as config_lib, metrics, objectives
  model = config_lib.model_config(config, 1)
  objective = config.train.objective
  return (metrics.flops_per_token(model, objective) *
          config.train.batch_size *
          objectives.tokens_per_row(objective, model.seq_len))


def _flops_budgets(budgets) -> list:
  if not isinstance(budgets, list) or not all(
      isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0
      and math.isfinite(c) for c in budgets):
    raise SpecError("budgets must be a list of positive FLOP counts (each "
                    "run trains at each: an IsoFLOP design)")
  return [float(c) for c in budgets]


def _budget_steps(config, flops: float) -> int:
  """The steps that spend `flops` (at least 1)."""
  return max(1, round(flops / _step_flops(config)))


def _fields(mapping, where: str, allow_empty: bool = False) -> dict:
  """{dotted config field: value}, checked for shape only."""
  if not isinstance(mapping, dict) or not (mapping or allow_empty):
    raise SpecError(f"{where} must be a non-empty dict of config fields")
  for field in mapping:
    if not isinstance(field, str) or "." not in field:
      raise SpecError(f"{where}: {field!r} is not a dotted config field "
                      "such as train.learning_rate")
  return dict(mapping)


def _value_lists(mapping, where: str) -> dict:
  fields = _fields(mapping, where)
  for field, values in fields.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise SpecError(f"{where}: {field} needs a non-empty list of values")
  return fields


def _axis_points(axis, i: int) -> list:
  """The overrides an axis steps through: a list of {field: value}."""
  kinds = ("grid", "zip", "list", "random", "seeds")
  if not isinstance(axis, dict) or len(axis) != 1 or next(
      iter(axis)) not in kinds:
    raise SpecError(f"axis {i} must be a dict with one key of {kinds}")
  kind, body = next(iter(axis.items()))
  where = f"axis {i} ({kind})"
  if kind == "grid":
    fields = _value_lists(body, where)
    return [dict(zip(fields, values))
            for values in itertools.product(*fields.values())]
  if kind == "zip":
    fields = _value_lists(body, where)
    lengths = {field: len(values) for field, values in fields.items()}
    if len(set(lengths.values())) > 1:
      raise SpecError(f"{where}: lists of different lengths {lengths}")
    return [dict(zip(fields, values)) for values in zip(*fields.values())]
  if kind == "list":
    if not isinstance(body, list) or not body:
      raise SpecError(f"{where} needs a non-empty list of override dicts")
    return [_fields(point, where) for point in body]
  if kind == "random":
    return _random_points(body, where)
  if not isinstance(body, list) or not body or not all(
      isinstance(s, int) for s in body):
    raise SpecError(f"{where} needs a non-empty list of integer seeds")
  return [{"train.seed": seed} for seed in body]


def _random_points(body, where: str) -> list:
  """n draws from random.Random(seed), field after field: the same spec
  draws the same values on every machine and Python version."""
  if not isinstance(body, dict) or set(body) - {"n", "seed", "fields"}:
    raise SpecError(f"{where} needs a dict with n, seed and fields")
  n, seed = body.get("n"), body.get("seed", 0)
  if not isinstance(n, int) or n < 1 or not isinstance(seed, int):
    raise SpecError(f"{where}: n must be a positive integer and seed an "
                    "integer")
  fields = _fields(body.get("fields"), f"{where} fields")
  for field, law in fields.items():
    if not _is_law(law):
      raise SpecError(
          f"{where}: {field}: {law!r} is not [\"uniform\", low, high], "
          "[\"log_uniform\", low, high] (0 < low) or [\"choice\", [values]]")
  rng = random.Random(seed)
  return [{field: _draw(rng, law) for field, law in fields.items()}
          for _ in range(n)]


def _is_law(law) -> bool:
  if not isinstance(law, (list, tuple)) or not law:
    return False
  if law[0] == "choice":
    return len(law) == 2 and isinstance(law[1], (list, tuple)) and bool(law[1])
  if law[0] not in ("uniform", "log_uniform") or len(law) != 3 or not all(
      isinstance(x, (int, float)) for x in law[1:]):
    return False
  low, high = law[1:]
  return low < high and (low > 0 or law[0] == "uniform")


def _draw(rng: random.Random, law):
  if law[0] == "choice":
    return law[1][rng.randrange(len(law[1]))]
  low, high = law[1:]
  if law[0] == "log_uniform":
    value = math.exp(rng.uniform(math.log(low), math.log(high)))
  else:
    value = rng.uniform(low, high)
  return min(max(value, low), high)  # rounding may step outside


def _budgets(budgets) -> list:
  if not isinstance(budgets, list) or not all(
      isinstance(b, (int, float)) and 0 < b < 1 for b in budgets):
    raise SpecError("cooldowns must be a list of budgets between 0 and 1 "
                    "(fractions of train.steps; 1 is the run itself)")
  return budgets


def _branch_points(config, budgets: list, where: str) -> list:
  """(from_step, decay steps) of each budget of a run."""
  t = config.train
  if t.schedule != "wsd":
    raise SpecError(f"{where}: cooldowns need train.schedule='wsd', not "
                    f"{t.schedule!r}")
  points = []
  for budget in budgets:
    total = round(budget * t.steps)
    steps = max(1, round(t.decay_fraction * total))
    if (total - steps, steps) in points:
      raise SpecError(f"{where}: cooldown budgets {budgets} give the same "
                      f"branch twice ({total - steps}+{steps})")
    points.append((total - steps, steps))
  return points


def _check_branch(config, cooldown: dict, run_workdir: str,
                  where: str) -> None:
  """Builds a branch's config as train.py --mode=cooldown does from the
  run's saved config (its warmup capped as the run caps it), and checks it:
  e.g. that it starts after the warmup."""
  from trainer import config as config_lib, saved_config
  from trainer.errors import ConfigError
  saved = config_lib.capped_warmup(config)[0]
  fields = config.cooldown.copy_and_resolve_references()
  fields.update(cooldown)
  try:
    config_lib.validate(saved_config.cooldown_branch(saved, fields,
                                                     run_workdir)[0])
  except ConfigError as e:
    raise SpecError(f"{where}: {e}") from None


def _tuples(value):
  """Lists in a spec are tuples in a config (config_flags has no lists)."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _flag_text(value) -> str:
  """The text config_flags parses back to `value`: tuples as quoted reprs,
  booleans in absl's spelling."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, tuple):
    return repr(value)
  return str(value)


def _flags(values: dict) -> list:
  return [f"--config.{field}={_flag_text(value)}"
          for field, value in values.items()]


def _config(base: str, values: dict, where: str):
  """The config train.py builds from --config=BASE and these overrides: the
  same flags through the same config_flags parsing, then checked."""
  from trainer import config as config_lib  # jax: only once a spec is read
  from trainer.errors import ConfigError
  argv = ["train.py", f"--config={os.path.join(REPO, base)}", *_flags(values)]
  flag_values = flags.FlagValues()
  try:
    with warnings.catch_warnings():  # config_flags' load_module()
      warnings.simplefilter("ignore", DeprecationWarning)
      holder = config_flags.DEFINE_config_file(
          "config", flag_values=flag_values, sys_argv=argv, lock_config=True)
      flag_values(argv)
    config = holder.value
  except (AttributeError, KeyError) as e:
    raise SpecError(
        f"{where}: unknown config field ({_first_line(e)})") from None
  except (flags.Error, TypeError, ValueError) as e:
    raise SpecError(f"{where}: {_first_line(e)}") from None
  try:
    config_lib.validate(config)
  except ConfigError as e:
    raise SpecError(f"{where}: {e}") from None
  return config


def _first_line(error: Exception) -> str:
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]  # the KeyError inside ml_collections' AttributeError
  return next((line.strip() for line in str(error).splitlines()
               if line.strip()), type(error).__name__)


def _canonical(base: str, values: dict, where: str):
  """(values, config): the values as train.py reads them (1 -> 1.0 in a
  float field), and its config. A value that does not read back as itself
  has the wrong type."""
  values = {field: _tuples(value) for field, value in values.items()}
  config = _config(base, values, where)
  canonical = {}
  for field, value in values.items():
    parsed = config
    for key in field.split("."):
      parsed = parsed[key]
    if parsed != value or (type(parsed) is bool) != (type(value) is bool):
      raise SpecError(f"{where}: {field}={value!r} reads back as {parsed!r}; "
                      "give a value of the field's type "
                      f"({type(parsed).__name__})")
    canonical[field] = parsed
  return canonical, config


def _short_names(fields: list) -> dict:
  """The last part of each dotted name, or all of it where that is
  ambiguous (train.batch_size beside eval.batch_size)."""
  last = [field.rsplit(".", 1)[-1] for field in fields]
  return {field: short if last.count(short) == 1 else field
          for field, short in zip(fields, last)}


def _run_name(swept: dict, labels: dict, digest: str) -> str:
  """Readable swept values (sanitized for file names, cut at 80 characters)
  and 6 hex digits of the config's digest."""
  readable = ",".join(
      f"{labels[field]}={format(v, '.4g') if isinstance(v, float) else v}"
      for field, v in swept.items()) or "run"
  readable = re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", readable)[:80]
  return f"{readable}-{digest[:6]}"


def config_digest(config) -> str:
  """The sha256 of a run's config as the run uses it (its config.json),
  checkpoint.keep_steps left out: cooldown budgets add checkpoints to a run,
  not another run."""
  from trainer import config as config_lib
  fields = config_lib.capped_warmup(config)[0].to_dict()
  fields["checkpoint"].pop("keep_steps", None)
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()
                        ).hexdigest()


def strays(sweep: Sweep) -> list:
  """(folder, run name or None) for each folder under the root that holds a
  run's config.json but is no run of the spec: a run of an edited spec, or
  one named before names hashed the config (then the run whose config it
  holds, if any, is named)."""
  from trainer import saved_config
  from trainer.errors import ConfigError
  names = {t.name for t in sweep.runs}
  by_digest = {t.name.rsplit("-", 1)[-1]: t.name for t in sweep.runs}
  found = []
  for folder in sorted(os.listdir(sweep.root) if os.path.isdir(sweep.root)
                       else ()):
    workdir = os.path.join(sweep.root, folder)
    if folder in names or not os.path.isfile(
        os.path.join(workdir, "config.json")):
      continue
    try:
      digest = config_digest(saved_config.load_saved(workdir))[:6]
    except (ValueError, ConfigError):  # not JSON, or not a config's
      digest = None
    found.append((folder, by_digest.get(digest)))
  return found


def _stray_lines(sweep: Sweep) -> list:
  """A note per stray folder that holds a run of the spec under an older
  name, and one naming the others."""
  lines, others = [], []
  for folder, run in strays(sweep):
    old, new = (os.path.join(sweep.root, f) for f in (folder, run or folder))
    if run and not os.path.exists(new):
      lines.append(f"note: {folder} holds the config of run {run} (named "
                   "before run names hashed the config); to keep its "
                   f"training: mv {shlex.quote(old)} {shlex.quote(new)}")
    else:
      others.append(folder)
  if others:
    lines.append(f"note: {len(others)} folder(s) in {sweep.root} hold runs "
                 f"this spec does not have: {', '.join(others)}")
  return lines


# --- what a workdir holds: lock, state, metrics ------------------------------

class Lock(workdir_lock.LockFile):
  """A sweep process's claim on a workdir: <workdir>/sweep.lock, JSON naming
  the owner (host, sweep_pid, child_pid, started) and a heartbeat (unix
  time) that the owner renews every HEARTBEAT_S. It is stale when its host is
  this one and neither pid is alive, or when its heartbeat is older than
  STALE_S (the only test for other hosts' locks)."""

  PIDS = ("sweep_pid", "child_pid")
  IDENTITY = ("host", "sweep_pid", "started")

  @classmethod
  def acquire(cls, workdir: str):
    """(lock or None, the lock found there, if any): None while a live
    owner holds it."""
    now = time.time()
    return cls.take(os.path.join(workdir, LOCK), {
        "host": HOST, "sweep_pid": os.getpid(), "child_pid": None,
        "started": now, "heartbeat": now})


def _held(workdir: str) -> bool:
  return Lock.holder(os.path.join(workdir, LOCK)) is not None


def _state(workdir: str) -> dict:
  """<workdir>/sweep_state.json: attempts, status, last_exit, last_error,
  wall_s (over all attempts)."""
  return _read_json(os.path.join(workdir, STATE)) or {}


STATUSES = ("queued", "running", "interrupted", "done", "failed")


def _status(task: Task, state: dict) -> str:
  """What the workdir says, whichever sweep process (or SLURM) ran it."""
  if task.done():
    return "done"
  if _held(task.workdir):
    return "running"
  if state.get("status") == "failed":
    return "failed"
  if state or os.path.isdir(os.path.join(task.workdir, "checkpoints")):
    return "interrupted"
  return "queued"


class Metrics:
  """The newest numbers and the evals of a run's metrics.jsonl, read
  incrementally; a resumed run rewrites the file (a new inode), which is then
  read afresh."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._reset(None)

  def _reset(self, inode) -> None:
    self._inode, self._offset = inode, 0
    self.step, self.loss, self.last_eval, self.evals = 0, None, {}, []
    self.speeds = []  # the logged tokens_per_sec

  def update(self) -> "Metrics":
    try:
      stat = os.stat(self.path)
    except FileNotFoundError:
      self._reset(None)
      return self
    if stat.st_ino != self._inode or stat.st_size < self._offset:
      self._reset(stat.st_ino)
    with open(self.path, "rb") as f:
      f.seek(self._offset)
      data = f.read(stat.st_size - self._offset)
    data = data[:data.rfind(b"\n") + 1]  # whole lines only
    self._offset += len(data)
    for line in data.splitlines():
      try:
        record = json.loads(line)
      except ValueError:  # cut short by a killed run
        continue
      self.step = max(self.step, record.get("step", 0))
      if "loss" in record:
        self.loss = record["loss"]
      if "tokens_per_sec" in record:
        self.speeds.append(record["tokens_per_sec"])
      if "eval_loss" in record:
        self.last_eval = record
        self.evals.append(record)
    return self


# --- the table ---------------------------------------------------------------

def _rows(tasks: list, metrics: dict) -> list:
  rows = []
  for task in tasks:
    state, m = _state(task.workdir), metrics[task.name].update()
    rows.append({"name": task.name, "status": _status(task, state),
                 "step": m.step, "steps": task.steps,
                 "from_step": task.from_step, "loss": m.loss,
                 "eval_loss": m.last_eval.get("eval_loss"),
                 "wall_s": state.get("wall_s")})
  return rows


def _duration(seconds) -> str:
  if seconds is None:
    return ""
  minutes, s = divmod(int(seconds), 60)
  hours, m = divmod(minutes, 60)
  return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{s}s"


def _number(x) -> str:
  return "" if x is None else f"{x:.4f}"


def _table(rows: list) -> list:
  width = max(len("run"), *(len(r["name"]) for r in rows))
  lines = [f"{'run':<{width}}  {'status':<11}  {'step/steps':>13}  "
           f"{'loss':>7}  {'eval loss':>9}  {'elapsed':>7}"]
  for r in rows:
    progress = f"{r['step']}/{r['steps']}"
    lines.append(f"{r['name']:<{width}}  {r['status']:<11}  {progress:>13}  "
                 f"{_number(r['loss']):>7}  {_number(r['eval_loss']):>9}  "
                 f"{_duration(r['wall_s']):>7}")
  return lines


def _counts(rows: list) -> str:
  counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
  return ", ".join(f"{n} {s}" for s, n in counts.items())


class Display:
  """On a terminal, the table redrawn in place every REDRAW_S with events
  scrolling above it; otherwise one line per event and a summary line every
  SUMMARY_S."""

  def __init__(self, tasks: list, out=sys.stdout):
    self.tasks, self.out, self.tty = tasks, out, out.isatty()
    self.metrics = {t.name: Metrics(t.workdir) for t in tasks}
    self.start = {n: m.update().step for n, m in self.metrics.items()}
    self.started = self.shown = time.monotonic()
    self.drawn = 0  # lines of the table on the terminal

  def event(self, text: str) -> None:
    self._erase()
    print(text, file=self.out, flush=True)
    if self.tty:
      self.update(force=True)

  def update(self, force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self.shown < (REDRAW_S if self.tty else SUMMARY_S):
      return
    self.shown = now
    rows = _rows(self.tasks, self.metrics)
    footer = f"{_counts(rows)}; ETA {self._eta(rows, now)}"
    if not self.tty:
      print(f"sweep: {footer}", file=self.out, flush=True)
      return
    columns, lines = shutil.get_terminal_size()
    shown, hidden = _fit(rows, lines - 3)
    table = _table(shown) + ([hidden] if hidden else []) + [footer]
    self._erase()
    print("\n".join(line[:columns - 1] for line in table), file=self.out,
          flush=True)
    self.drawn = len(table)

  def _erase(self) -> None:
    if self.drawn:
      self.out.write(f"\x1b[{self.drawn}F\x1b[J")
      self.drawn = 0

  def _eta(self, rows: list, now: float) -> str:
    """The steps left over the steps per second of this invocation."""
    done = sum(max(0, r["step"] - max(self.start[r["name"]], r["from_step"]))
               for r in rows)
    left = sum(r["steps"] - max(r["step"], r["from_step"]) for r in rows
               if r["status"] not in ("done", "failed"))
    if not left:
      return "0s"
    return _duration(left * (now - self.started) / done) if done else "?"


def _fit(rows: list, room: int) -> tuple:
  """(the rows a terminal has room for, the busiest first, in their order;
  a line counting the others, or None)."""
  if len(rows) <= room:
    return rows, None
  order = ("running", "failed", "interrupted", "queued", "done")
  keep = set(sorted(range(len(rows)), key=lambda i: order.index(
      rows[i]["status"]))[:max(room - 1, 0)])
  hidden = [r for i, r in enumerate(rows) if i not in keep]
  return ([r for i, r in enumerate(rows) if i in keep],
          f"... and {len(hidden)} more: {_counts(hidden)}")


# --- the local queue ---------------------------------------------------------

def _die_with_parent():
  """A preexec_fn (Linux) that has the kernel send the child SIGTERM when
  the sweep dies, even by SIGKILL: the child then saves its step like any
  preempted run. None elsewhere."""
  if not sys.platform.startswith("linux"):
    return None
  prctl = ctypes.CDLL(None, use_errno=True).prctl
  parent = os.getpid()

  def preexec():
    prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the sweep died before prctl took effect
      os.kill(os.getpid(), signal.SIGTERM)
  return preexec


class Attempt:
  """A train.py process of the queue, its output appended to
  <workdir>/sweep.log, and its entry in the task's state file."""

  def __init__(self, task: Task, lock: Lock):
    self.task, self.lock, self.stopped = task, lock, False
    self.state = {"attempts": 0, "wall_s": 0.0, **_state(task.workdir)}
    self.state["attempts"] += 1
    self.wall_before = self.state["wall_s"]
    self.started = time.monotonic()
    argv = [sys.executable, "train.py", *task.args]
    self.log = os.path.join(task.workdir, LOG)
    with open(self.log, "a") as log:
      log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt "
                f"{self.state['attempts']} on {HOST}: {shlex.join(argv)}\n")
      log.flush()
      self.log_start = log.tell()
      self.proc = subprocess.Popen(
          argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
          start_new_session=True,  # a terminal's Ctrl-C reaches the sweep only
          preexec_fn=_die_with_parent(),
          env={**os.environ, "TQDM_MININTERVAL": "10"})  # a readable log
    self.renew()

  def renew(self) -> bool:
    """Heartbeat and state; False if the lock was lost."""
    if not self.lock.renew(child_pid=self.proc.pid):
      return False
    self.save("running")
    return True

  def save(self, status: str, **exit_info) -> None:
    """The state file, unless the task has passed to another owner."""
    if not self.lock.ours():
      return
    self.state.update(status=status, **exit_info, wall_s=round(
        self.wall_before + time.monotonic() - self.started, 1))
    _write_json(os.path.join(self.task.workdir, STATE), self.state)

  def stop(self) -> None:
    if not self.stopped and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)  # train.py saves and exits 75
    self.stopped = True

  def error_line(self) -> str | None:
    """This attempt's `error: ...` line, else its last line of output."""
    with open(self.log, "rb") as f:
      f.seek(max(self.log_start, os.path.getsize(self.log) - 65536))
      text = f.read().decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [None])[-1]


class Queue:
  """Runs a sweep's tasks on this machine, `parallel` at a time, until each
  is done or has failed for this invocation."""

  def __init__(self, sweep: Sweep, parallel: int, retries: int, display):
    self.tasks, self.parallel, self.retries = sweep.tasks, parallel, retries
    self.display = display
    self.running = {}      # name -> Attempt
    self.failures = {}     # name -> failed attempts in this invocation
    self.finished = {}     # name -> "done" or "failed", for this invocation
    self.waiting_for = {}  # name -> the lock it waits on (said once)
    self.signals = []

  def run(self) -> int:
    """0 when every task is done, 1 if some failed, 75 when stopped by
    SIGINT / SIGTERM (the children saved; the same command continues)."""
    handler = lambda signum, frame: self.signals.append(signum)
    previous = {s: signal.signal(s, handler)
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      renewed = time.monotonic()
      while True:
        if self.signals:
          for attempt in self.running.values():
            attempt.stop()
        self._reap()
        if not self.signals:
          self._start()
        if time.monotonic() - renewed > HEARTBEAT_S:
          self._renew()
          renewed = time.monotonic()
        self.display.update()
        if not self.running and (self.signals or
                                 len(self.finished) == len(self.tasks)):
          break
        time.sleep(0.5)
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
    self.display.update(force=True)
    if self.signals:
      return PREEMPTED
    return 1 if "failed" in self.finished.values() else 0

  def _start(self) -> None:
    """Starts the costliest ready tasks first: a study's longest runs do not
    wait for the end while short branches fill the slots around them."""
    for task in sorted(self.tasks, key=lambda t: -t.cost):
      if len(self.running) >= self.parallel:
        return
      if task.name in self.running or task.name in self.finished:
        continue
      if task.done():
        self.finished[task.name] = "done"
      elif not task.ready():
        if self.finished.get(task.parent.name) == "failed":
          self.finished[task.name] = "failed"
          self.display.event(f"failed {task.name}: its run failed before "
                             f"step {task.from_step}")
      else:
        self._try_start(task)

  def _try_start(self, task: Task) -> None:
    os.makedirs(task.workdir, exist_ok=True)
    lock, found = Lock.acquire(task.workdir)
    if lock is None:
      if found and self.waiting_for.get(task.name) != found.get("started"):
        self.waiting_for[task.name] = found.get("started")
        self.display.event(f"waiting {task.name}: locked by {_owner(found)}")
      return
    if found:
      self.display.event(f"took over {task.name}: the lock of "
                         f"{_owner(found)} was stale")
    attempt = Attempt(task, lock)
    self.running[task.name] = attempt
    self.display.event(f"start {task.name} (attempt "
                       f"{attempt.state['attempts']})")

  def _reap(self) -> None:
    for name, attempt in list(self.running.items()):
      code = attempt.proc.poll()
      if code is not None:
        del self.running[name]
        self._end(attempt, exit_status(code))
        attempt.lock.release()

  def _end(self, attempt: Attempt, code: int) -> None:
    task, error = attempt.task, attempt.error_line()
    took = _duration(time.monotonic() - attempt.started)
    if task.done():
      attempt.save("done", last_exit=code, last_error=None)
      self.finished[task.name] = "done"
      m = Metrics(task.workdir).update()
      self.display.event(
          f"done {task.name} in {took}: loss {_number(m.loss)}, eval loss "
          f"{_number(m.last_eval.get('eval_loss'))}")
    elif attempt.stopped or code == PREEMPTED:
      attempt.save("interrupted", last_exit=code, last_error=error)
      self.display.event(
          f"{'stopped' if attempt.stopped else 'preempted'} {task.name} "
          f"(exit {code}) after {took}"
          f"{'' if attempt.stopped else '; requeued'}")
    else:
      self.failures[task.name] = self.failures.get(task.name, 0) + 1
      final = code in DETERMINISTIC or self.failures[task.name] > self.retries
      attempt.save("failed", last_exit=code, last_error=error)
      if final:
        self.finished[task.name] = "failed"
      reason = f": {DETERMINISTIC[code]}" if code in DETERMINISTIC else ""
      self.display.event(f"failed {task.name} (exit {code}{reason}) after "
                         f"{took}: {error}{'' if final else '; retrying'}")

  def _renew(self) -> None:
    for attempt in self.running.values():
      if not attempt.renew():
        attempt.stop()
        self.display.event(f"lost the lock of {attempt.task.name} (taken "
                           "over as stale); stopping it")


def _owner(lock: dict) -> str:
  return (f"{lock.get('host')} pid {lock.get('sweep_pid')} (train.py pid "
          f"{lock.get('child_pid')})")


# --- results -----------------------------------------------------------------

def results(sweep: Sweep) -> list:
  """One row per run and per cooldown branch, finished or not; parameters
  and FLOPs from the run.json train.py writes when a run starts."""
  rows = []
  for task in sweep.tasks:
    state, m = _state(task.workdir), Metrics(task.workdir).update()
    info = _read_json(os.path.join(task.workdir, "run.json")) or {}
    tokens = _times(info.get("tokens_per_step"), m.step)
    status = _status(task, state)
    best = min(m.evals, key=lambda r: r["eval_loss"], default={})
    rows.append({
        "name": task.name, "kind": task.kind,
        "parent": task.parent.name if task.parent else None,
        **{field: task.swept.get(field) for field in sweep.fields},
        "status": status, "partial": status != "done", "steps": m.step,
        "target_steps": task.steps, "tokens": tokens,
        # params is the N of scaling laws (non-embedding, Kaplan's) and
        # loss the final held-out loss: research.scaling fits this table.
        "params": info.get("params_non_embedding"),
        "params_total": info.get("params"),
        "flops": _times(info.get("flops_per_token"), tokens),
        "budget": task.budget,
        "loss": m.last_eval.get("eval_loss"),
        "eval_bits_per_byte": m.last_eval.get("eval_bits_per_byte"),
        "best_eval_loss": best.get("eval_loss"),
        "best_eval_bits_per_byte": best.get("eval_bits_per_byte"),
        "train_loss": m.loss,
        # The median training speed (compilation, evals and checkpoints
        # left out).
        "tokens_per_sec": statistics.median(m.speeds) if m.speeds else None,
        "code": (info.get("code") or {}).get("commit"),
        "wall_s": state.get("wall_s"), "workdir": task.workdir})
  return rows


def _times(per_unit, units):
  """None where either is unknown (a run that has not started)."""
  return None if per_unit is None or units is None else per_unit * units


def collect(sweep: Sweep) -> list:
  """Writes results.csv and results.json at the sweep root."""
  rows = results(sweep)
  os.makedirs(sweep.root, exist_ok=True)
  path = os.path.join(sweep.root, "results.csv")
  with open(path + ".tmp", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  os.replace(path + ".tmp", path)
  _write_json(os.path.join(sweep.root, "results.json"), rows)
  return rows


# --- SLURM -------------------------------------------------------------------

def _sbatch_resources() -> list:
  """launch/slurm.sbatch's #SBATCH lines (nodes, GPUs, time: edited there
  for a cluster), without those an array script sets itself."""
  with open(os.path.join(REPO, "launch", "slurm.sbatch")) as f:
    return [line.rstrip("\n") for line in f if line.startswith("#SBATCH")
            and not re.match(r"#SBATCH --(job-name|output|array)\b", line)]


def array_script(tasks: list, job_name: str, what: str, root: str,
                 parallel: int) -> str:
  """A job array whose task i runs tasks[i] through launch/slurm.sbatch (so
  each may span several nodes); one already done exits at once."""
  cases = "\n".join(
      f"  {i}) final={shlex.quote(_checkpoint(t.workdir, t.steps))}\n"
      f"     args=({shlex.join(t.args)}) ;;" for i, t in enumerate(tasks))
  limit = f"%{parallel}" if parallel else ""
  return "\n".join([
      "#!/bin/bash",
      f"# The {what}, written by python -m launch.sweep slurm:",
      "# array task i runs the i-th through launch/slurm.sbatch.",
      f"#SBATCH --job-name={job_name}", *_sbatch_resources(),
      f"#SBATCH --array=0-{len(tasks) - 1}{limit}",
      f"#SBATCH --output={root}/slurm-%A_%a.out",
      "set -euo pipefail",
      f"cd {shlex.quote(REPO)}",
      f"export PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}",
      "case $SLURM_ARRAY_TASK_ID in", cases,
      '  *) echo "no task $SLURM_ARRAY_TASK_ID in this array" >&2; exit 2 ;;',
      "esac",
      'if [[ -d $final ]]; then echo "done already: $final"; exit 0; fi',
      'exec bash launch/slurm.sbatch "${args[@]}"', ""])


def slurm(sweep: Sweep, parallel: int, dry_run: bool) -> int:
  """Writes <root>/sweep.sbatch (the runs) and, with cooldowns,
  <root>/cooldowns.sbatch (once the first has succeeded); submits them or,
  with dry_run, prints how."""
  if not dry_run and not shutil.which("sbatch"):
    raise SpecError("sbatch not found on PATH; with --dry-run the scripts "
                    "are written and the submit commands printed")
  stem = os.path.splitext(os.path.basename(sweep.spec))[0]
  arrays = [("sweep", sweep.runs, "runs")]
  branches = [t for t in sweep.tasks if t.parent]
  if branches:
    arrays.append(("cooldowns", branches, "cooldown branches"))
  os.makedirs(sweep.root, exist_ok=True)
  job = "<job id of the first>"
  for i, (name, tasks, what) in enumerate(arrays):
    path = os.path.join(sweep.root, f"{name}.sbatch")
    with open(path, "w") as f:
      f.write(array_script(tasks, f"{stem}-{name}",
                           f"{len(tasks)} {what} of {sweep.spec}",
                           sweep.root, parallel))
    command = ["sbatch", *([f"--dependency=afterok:{job}"] if i else []), path]
    if dry_run:
      print(shlex.join(command))
      continue
    submitted = subprocess.run([command[0], "--parsable", *command[1:]],
                               capture_output=True, text=True)
    if submitted.returncode:
      print(f"error: {shlex.join(command)}: {submitted.stderr.strip()}",
            file=sys.stderr)
      return submitted.returncode
    job = submitted.stdout.strip().split(";")[0]  # "id" or "id;cluster"
    print(f"submitted job {job}: {shlex.join(command)}")
  return 0


# --- the command line --------------------------------------------------------

class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise SpecError(message)  # one line, like every other bad input


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


def main(argv: list) -> int:
  parser = _Parser(prog="python -m launch.sweep", description=__doc__,
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
  try:
    args = parser.parse_args(argv)
    if args.command == "run" and (args.parallel < 1 or args.retries < 0):
      raise SpecError("--parallel must be at least 1 and --retries at least 0")
    if args.command == "slurm" and args.parallel < 0:
      raise SpecError("--parallel must be at least 0")
    return COMMANDS[args.command][0](load(args.spec, args.root), args)
  except SpecError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
