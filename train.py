"""Train, evaluate or sample a GPT: the one entry point.

  python train.py                                   # default config
  python train.py --config=configs/NAME.py --config.train.steps=500 --workdir=runs/x
  python train.py --mode=eval --workdir=runs/x      # evaluate the latest checkpoint
  python train.py --mode=sample --workdir=runs/x --config.sample.prompt="ROMEO:"
  python train.py --mode=export --workdir=runs/x    # params only, to runs/x/export
  python train.py --mode=cooldown --workdir=runs/x --config.cooldown.from_step=800 \
      --config.cooldown.steps=200                   # a wsd run's checkpoint, decayed
  python train.py --num_processes=2 --process_id=0 --coordinator_address=127.0.0.1:PORT ...
                                                    # one process of several (launch/)
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags


def _flag_error(error: Exception, prefix: str = ""):
  """A bad flag or --config.* override: one line and exit 2."""
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]  # the KeyError inside ml_collections' AttributeError
  text = error.args[0] if isinstance(error, KeyError) else str(error)
  print("error: " + prefix + "; ".join(
      line.strip() for line in str(text).splitlines() if line.strip()),
        file=sys.stderr)
  sys.exit(2)


try:  # config_flags applies --config.* overrides while defining the flag
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/default.py", "Config file; override fields with "
      "--config.a.b=value.", lock_config=True)
except (AttributeError, KeyError) as e:  # an unknown field
  _flag_error(e, prefix="unknown config field ")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the run's config, metrics, checkpoints and samples "
    "go (default: runs/<config name>).")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sample", "export", "cooldown"],
    "What to do: export writes the newest params alone (no optimizer state) "
    "to --export_dir, a directory that eval, sample and "
    "--config.checkpoint.init_from read like a run's workdir; cooldown "
    "branches a wsd run of --workdir at --config.cooldown.from_step into a "
    "run of its own that decays over --config.cooldown.steps.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Where --mode=export writes (default: <workdir>/export).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks for user errors.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "cluster", "off"],
    "Joining a multi-process run (see launch/README.md). auto: when "
    "--num_processes (or JAX_NUM_PROCESSES) is given or this is one of several "
    "SLURM tasks; cluster: always, JAX detects the cluster (Cloud TPU, SLURM, "
    "Open MPI); off: never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (default: "
    "$JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (default: $JAX_PROCESS_ID).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here so that absl has parsed the flags (Grain workers need them).
  from data.corpus import DataError
  from trainer import config as config_lib, distributed, loop
  from trainer.errors import ConfigError, Diverged, Preempted

  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  if not os.path.isfile(config_file):
    _flag_error(FileNotFoundError(f"--config={config_file}: no such file; "
                                  "see configs/ for the configs there are"))
  config = _CONFIG.value
  config_name = os.path.splitext(os.path.basename(config_file))[0]
  workdir = _WORKDIR.value or os.path.join("runs", config_name)
  try:
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value,
                           _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _MODE.value == "train":
      loop.train(config, workdir)
    else:
      # The other modes rebuild the trained model from the run's saved
      # config; the mesh (this machine's) comes from flags, and so do eval
      # and sample, except in a cooldown branch: it continues the run.
      saved = config_lib.load_saved(workdir)
      saved.mesh = config.mesh
      if _MODE.value != "cooldown":
        saved.eval, saved.sample = config.eval, config.sample
      if _MODE.value == "cooldown":
        loop.train(*config_lib.cooldown_branch(saved, config.cooldown, workdir))
      elif _MODE.value == "eval":
        loop.evaluate(saved, workdir)
      elif _MODE.value == "sample":
        loop.sample(saved, workdir)
      else:
        loop.export(saved, workdir,
                    _EXPORT_DIR.value or os.path.join(workdir, "export"))
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except (ConfigError, DataError, Diverged) as e:
    if _DEBUG.value:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      _flag_error(e)
  app.run(main, flags_parser=parse_flags)
