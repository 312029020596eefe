"""A run's saved config (<workdir>/config.json): written by train, read by
every other mode and by a resume (fields added since take values that keep
the run's behaviour); the config each mode and a resumed run use, and a
cooldown branch's."""

import json
import os

import ml_collections

import layout
from configs import base
from data import disk
from trainer import optim
from trainer.errors import ConfigError


# The sections each mode other than train takes from the command line; the
# rest of its config is the run's (config.json). The mesh and perf sections
# describe this machine: they always come from the command line.
MODE_SECTIONS = {"eval": ("eval", "data"), "sample": ("sample",),
                 "next": ("sample",), "export": (),
                 "cooldown": ("cooldown", "eval", "sample")}


def for_mode(saved, given, overrides: dict, mode: str, workdir: str
             ) -> ml_collections.ConfigDict:
  """The config --mode=MODE uses on the run in `workdir`: its saved config,
  this machine's mesh and perf (from `given`, the command line's config),
  and the overrides (--config.* flags given) of the sections the mode reads.
  An override of another field is refused, unless it equals the run's
  value: the model, data and training are the run's."""
  config = ml_collections.ConfigDict(saved.to_dict())
  config.mesh, config.perf = given.mesh, given.perf
  sections = MODE_SECTIONS[mode] + ("mesh", "perf")
  for field, value in overrides.items():
    section, name = field.split(".", 1)
    if section in sections:
      if section != "cooldown":  # cooldown_branch reads those
        config[section][name] = given[section][name]
    elif _plain(saved[section][name]) != _plain(value):
      raise ConfigError(
          f"--config.{field}={value!r} does not apply to --mode={mode}: it "
          f"uses the run's {field}={saved[section][name]!r} "
          f"({os.path.join(workdir, 'config.json')}); this mode takes "
          f"{', '.join(s + '.*' for s in sections)} from the command line")
  return config


# What a resumed run may change: its length, how it is evaluated,
# checkpointed, sampled, placed on this machine and fed (data workers), and
# where its files are (a moved workdir or data cache). Anything else would
# continue it as another run than the one its checkpoints hold.
RESUMABLE = ("train.steps", "eval", "checkpoint", "sample", "mesh", "perf",
             "data.num_workers", "data.cache_dir", "cooldown.workdir",
             "cooldown.parent")


# Fields a run keeps from its config.json whatever the command line says:
# its epoch order is the one it started with (data.loader.ORDER_VERSIONS).
KEPT_BY_THE_RUN = ("data.order_version",)


def as_the_run_keeps(config, workdir: str) -> ml_collections.ConfigDict:
  """`config` with the KEPT_BY_THE_RUN fields of the run in `workdir`, if
  one is there (a run saved before a field gets BEFORE_FIELD's value)."""
  if not os.path.exists(os.path.join(workdir, layout.CONFIG)):
    return config
  saved, config = load_saved(workdir), config.copy_and_resolve_references()
  for field in KEPT_BY_THE_RUN:
    section, name = field.split(".")
    config[section][name] = saved[section][name]
  return config


