"""A spec expanded into runs and cooldown branches, checked before anything
starts (the format: launch/sweep/cli.py's docstring, docs/sweeps.md)."""

import dataclasses
import importlib.util
import itertools
import math
import os
import random
import re
import shlex

import layout
from launch.local import REPO
from errors import BadInput
from launch.sweep.run_config import (_budget_steps, _canonical, _check_branch,
                                     _flags, _step_flops, config_digest)

BUDGET = "budget"    # the swept value of a spec's budgets


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
    return os.path.isdir(layout.checkpoint(self.workdir, self.steps))

  def ready(self) -> bool:
    return (self.parent is None or self.parent.done() or
            os.path.isdir(layout.checkpoint(self.parent.workdir,
                                            self.from_step)))


@dataclasses.dataclass
class Sweep:
  spec: str
  root: str
  runs: list           # the Tasks of the runs, in expansion order
  tasks: list          # each run followed by its branches
  fields: list         # the swept fields, in order of appearance


def load(spec_path: str, root: str | None = None) -> Sweep:
  """Expands and checks a spec; raises BadInput."""
  if not os.path.isfile(spec_path):
    raise BadInput(f"{spec_path}: no such file")
  module_spec = importlib.util.spec_from_file_location("sweep_spec", spec_path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    spec = module.get_sweep()
  except Exception as e:  # noqa: BLE001 - whatever the file does wrong
    raise BadInput(f"{spec_path}: {type(e).__name__}: {e}") from None
  stem = os.path.splitext(os.path.basename(spec_path))[0]
  root = os.path.abspath(root or os.path.join("runs", "sweeps", stem))
  try:
    return _expand(spec, spec_path, root)
  except BadInput as e:
    raise BadInput(f"{spec_path}: {e}") from None


def _expand(spec, spec_path: str, root: str) -> Sweep:
  base, overrides, points, swept_fields = _parse(spec)
  budgets = _budgets(spec.get("cooldowns", []))

  runs, tasks, names = [], [], {}
  labels = _short_names(swept_fields)
  for index, combination in enumerate(itertools.product(*points)):
    swept = {k: v for point in combination for k, v in point.items()}
    label = ", ".join(f"{labels[k]}={v!r}" for k, v in swept.items())
    where = f"run {index} ({label or 'no swept fields'})"
    flops_budget = swept.pop(BUDGET, None)
    values, config, digest, branch_points = _run_config(
        base, {**overrides, **swept}, flops_budget, budgets, where)
    swept = {k: values[k] for k in swept}
    if flops_budget:
      swept[BUDGET] = flops_budget
    name = _run_name(swept, labels, digest)
    if name in names:
      raise BadInput(f"runs {names[name]} and {index} have the same config "
                      f"({name}); make every run differ")
    names[name] = index
    workdir = os.path.join(root, name)
    step_flops = _step_flops(config)
    run = Task(name, workdir, [f"--config={base}", f"--workdir={workdir}",
                               *_flags(values)], config.train.steps, swept,
               cost=step_flops * config.train.steps, budget=flops_budget)
    runs.append(run)
    tasks.append(run)
    tasks.extend(_branches(run, config, budgets, branch_points, step_flops,
                           root, where))
  return Sweep(spec_path, root, runs, tasks,
               [f for f in swept_fields if f != BUDGET])


def _parse(spec) -> tuple:
  """(base, overrides, the points of each axis (the budgets' last), the
  swept fields), checked: each field is set in one place."""
  if not isinstance(spec, dict):
    raise BadInput("get_sweep() must return a dict")
  unknown = set(spec) - {"base", "overrides", "axes", "budgets",
                         "cooldowns"}
  if unknown:
    raise BadInput(f"unknown keys {sorted(unknown)}; a spec has base, "
                    "overrides, axes, budgets and cooldowns")
  base = spec.get("base")
  if not isinstance(base, str) or not os.path.isfile(
      os.path.join(REPO, base)):
    raise BadInput(f"base config {base!r} is not a file (a path relative to "
                    "the repository root, e.g. configs/default.py)")
  overrides = _fields(spec.get("overrides", {}), "overrides", allow_empty=True)
  axes = spec.get("axes", [])
  if not isinstance(axes, list):
    raise BadInput("axes must be a list")
  points = [_axis_points(axis, i) for i, axis in enumerate(axes)]
  owner = {field: "overrides" for field in overrides}
  for i, axis_points in enumerate(points):
    for field in dict.fromkeys(f for point in axis_points for f in point):
      if field in owner:
        raise BadInput(f"{field} is set by {owner[field]} and by axis {i}; "
                        "set each field in one place")
      owner[field] = f"axis {i}"
  flops_budgets = _flops_budgets(spec.get("budgets", []))
  if flops_budgets:
    if "train.steps" in owner:
      raise BadInput(f"train.steps is set by {owner['train.steps']} and by "
                      "budgets; set each field in one place")
    points.append([{BUDGET: c} for c in flops_budgets])
    owner[BUDGET] = "budgets"
  swept_fields = [f for f, where in owner.items() if where != "overrides"]
  return base, overrides, points, swept_fields


def _run_config(base: str, values: dict, flops_budget: float | None,
                budgets: list, where: str) -> tuple:
  """(values, config, digest, branch points) of a run: train.steps set by
  its FLOPs budget, if any, and checkpoint.keep_steps extended by its
  branches' starts after the digest is taken (a new budget adds checkpoints
  to a run, not another run)."""
  values, config = _canonical(base, values, where)
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
  return values, config, digest, branch_points


def _branches(run: Task, config, budgets: list, branch_points: list,
              step_flops: float, root: str, where: str) -> list:
  """The Tasks of a run's cooldown branches, each checked."""
  tasks = []
  for fraction, (from_step, steps) in zip(budgets, branch_points):
    branch = layout.cooldown(run.name, from_step, steps)
    cooldown = {"from_step": from_step, "steps": steps,
                "workdir": os.path.join(root, branch)}
    _check_branch(config, cooldown, run.workdir, f"{where}, {branch}")
    # The run's flags too: a branch takes the run's saved config, but the
    # mesh (and any cooldown.*) from its flags.
    tasks.append(Task(branch, cooldown["workdir"], [
        "--mode=cooldown", *run.args,
        *_flags({f"cooldown.{k}": v for k, v in cooldown.items()})],
        from_step + steps, run.swept, run, from_step, step_flops * steps,
        run.budget and run.budget * fraction))
  return tasks


def _flops_budgets(budgets) -> list:
  if not isinstance(budgets, list) or not all(
      isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0
      and math.isfinite(c) for c in budgets):
    raise BadInput("budgets must be a list of positive FLOP counts (each "
                    "run trains at each: an IsoFLOP design)")
  return [float(c) for c in budgets]


def _fields(mapping, where: str, allow_empty: bool = False) -> dict:
  """{dotted config field: value}, checked for shape only."""
  if not isinstance(mapping, dict) or not (mapping or allow_empty):
    raise BadInput(f"{where} must be a non-empty dict of config fields")
  for field in mapping:
    if not isinstance(field, str) or "." not in field:
      raise BadInput(f"{where}: {field!r} is not a dotted config field "
                      "such as train.learning_rate")
  return dict(mapping)


def _value_lists(mapping, where: str) -> dict:
  fields = _fields(mapping, where)
  for field, values in fields.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise BadInput(f"{where}: {field} needs a non-empty list of values")
  return fields


def _axis_points(axis, i: int) -> list:
  """The overrides an axis steps through: a list of {field: value}."""
  kinds = ("grid", "zip", "list", "random", "seeds")
  if not isinstance(axis, dict) or len(axis) != 1 or next(
      iter(axis)) not in kinds:
    raise BadInput(f"axis {i} must be a dict with one key of {kinds}")
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
      raise BadInput(f"{where}: lists of different lengths {lengths}")
    return [dict(zip(fields, values)) for values in zip(*fields.values())]
  if kind == "list":
    if not isinstance(body, list) or not body:
      raise BadInput(f"{where} needs a non-empty list of override dicts")
    return [_fields(point, where) for point in body]
  if kind == "random":
    return _random_points(body, where)
  if not isinstance(body, list) or not body or not all(
      isinstance(s, int) for s in body):
    raise BadInput(f"{where} needs a non-empty list of integer seeds")
  return [{"train.seed": seed} for seed in body]


def _random_points(body, where: str) -> list:
  """n draws from random.Random(seed), field after field: the same spec
  draws the same values on every machine and Python version."""
  if not isinstance(body, dict) or set(body) - {"n", "seed", "fields"}:
    raise BadInput(f"{where} needs a dict with n, seed and fields")
  n, seed = body.get("n"), body.get("seed", 0)
  if not isinstance(n, int) or n < 1 or not isinstance(seed, int):
    raise BadInput(f"{where}: n must be a positive integer and seed an "
                    "integer")
  fields = _fields(body.get("fields"), f"{where} fields")
  for field, law in fields.items():
    if not _is_law(law):
      raise BadInput(
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
    raise BadInput("cooldowns must be a list of budgets between 0 and 1 "
                    "(fractions of train.steps; 1 is the run itself)")
  return budgets


def _branch_points(config, budgets: list, where: str) -> list:
  """(from_step, decay steps) of each budget of a run."""
  t = config.train
  if t.schedule != "wsd":
    raise BadInput(f"{where}: cooldowns need train.schedule='wsd', not "
                    f"{t.schedule!r}")
  points = []
  for budget in budgets:
    total = round(budget * t.steps)
    steps = max(1, round(t.decay_fraction * total))
    if (total - steps, steps) in points:
      raise BadInput(f"{where}: cooldown budgets {budgets} give the same "
                      f"branch twice ({total - steps}+{steps})")
    points.append((total - steps, steps))
  return points


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
        os.path.join(workdir, layout.CONFIG)):
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
