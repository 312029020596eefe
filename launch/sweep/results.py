"""A sweep's results: a row per run and branch, in results.csv and
results.json at its root."""

import csv
import os
import statistics

import layout
from data import disk
from launch.sweep.spec import Sweep
from launch.sweep.status import Metrics, _state, _status
from trainer.workdir_lock import read_json as _read_json


def results(sweep: Sweep) -> list:
  """One row per run and per cooldown branch, finished or not; parameters
  and FLOPs from the run.json train.py writes when a run starts."""
  rows = []
  for task in sweep.tasks:
    state, m = _state(task.workdir), Metrics(task.workdir).update()
    info = _read_json(os.path.join(task.workdir, layout.RUN)) or {}
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
  with disk.replacing(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  disk.write_json(os.path.join(sweep.root, "results.json"), rows)
  return rows
