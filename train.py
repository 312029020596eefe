"""Train, evaluate or sample a GPT: the one entry point.

  python train.py                                   # default config
  python train.py --config=configs/NAME.py --config.train.steps=500 --workdir=runs/x
  python train.py --mode=eval --workdir=runs/x      # evaluate the latest checkpoint
  python train.py --mode=sample --workdir=runs/x --config.sample.prompt="ROMEO:"
  python train.py --mode=next --workdir=runs/x --config.sample.prompt="To be or"
  python train.py --mode=eval --workdir=runs/x --config.data.source=DIR --json
  python train.py --mode=export --workdir=runs/x    # params only, to runs/x/export
  python train.py --mode=cooldown --workdir=runs/x --config.cooldown.from_step=800 \
      --config.cooldown.steps=200                   # a wsd run's checkpoint, decayed
  python train.py --num_processes=2 --process_id=0 --coordinator_address=127.0.0.1:PORT ...
                                                    # one process of several (launch/)
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import errors
import layout


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
    "mode", "train", ["train", "eval", "sample", "next", "export",
                      "cooldown"],
    "What to do. eval scores the newest params on config.data.source (the "
    "run's, or any corpus prepared with its tokenizer); sample writes "
    "sample.num_samples samples; next lists the sample.top likeliest next "
    "tokens after the prompt; export writes the newest params alone (no "
    "optimizer state) to --export_dir, a directory that eval, sample and "
    "--config.checkpoint.init_from read like a run's workdir; cooldown "
    "branches a wsd run of --workdir at --config.cooldown.from_step into a "
    "run of its own that decays over --config.cooldown.steps. The modes "
    "other than train use the run's config.json: only the sections they "
    "read (eval, data, sample, cooldown) and mesh.* / perf.* come from "
    "--config.* flags.")
_JSON = flags.DEFINE_bool("json", False, "eval and next: print one JSON "
                          "object instead of text.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Where --mode=export writes (default: <workdir>/export).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks for user errors.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "cluster", "off"],
    "Joining a multi-process run (see docs/distributed.md). auto: when "
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
  """Runs the mode; a Stop (bad input, divergence, a failed write,
  preemption) ends it with one line and its exit status, a traceback only
  with --debug."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  return errors.command(_run, debug=_DEBUG.value)()


def _run():
  # Imported here so that absl has parsed the flags (Grain workers need them).
  from trainer import config as config_lib, distributed, loop, modes
  from trainer import saved_config

  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  if not os.path.isfile(config_file):
    _flag_error(FileNotFoundError(f"--config={config_file}: no such file; "
                                  "see configs/ for the configs there are"))
  config = _CONFIG.value
  config_name = os.path.splitext(os.path.basename(config_file))[0]
  workdir = _WORKDIR.value or os.path.join("runs", config_name)
  mode = _MODE.value
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value,
                         _NUM_PROCESSES.value, _PROCESS_ID.value)
  if mode == "train":
    loop.train(config, workdir)
    return
  run_config = saved_config.for_mode(
      saved_config.load_saved(workdir), config,
      config_flags.get_override_values(flags.FLAGS["config"]), mode,
      workdir)
  if mode == "cooldown":
    loop.train(*saved_config.cooldown_branch(run_config, config.cooldown,
                                             workdir))
  elif mode == "eval":
    result = modes.evaluate(run_config, workdir)
    _show(result, " ".join(f"{k}={v:.4f}" if isinstance(v, float) else
                           f"{k}={v}" for k, v in result.items()))
  elif mode == "sample":
    modes.sample(run_config, workdir)
  elif mode == "next":
    rows = modes.next_tokens(run_config, workdir)
    _show(rows, modes.next_table(config_lib.prompt_text(run_config), rows))
  else:
    modes.export(run_config, workdir,
                 _EXPORT_DIR.value or os.path.join(workdir, layout.EXPORT))


def _show(result, text: str) -> None:
  """A mode's result, as --json asks (process 0 only)."""
  import jax
  if jax.process_index() == 0:
    print(json.dumps(result) if _JSON.value else text)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      _flag_error(e)
    except (AttributeError, KeyError) as e:  # an unknown field of --config=FILE
      _flag_error(e, prefix="unknown config field ")
  app.run(main, flags_parser=parse_flags)
