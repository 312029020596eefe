"""A run's workdir: every file and folder that train.py and the tools around
it write there, named in this one place (docs/running.md says what each
holds).

  config.json               the run's config (trainer.saved_config)
  run.json                  sizes, FLOPs and code of the run (trainer.metrics)
  metrics.jsonl             a record per logged step and per eval
  tensorboard/              the same, as TensorBoard events
  checkpoints/<step>/       Orbax checkpoints (trainer.checkpoint)
  tokenizer/                the model's tokenizer (trainer.run)
  reference/                a dpo run's frozen reference params
  samples/step_<N>.txt      the text sampled at the end of training
  data_order.jsonl          the batches' example ids (trainer.audit)
  cooldowns/<from>+<steps>/ cooldown branches, each a workdir of its own
  export/                   --mode=export's params, a workdir to read
  workdir.lock              the training process's lock (trainer.workdir_lock)
  sweep.lock, sweep_state.json, sweep.log
                            a sweep's, while it runs train.py here
                            (launch.sweep)
"""

import os

CONFIG = "config.json"
RUN = "run.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
REFERENCE = "reference"
SAMPLES = "samples"
DATA_ORDER = "data_order.jsonl"
COOLDOWNS = "cooldowns"
EXPORT = "export"
LOCK = "workdir.lock"
SWEEP_LOCK = "sweep.lock"
SWEEP_STATE = "sweep_state.json"
SWEEP_LOG = "sweep.log"


def checkpoint(workdir: str, step: int) -> str:
  """Orbax renames a checkpoint into place only once it is committed: one
  that is there is whole."""
  return os.path.join(workdir, CHECKPOINTS, str(step))


def sample(workdir: str, step: int) -> str:
  return os.path.join(workdir, SAMPLES, f"step_{step}.txt")


def cooldown(workdir: str, from_step: int, steps: int) -> str:
  return os.path.join(workdir, COOLDOWNS, f"{from_step}+{steps}")
