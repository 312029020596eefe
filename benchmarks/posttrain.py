"""What the post-training demonstrations share: running train.py as a user
does (config overrides), and reading a run's params back to complete
prompts greedily."""

import json
import os
import subprocess
import sys
import time

import layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path: str, records) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def train_py(workdir: str, overrides: dict, log: str) -> float:
  """Runs `python train.py --config=configs/base.py --config.K=V ...
  --workdir=WORKDIR` (run_logged): the demonstrations start from every
  field's usual value, not the default's recipe."""
  args = ["--config=configs/base.py"] + [
      f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
      for k, v in overrides.items()]
  return run_logged(args + [f"--workdir={workdir}"], log)


def run_logged(args: list[str], log: str) -> float:
  """Runs `python train.py ARGS` (its output appended to `log`) and returns
  its wall time in seconds, startup, data preparation and compilation
  included; a failure exits with its status and the log."""
  t = time.perf_counter()
  with open(log, "a") as f:
    f.write(f"$ python train.py {' '.join(args)}\n")
    f.flush()
    code = subprocess.run([sys.executable, "train.py", *args], cwd=REPO,
                          stdout=f, stderr=subprocess.STDOUT).returncode
  if code:
    sys.exit(f"train.py failed (status {code}); see {log}")
  return time.perf_counter() - t


def records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, layout.METRICS)) as f:
    return [json.loads(line) for line in f]


class Completer:
  """A trained run's params at any of its checkpoints, completing prompts
  greedily until end-of-text. A context manager (the run's mesh)."""

  def __init__(self, workdir: str):
    from trainer import run as run_lib, saved_config
    self.run = run_lib.build(saved_config.load_saved(workdir), workdir,
                             splits=())
    self.tokenizer = self.run.tokenizer

  def __enter__(self):
    self._context = self.run.context()
    self._context.__enter__()
    return self

  def __exit__(self, *error):
    return self._context.__exit__(*error)

  def steps(self) -> list[int]:
    return self.run.checkpointer.steps()

  def params(self, step: int):
    return self.run.restore_checkpoint(self.run.checkpointer, step, "",
                                       params_only=True).params

  def complete(self, params, prompts: list[str], max_new_tokens: int,
               batch: int = 500) -> list[str]:
    import jax
    from model import generate
    out = []
    for i in range(0, len(prompts), batch):
      ids = [self.tokenizer.encode(p) for p in prompts[i:i + batch]]
      made = generate(self.run.model, params, ids, jax.random.key(0),
                      max_new_tokens=max_new_tokens, temperature=0.0,
                      stop_token=self.tokenizer.eot_id)
      for prompt, row in zip(ids, made):
        new = [int(t) for t in row[len(prompt):]]
        ended = self.tokenizer.eot_id in new
        if ended:
          new = new[:new.index(self.tokenizer.eot_id)]
        out.append(self.tokenizer.decode(new) + ("" if ended else "..."))
    return out

  def sampled_kl(self, params, ref_params, prompts: list[str],
                 max_new_tokens: int, seed: int = 0) -> dict:
    """KL(policy || reference) on the policy's own responses: responses y
    sampled at temperature 1 from `params`, the mean over prompts of
    log pi(y | x) - log pi_ref(y | x) (y's tokens, its end-of-text
    included), per response and per response token."""
    import jax
    import numpy as np
    from model import generate
    from trainer import objectives
    ids = [self.tokenizer.encode(p) for p in prompts]
    made = generate(self.run.model, params, ids, jax.random.key(seed),
                    max_new_tokens=max_new_tokens, temperature=1.0,
                    stop_token=self.tokenizer.eot_id)
    window = self.run.model.cfg.seq_len + 1
    tokens = np.full((len(ids), window), self.tokenizer.eot_id, np.int32)
    weights = np.zeros((len(ids), window), np.int32)
    for i, (prompt, row) in enumerate(zip(ids, made)):
      row = np.asarray(row)[:window]
      tokens[i, :len(row)] = row
      weights[i, len(prompt):len(row)] = 1
    batch = {"tokens": tokens, "weights": weights}
    logp = jax.jit(lambda p: objectives.sequence_logps(
        objectives.apply(self.run.model, p, batch), tokens, weights)[0])
    ratio = np.asarray(logp(params)) - np.asarray(logp(ref_params))
    return {"kl_sequence": float(ratio.mean()),
            "kl_per_token": float(ratio.sum() / weights.sum()),
            "response_tokens": float(weights.sum() / len(ids))}