def check_resumable(config, workdir: str) -> None:
  """Refuses to resume the run in `workdir` with a config (as the run would
  use it) that differs from its config.json outside RESUMABLE."""
  if not os.path.exists(os.path.join(workdir, layout.CONFIG)):
    return
  run = load_saved(workdir)
  if eval_subset(run) != eval_subset(config):
    raise ConfigError(
        f"{workdir}'s evals score {_items(eval_subset(run))}; eval.max_batches"
        f"={config.eval.max_batches} and eval.batch_size="
        f"{config.eval.batch_size} would score {_items(eval_subset(config))}, "
        "and every eval of a run scores the same text; resume with the run's "
        "values (see its config.json) or train in a new --workdir")
  saved, given = _leaves(run.to_dict()), _leaves(config.to_dict())
  changed = [f for f, value in given.items()
             if not f.startswith(tuple(p + "." for p in RESUMABLE))
             and f not in RESUMABLE and _plain(saved.get(f)) != _plain(value)]
  if changed:
    what = ", ".join(f"{f} (the run's {saved.get(f)!r}, now {given[f]!r})"
                     for f in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    raise ConfigError(
        f"{workdir} holds a run of another config: {what}{more}; resume it "
        f"with the run's values (see {os.path.join(workdir, 'config.json')}) "
        "or train this config in a new --workdir")


def eval_subset(config) -> int:
  """How many validation items every eval of the run scores (0: all)."""
  return config.eval.max_batches * config.eval.batch_size


def _items(count: int) -> str:
  return f"{count} items of the validation split" if count else (
      "the whole validation split")


def _leaves(tree: dict, prefix: str = "") -> dict:
  """{dotted field: value} of a nested dict."""
  leaves = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      leaves.update(_leaves(value, f"{prefix}{key}."))
    else:
      leaves[f"{prefix}{key}"] = value
  return leaves


def _plain(value):
  """Tuples as lists, as config.json holds them."""
  return json.loads(json.dumps(value))


def save(config, workdir: str) -> None:
  with disk.replacing(os.path.join(workdir, layout.CONFIG)) as f:
    f.write(config.to_json(indent=1))


# Fields whose default changes what a run written before them computes, and
# the value that keeps it: what load_saved gives a config.json without them.
BEFORE_FIELD = {"model.vocab_multiple": 1, "train.schedule": "cosine",
                "data.order_version": 1}


def load_saved(workdir: str) -> ml_collections.ConfigDict:
  """A run's config.json; fields added to the code since it was written take
  their defaults, which keep its behaviour (BEFORE_FIELD's values where the
  default would not)."""
  path = os.path.join(workdir, layout.CONFIG)
  if not os.path.exists(path):
    raise ConfigError(f"{workdir!r} holds no trained run (no config.json); "
                      "train one there first with --mode=train")
  with open(path) as f:
    saved = json.load(f)
  defaults = base.get_config().to_dict()
  for field, value in BEFORE_FIELD.items():
    section, name = field.split(".")
    defaults[section][name] = value
  return ml_collections.ConfigDict(_merged(defaults, saved))


def _merged(defaults: dict, saved: dict) -> dict:
  merged = dict(defaults)
  for key, value in saved.items():
    merged[key] = (_merged(defaults[key], value)
                   if isinstance(defaults.get(key), dict) else value)
  return merged


def cooldown_branch(parent, cooldown, parent_workdir: str
                    ) -> tuple[ml_collections.ConfigDict, str]:
  """The config and workdir of a cooldown branch of the run in
  `parent_workdir` (config `parent`): its checkpoint at cooldown.from_step,
  then cooldown.steps steps of decay. The branch is a run of its own;
  nothing of the parent's changes."""
  t, start, steps = parent.train, cooldown.from_step, cooldown.steps
  if steps <= 0:
    raise ConfigError("--mode=cooldown needs --config.cooldown.steps=K > 0 "
                      "(the decay steps) and --config.cooldown.from_step=S")
  if parent.cooldown.steps > 0:
    raise ConfigError(f"{parent_workdir} is itself a cooldown branch; branch "
                      f"from its run, {parent.cooldown.parent}")
  if t.schedule == "cosine":
    raise ConfigError(
        f"{parent_workdir} was trained with train.schedule=cosine, which has "
        "no stable phase to branch from; train it with "
        "--config.train.schedule=wsd (or constant)")
  stable_end = optim.decay_phase(parent)[0]
  if not t.warmup_steps <= start <= stable_end:
    raise ConfigError(
        f"cooldown.from_step={start} is outside the stable phase of "
        f"{parent_workdir}: steps {t.warmup_steps} to {stable_end}")
  config = ml_collections.ConfigDict(parent.to_dict())
  config.train.steps = start + steps
  config.checkpoint.keep_steps = ()
  workdir = cooldown.workdir or layout.cooldown(parent_workdir, start, steps)
  config.cooldown.update(from_step=start, steps=steps, shape=cooldown.shape,
                         workdir=workdir,
                         parent=os.path.abspath(parent_workdir))
  return config, workdir
