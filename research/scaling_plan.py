"""The plan of research.scaling: a fit and a compute budget to a
compute-optimal size, the nearest shape our configs build, and its steps."""

import bisect
import itertools
import math

from errors import BadInput
from research.scaling_fits import LAW_PARAMS, predict

ASPECT_RANGE = (16, 128)  # d_model / num_layers of the shapes plan builds


def optimal_allocation(law: dict, flops: float) -> tuple[float, float]:
  """(N_opt, D_opt) minimizing L(N, D) subject to 6 N D = flops."""
  a, b = law["alpha"], law["beta"]
  g = (a * law["A"] / (b * law["B"])) ** (1 / (a + b))
  n = g * (flops / 6) ** (b / (a + b))
  return n, flops / (6 * n)


def nearest_shape(target_params: float) -> dict:
  """The shape our configs build (see research.scaling's docstring) whose
  non-embedding parameter count is closest to target_params in log."""
  from model import GPTConfig  # here: jax loads only when a plan needs it

  def head_dim(d_model):
    return 64 if d_model % 64 == 0 else 32

  def count(layers, d_model):
    return GPTConfig(vocab_size=1, seq_len=1, num_layers=layers,
                     d_model=d_model, num_heads=d_model // head_dim(d_model)
                     ).num_params(embeddings=False)  # vocab, context: unused

  lo, hi = ASPECT_RANGE
  best = None
  for layers in itertools.count(1):
    widths = range(math.ceil(lo * layers / 32), hi * layers // 32 + 1)
    # Counts grow with the width: the closest is next to where the
    # target would go.
    i = bisect.bisect_left(widths, target_params,
                           key=lambda k: count(layers, 32 * k))
    for k in widths[max(i - 1, 0):i + 1]:
      n = count(layers, 32 * k)
      distance = abs(math.log(n / target_params))
      if best is None or distance < best[0]:
        best = (distance, layers, 32 * k, n)
    if count(layers, 32 * widths[0]) >= target_params:
      break  # more layers only make the narrowest model bigger
  _, layers, d_model, n = best
  return {"num_layers": layers, "d_model": d_model,
          "num_heads": d_model // head_dim(d_model),
          "head_dim": head_dim(d_model), "d_ff": 4 * d_model, "params": n,
          "aspect_ratio": d_model / layers}


def plan(fit_result: dict, flops: float, batch_size: int = 32,
         seq_len: int = 128) -> dict:
  """The compute-optimal N and D for `flops` under a fit (fit.json's dict, or
  any dict with E, A, B, alpha, beta), the nearest buildable shape, and its
  steps and predicted loss at the batch."""
  try:
    law = {k: float(fit_result[k]) for k in LAW_PARAMS}
  except (KeyError, TypeError, ValueError):
    raise BadInput("the fit needs numbers E, A, B, alpha and beta (a "
                       "fit.json of `fit`)") from None
  if not all(math.isfinite(v) and v > 0 for v in law.values()):
    raise BadInput(f"the fit's E, A, B, alpha and beta must be positive, "
                       f"got {law}")
  if not (math.isfinite(flops) and flops > 0):
    raise BadInput(f"--flops must be a positive number, got {flops}")
  if batch_size < 1 or seq_len < 1:
    raise BadInput("--batch-size and --seq-len must be positive")
  n_opt, d_opt = optimal_allocation(law, flops)
  shape = nearest_shape(n_opt)
  steps = max(1, round(d_opt / (batch_size * seq_len)))
  tokens = steps * batch_size * seq_len
  fitted = [r["params"] for r in fit_result.get("rows", ())]
  return {
      "flops": flops, "law": law,
      "compute_optimal": {
          "params": n_opt, "tokens": d_opt, "tokens_per_param": d_opt / n_opt,
          "loss": float(predict(law, n_opt, d_opt))},
      "shape": {
          **shape, "batch_size": batch_size, "seq_len": seq_len,
          "steps": steps, "tokens": tokens,
          "tokens_per_param": tokens / shape["params"],
          "flops": 6 * shape["params"] * tokens,
          "loss": float(predict(law, shape["params"], tokens))},
      "fitted_params_range": [min(fitted), max(fitted)] if fitted else None,
  }


def plan_table(p: dict) -> str:
  """The plan as a small table, for people."""
  opt, s = p["compute_optimal"], p["shape"]
  rows = [("", "compute-optimal", "nearest shape"),
          ("params N (non-embedding)", f"{opt['params']:.4g}",
           f"{s['params']:.4g}"),
          ("tokens D", f"{opt['tokens']:.4g}", f"{s['tokens']:.4g}"),
          ("tokens per parameter", f"{opt['tokens_per_param']:.1f}",
           f"{s['tokens_per_param']:.1f}"),
          ("FLOPs (6ND)", f"{p['flops']:.4g}", f"{s['flops']:.4g}"),
          ("predicted loss", f"{opt['loss']:.4f}", f"{s['loss']:.4f}")]
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = ["  ".join(r[0].ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                     for i, c in enumerate(r)) for r in rows]
  lines.append(
      f"shape: num_layers {s['num_layers']}, d_model {s['d_model']}, "
      f"num_heads {s['num_heads']} (head dim {s['head_dim']}), d_ff "
      f"{s['d_ff']}, d_model / num_layers {s['aspect_ratio']:.0f}; "
      f"{s['steps']:,} steps of {s['batch_size']} x {s['seq_len']} tokens")
  lines.append(
      f"train.py flags: --config=configs/base.py "
      f"--config.model.num_layers={s['num_layers']} "
      f"--config.model.d_model={s['d_model']} "
      f"--config.model.num_heads={s['num_heads']} "
      f"--config.model.seq_len={s['seq_len']} "
      f"--config.train.batch_size={s['batch_size']} "
      f"--config.train.steps={s['steps']}")
  if p["fitted_params_range"]:
    lo, hi = p["fitted_params_range"]
    if not lo <= opt["params"] <= hi:
      lines.append(f"note: N_opt is outside the sizes fitted ({lo:.3g} to "
                   f"{hi:.3g}): the law is extrapolated")
  return "\n".join(lines)
