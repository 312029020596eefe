"""What train.py does with a trained run (or an exported or imported one):
eval, sample, next, export. Each rebuilds the model from the run's saved
config (trainer.saved_config.for_mode) and restores its newest params. They
only read the run's workdir (its checkpoints are opened read-only: a
trainer may be saving there), so they are safe beside a running job; export
writes to a directory of its own."""

import math
import os
import sys

import jax
import numpy as np

import layout
from data import tokenizers
from trainer import checkpoint, config as config_lib, metrics, saved_config
from trainer.errors import ConfigError
from trainer.run import (build, check_workdir, evaluate_params,
                         load_reference, log, run_info, sample_text)


def _newest_params(run):
  step, state = run.restore_latest(params_only=True)
  if step is None:
    raise ConfigError(f"no checkpoint under {run.checkpointer.directory}; "
                      "train first with --mode=train")
  return step, state.params


def evaluate(config, workdir: str) -> dict:
  """The newest params scored on the validation split of
  config.data.source (the run's own, or any corpus prepared with the
  model's tokenizer): the text the run's evals score (the whole split, or
  its eval.max_batches subset; --config.eval.max_batches=0 for all). A dpo
  run is scored against its reference params (<workdir>/reference)."""
  run = build(config, workdir, splits=("val",), read_only=True)
  with run.context():
    step, params = _newest_params(run)
    ref = load_reference(run, workdir) if run.uses_reference else None
    return {"step": step,
            **evaluate_params(run, params, config.eval.max_batches, ref),
            "data": run.data.path, "workdir": workdir}


def sample(config, workdir: str) -> list[str]:
  """sample.num_samples samples, each streamed to stdout as it is made."""
  run = build(config, workdir, splits=(), read_only=True)
  n = config.sample.num_samples
  texts = []
  with run.context():
    _, params = _newest_params(run)
    for i in range(n):
      if n > 1:
        _write(f"--- sample {i + 1} of {n} ---\n")
      _write(config_lib.prompt_text(config))
      texts.append(sample_text(run, params, index=i, stream=_write))
      _write("\n")
  return texts


def _write(text: str) -> None:
  """To the terminal at once (process 0)."""
  if jax.process_index() == 0:
    sys.stdout.write(text)
    sys.stdout.flush()


def next_tokens(config, workdir: str) -> list[dict]:
  """The sample.top most likely next tokens after the prompt (its last
  model.seq_len tokens), with their probabilities at temperature 1."""
  run = build(config, workdir, splits=(), read_only=True)
  tokenizer = run.tokenizer
  prompt = tokenizer.encode(config_lib.prompt_text(config))
  window = prompt[-run.model.cfg.seq_len:][None]
  with run.context():
    _, params = _newest_params(run)
    logits = run.model.apply({"params": params}, window)[0, -1]
  logprobs = np.asarray(jax.nn.log_softmax(logits))
  top = np.argsort(-logprobs, kind="stable")[:config.sample.top]
  return [{"rank": rank + 1, "id": int(i), "token": tokenizer.decode([i]),
           "probability": float(math.exp(logprobs[i]))}
          for rank, i in enumerate(top)]


def next_table(prompt: str, rows: list[dict]) -> str:
  """The classic table: each candidate next token and its probability."""
  lines = [f"after {prompt!r}:", f"{'rank':>4}  {'probability':>11}  token"]
  lines += [f"{r['rank']:>4}  {r['probability']:>11.4f}  {r['token']!r}"
            for r in rows]
  return "\n".join(lines)


def export(config, workdir: str, export_dir: str) -> int:
  """Writes the newest params, without the optimizer state, as a workdir of
  their own (config.json, run.json, its tokenizer and one checkpoint) that
  --mode=eval, --mode=sample and checkpoint.init_from read like any run's."""
  run = build(config, workdir, splits=(), read_only=True)
  check_workdir(export_dir)
  if os.path.exists(os.path.join(export_dir, layout.CHECKPOINTS)):
    raise ConfigError(f"--export_dir={export_dir} already holds checkpoints; "
                      "choose a new directory")
  with run.context():
    step, params = _newest_params(run)
    target = checkpoint.Checkpointer(export_dir, keep=1)
    target.save_params(step, params, run_info(
        config, step, exported_from=f"{run.checkpointer.directory}/{step}"))
    target.close()
  if jax.process_index() == 0:
    saved_config.save(config, export_dir)
    metrics.write_run_summary(export_dir, run.model.cfg, config.train)
    tokenizers.save_dir(run.tokenizer,
                        os.path.join(export_dir, layout.TOKENIZER))
  log(f"exported the parameters of step {step} to {export_dir}")
  return step
