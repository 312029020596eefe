"""Scaling laws from a table of runs: fits, plots and a compute-optimal plan.

  python -m research.scaling fit runs/sweep/results.csv [--out DIR]
  python -m research.scaling plan --fit DIR/fit.json --flops 1e17 \\
      [--batch-size 32 --seq-len 128] [--out plan.json]
  python -m research.scaling study [configs/sweeps/scaling.py] [--minutes 11]

`fit` reads a CSV with a row per run and the columns `params`, `tokens`,
`loss`, optionally `budget`, `name` and `parent` (launch.sweep's results.csv
has them all); other columns are ignored. With a `status` column only runs
whose status is `done` count (the others are skipped and counted).
It writes DIR/fit.json and the plots loss_vs_params.png, loss_vs_compute.png,
isoflop.png (with IsoFLOP budgets) and residuals.png (DIR defaults to the
table's folder), and prints a summary. `plan` turns a fit and a compute
budget into a model shape and a step count. Bad input stops either with one
line `error: ...`, exit status 2, and nothing written.

Conventions:
- N (`params`) counts non-embedding parameters, as Kaplan et al. (2020) do:
  `model.GPTConfig.num_params(embeddings=False)`. D (`tokens`) counts the
  training tokens seen; losses are in nats per token.
- Compute C is 6 N D, the project's one FLOPs convention (docs/model.md,
  "FLOPs"): train.py's MFU and run.json, the sweeps' `flops` and
  `budget`, the fits and the plan all count it. A table's `flops` column is
  not read.
- A row's run: its `parent` if it has one (a cooldown branch shares its
  run's first steps and seed), else its `name`; without those columns each
  row is a run of its own.

The fits:
- L(N, D) = E + A / N^alpha + B / D^beta, approach 3 of Hoffmann et al.
  (2022): the Huber loss (delta 1e-3) of the residuals in log loss,
  minimized by L-BFGS-B from the best points of a grid over (a, b, e, alpha,
  beta), where A = e^a, B = e^b, E = e^e, exponents within [0, 3]; 95%
  percentile intervals from bootstrap resamples of the runs, each drawn
  with all its rows (its branches).
- L(N) = E + A / N^alpha over the lowest loss of each size, and
  L(C) = E + A / C^gamma over the compute frontier (the runs with a lower loss
  than every run of less or equal compute), least squares on the loss.
- IsoFLOP profiles (approach 2): the rows of one designed `budget` (the
  FLOPs a sweep's spec set their steps for) share it; a budget with >= 3
  sizes gets a parabola of loss in ln N whose minimum is N_opt(C) (and one
  in ln D for D_opt(C)); minima inside the sizes tried, from >= 2 budgets,
  give N_opt = k C^a and D_opt = k' C^b with C the budgets. A table
  without budgets has no IsoFLOP profiles.
- Extrapolation check (>= 3 sizes): approach 3 refitted without the largest
  size predicts that size's losses; the project's target is within 3%.

fit.json: the law's E, A, B, alpha, beta; `ci95` ({name: [low, high]});
`bootstrap` (resamples, fitted, seed); `huber_delta`, `huber_objective`;
`L_N` (E, A, alpha, r2, sizes); `L_C` (E, A, gamma, r2, frontier_runs);
`isoflop` (`budgets`: flops (the designed budget), rows,
parabola_ln_params, params_opt, tokens_opt, loss_opt, inside;
`params_opt_law`, `tokens_opt_law`: exponent, coefficient); `extrapolation` (held_out_params, fitted_runs, law, runs with
their predicted loss and relative_error, max_abs_relative_error, target,
within_target); `params_convention`, `flops_convention`, `runs`, `skipped`;
`rows`: the runs used (params, tokens, loss, flops = 6 N D, frontier), which
`budgets.rows` index. A part the table has too little data for is null.

The plan: N_opt = G (C/6)^(beta/(alpha+beta)) with
G = (alpha A / (beta B))^(1/(alpha+beta)), D_opt = C / (6 N_opt); then the
shape our configs build (d_model a multiple of 32, heads of 64 or else 32
dimensions, d_ff = 4 d_model, d_model / num_layers in 16..128) whose
non-embedding parameters are closest to N_opt in log, trained for
D_opt / (batch_size * seq_len) steps.
"""

import argparse
import bisect
import csv
import itertools
import json
import math
import os
import sys

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

LAW = "L(N, D) = E + A / N^alpha + B / D^beta"
LAW_PARAMS = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3
MIN_RUNS = 5  # approach 3 has five parameters
EXTRAPOLATION_TARGET = 0.03  # relative error the project accepts
ASPECT_RANGE = (16, 128)  # d_model / num_layers of the shapes plan builds
PLOTS = ("loss_vs_params.png", "loss_vs_compute.png", "isoflop.png",
         "residuals.png")

# Starting points of approach 3, as Hoffmann et al.: (a, b, e, alpha, beta).
_GRID = np.array(list(itertools.product(
    np.arange(0.0, 30.0, 5.0), np.arange(0.0, 30.0, 5.0),
    np.arange(-1.0, 1.5, 0.5), np.arange(0.0, 2.5, 0.5),
    np.arange(0.0, 2.5, 0.5))))
_GRID_STARTS = 32  # L-BFGS runs from this many of the best grid points
# A bootstrap refit starts from the full fit's optimum and this many of its
# own best grid points: fast, and as good on the tables we tried.
_BOOTSTRAP_GRID_STARTS = 1
# Wide enough for any table (losses in nats, N and D up to 1e15), narrow
# enough that nonsense data cannot push e^a past floating point.
_BOUNDS = [(-50.0, 200.0)] * 2 + [(-20.0, 20.0)] + [(0.0, 3.0)] * 2


class ScalingError(ValueError):
  """Bad input: `main` prints it as one line and exits with status 2."""


# ---------------------------------------------------------------- the table


def read_table(path: str) -> list[dict]:
  """The table's rows: `params`, `tokens`, `loss` (and `budget` where given)
  as floats, `name` and `parent` (None where empty or absent), `status` if
  the table has one, and the CSV `line` for messages. Rows whose status is
  not `done` keep only their status and line: a failed run may have no
  loss."""
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:  # BOM or not
      reader = csv.DictReader(f)
      header = reader.fieldnames or []
      missing = [c for c in ("params", "tokens", "loss") if c not in header]
      if missing:
        raise ScalingError(
            f"{path} lacks {', '.join(missing)}: a table needs the columns "
            "params, tokens and loss (optional: budget, name, parent, "
            "status)")
      rows = []
      for record in reader:
        row = {"line": reader.line_num}
        if "status" in header:
          row["status"] = (record["status"] or "").strip()
          if row["status"] != "done":
            rows.append(row)
            continue
        for column in ("params", "tokens", "loss"):
          row[column] = _number(record[column], column, path, row["line"])
        if (record.get("budget") or "").strip():
          row["budget"] = _number(record["budget"], "budget", path,
                                  row["line"])
        for column in ("name", "parent"):
          row[column] = (record.get(column) or "").strip() or None
        rows.append(row)
  except OSError as e:
    raise ScalingError(f"cannot read {path}: {e.strerror}") from e
  except (csv.Error, UnicodeDecodeError) as e:
    raise ScalingError(f"{path} is not a readable CSV file: {e}") from e
  return rows


def _number(text: str | None, column: str, path: str, line: int) -> float:
  if text is None or not text.strip():
    raise ScalingError(f"{path}, line {line}: no {column}")
  try:
    return float(text)
  except ValueError:
    raise ScalingError(f"{path}, line {line}: {column} is {text!r}, not a "
                       "number") from None


def _runs(rows: list[dict]) -> dict:
  """The runs that count, as arrays N, D, L, C (6 N D), budget (nan where
  none), the run of each row (an index) and the number of rows skipped for
  their status; ScalingError for rows a fit cannot use."""
  used = [(i, r) for i, r in enumerate(rows)
          if r.get("status", "done") == "done"]
  for i, r in used:
    where = f"line {r['line']}" if "line" in r else f"row {i}"
    for column in ("params", "tokens", "loss", "budget"):
      value = r.get(column)
      if value is None and column == "budget":
        continue
      if value is None:
        raise ScalingError(f"{where}: no {column}")
      if not (math.isfinite(value) and value > 0):
        raise ScalingError(f"{where}: {column} must be a positive number, "
                           f"got {value}")
  N, D, L = (np.array([r[c] for _, r in used], float)
             for c in ("params", "tokens", "loss"))
  skipped = len(rows) - len(used)
  note = f" ({skipped} skipped: status not done)" if skipped else ""
  if len(used) < MIN_RUNS:
    raise ScalingError(f"{len(used)} runs{note}; a fit needs at least "
                       f"{MIN_RUNS}")
  for name, values in (("params", N), ("tokens", D)):
    if len(np.unique(values)) < 2:
      raise ScalingError(f"every run has the same {name}; a fit needs runs "
                         f"of at least 2 different {name}")
  budget = np.array([r.get("budget") or np.nan for _, r in used], float)
  keys = [r.get("parent") or r.get("name") or ("row", i) for i, r in used]
  index = {key: j for j, key in enumerate(dict.fromkeys(keys))}
  return {"N": N, "D": D, "L": L, "C": 6 * N * D, "budget": budget,
          "run": np.array([index[key] for key in keys]), "skipped": skipped}


# ------------------------------------------- approach 3: L(N, D), Huber fit


def predict(law: dict, params, tokens):
  """The loss L(N, D) of a law (a dict with E, A, B, alpha, beta)."""
  return (law["E"] + law["A"] / np.power(params, law["alpha"])
          + law["B"] / np.power(tokens, law["beta"]))


def _law(theta) -> dict:
  a, b, e, alpha, beta = (float(v) for v in theta)
  return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b),
          "alpha": alpha, "beta": beta}


def _huber(r):
  """Huber_delta(x) / delta^2 of r = x / delta: of order 1 per run, which
  L-BFGS's tolerances expect."""
  r = np.abs(r)
  inside = np.minimum(r, 1)
  return inside * (r - 0.5 * inside)  # r^2 / 2 up to 1, then r - 1/2


def _objective(theta, logN, logD, logL):
  """The scaled Huber objective of approach 3 and its gradient."""
  a, b, e, alpha, beta = theta
  t_N, t_D = a - alpha * logN, b - beta * logD
  top = np.maximum(np.maximum(t_N, t_D), e)
  w_N, w_D, w_E = np.exp(t_N - top), np.exp(t_D - top), np.exp(e - top)
  total = w_N + w_D + w_E
  r = (top + np.log(total) - logL) / HUBER_DELTA
  slope = np.maximum(np.minimum(r, 1), -1)  # of the scaled Huber loss
  value = slope @ (r - 0.5 * slope)  # as _huber, in fewer steps
  # d objective / d term = slope * the term's softmax weight / delta.
  c = slope / (HUBER_DELTA * total)
  g_N, g_D = w_N * c, w_D * c
  grad = np.array([g_N.sum(), g_D.sum(), w_E @ c, -(g_N @ logN),
                   -(g_D @ logD)])
  return value, grad


def _grid_order(logN, logD, logL):
  """Grid points by their objective, best first (all at once)."""
  a, b, e, alpha, beta = (_GRID[:, i:i + 1] for i in range(5))
  t_3xGxR = np.stack(np.broadcast_arrays(a - alpha * logN, b - beta * logD,
                                         e))
  top = t_3xGxR.max(0)
  pred_GxR = top + np.log(np.exp(t_3xGxR - top).sum(0))
  return np.argsort(_huber((pred_GxR - logL) / HUBER_DELTA).sum(1))


def _fit_law(logN, logD, logL, starts=(), grid_starts=_GRID_STARTS):
  """(a, b, e, alpha, beta) and the scaled objective at the best of the
  L-BFGS-B runs from `starts` and the best `grid_starts` grid points."""
  x0s = [*starts, *_GRID[_grid_order(logN, logD, logL)[:grid_starts]]]
  best = None
  for x0 in x0s:
    r = optimize.minimize(_objective, x0, args=(logN, logD, logL), jac=True,
                          method="L-BFGS-B", bounds=_BOUNDS,
                          options={"ftol": 1e-12, "gtol": 1e-9})
    if best is None or r.fun < best.fun:
      best = r
  return best.x, float(best.fun)


def _bootstrap(logN, logD, logL, run, theta, resamples: int, seed: int):
  """95% percentile intervals of the law's parameters over fits to runs
  resampled with replacement, each with all its rows (`run`: the run of
  each row; a cooldown branch shares its run's first steps and seed, so it
  is no independent draw), and how many resamples were fitted (those with
  a single size or token count cannot be)."""
  rng = np.random.default_rng(seed)
  rows_of = [np.flatnonzero(run == k) for k in range(run.max() + 1)]
  laws = []
  for _ in range(resamples):
    i = np.concatenate([rows_of[k] for k in
                        rng.integers(0, len(rows_of), len(rows_of))])
    if len(np.unique(logN[i])) < 2 or len(np.unique(logD[i])) < 2:
      continue
    x, _ = _fit_law(logN[i], logD[i], logL[i], starts=(theta,),
                    grid_starts=_BOOTSTRAP_GRID_STARTS)
    laws.append(_law(x))
  if not laws:
    return None, 0
  return ({k: [float(np.percentile([law[k] for law in laws], q))
               for q in (2.5, 97.5)] for k in LAW_PARAMS}, len(laws))


# ---------------------------------------- power laws, frontier, IsoFLOP


def fit_power_law(x, y) -> dict:
  """y = E + A / x^k with E, A >= 0, least squares on y. For a given k the
  best E and A are a non-negative linear fit, so only k is searched: a grid
  over (0, 3], then a bounded refinement. Returns E, A, k and R^2."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  scale = x.min()  # x / scale >= 1 keeps the columns of order 1

  def solve(k):
    X = np.stack([np.ones_like(x), (x / scale) ** -k], 1)
    return optimize.nnls(X, y)

  ks = np.linspace(0.01, 3.0, 300)
  j = int(np.argmin([solve(k)[1] for k in ks]))
  k = optimize.minimize_scalar(
      lambda k: solve(k)[1], method="bounded",
      bounds=(ks[max(j - 1, 0)], ks[min(j + 1, len(ks) - 1)]),
      options={"xatol": 1e-10}).x
  (E, A), residual = solve(k)
  ss_tot = float(((y - y.mean()) ** 2).sum())
  return {"E": float(E), "A": float(A * scale ** k), "k": float(k),
          "r2": 1 - residual ** 2 / ss_tot if ss_tot else 1.0}


def compute_frontier(flops, loss) -> list[int]:
  """Indices of the runs with a lower loss than every run of less or equal
  compute (the first of exact ties), in order of compute."""
  order = sorted(range(len(flops)), key=lambda i: (flops[i], loss[i]))
  frontier, best = [], math.inf
  for i in order:
    if loss[i] < best:
      frontier.append(i)
      best = loss[i]
  return frontier


def isoflop_budgets(budget) -> list[tuple[float, list[int]]]:
  """(budget, its row indices) for each designed budget, smallest first;
  rows without one (nan) belong to none."""
  budget = np.asarray(budget, float)
  return [(float(c), np.flatnonzero(budget == c).tolist())
          for c in np.unique(budget[np.isfinite(budget)])]


def isoflop(N, D, L, budget) -> dict | None:
  """Approach 2 over the designed budgets with >= 3 sizes (None without
  any): per budget the parabolas' minima, and N_opt(C), D_opt(C) as power
  laws of the budgets when >= 2 have their minima inside the sizes
  tried."""
  budgets = []
  for c, idx in isoflop_budgets(budget):
    if len(np.unique(N[idx])) < 3:
      continue
    logN, logD = np.log(N[idx]), np.log(D[idx])
    p_N, p_D = np.polyfit(logN, L[idx], 2), np.polyfit(logD, L[idx], 2)
    profile = {"flops": c, "rows": idx,
              "parabola_ln_params": p_N.tolist(), "params_opt": None,
              "tokens_opt": None, "loss_opt": None, "inside": False}
    if p_N[0] > 0 and p_D[0] > 0:  # convex: a minimum
      x_N, x_D = -p_N[1] / (2 * p_N[0]), -p_D[1] / (2 * p_D[0])
      profile.update(
          params_opt=math.exp(x_N), tokens_opt=math.exp(x_D),
          loss_opt=float(np.polyval(p_N, x_N)),
          inside=bool(logN.min() <= x_N <= logN.max()))
    budgets.append(profile)
  if not budgets:
    return None
  used = [b for b in budgets if b["inside"]]
  result = {"budgets": budgets, "params_opt_law": None,
            "tokens_opt_law": None}
  if len(used) >= 2:
    logC = np.log([b["flops"] for b in used])
    for key in ("params_opt", "tokens_opt"):
      slope, intercept = np.polyfit(logC, np.log([b[key] for b in used]), 1)
      result[f"{key}_law"] = {"exponent": float(slope),
                              "coefficient": math.exp(intercept)}
  return result


def _extrapolation(N, D, L) -> dict | None:
  """Approach 3 without the largest size, tested on it (None with fewer than
  3 sizes, or too few runs left to fit)."""
  sizes = np.unique(N)
  train = N < sizes[-1]
  if (len(sizes) < 3 or train.sum() < MIN_RUNS
      or len(np.unique(D[train])) < 2):
    return None
  theta, _ = _fit_law(np.log(N[train]), np.log(D[train]), np.log(L[train]))
  law = _law(theta)
  test = ~train
  predicted = predict(law, N[test], D[test])
  error = (predicted - L[test]) / L[test]
  worst = float(np.abs(error).max())
  return {"held_out_params": float(sizes[-1]), "fitted_runs": int(train.sum()),
          "law": law,
          "runs": [{"params": float(n), "tokens": float(d), "loss": float(l),
                    "predicted": float(p), "relative_error": float(e)}
                   for n, d, l, p, e in zip(N[test], D[test], L[test],
                                            predicted, error)],
          "max_abs_relative_error": worst, "target": EXTRAPOLATION_TARGET,
          "within_target": worst <= EXTRAPOLATION_TARGET}


# ------------------------------------------------------------------ the fit


@threadpool_limits.wrap(limits=1, user_api="blas")
def fit(rows: list[dict], bootstrap: int = 200, seed: int = 0) -> dict:
  """Every fit of the module docstring over the rows (as read_table gives
  them); the dict that fit.json holds. BLAS runs on one thread: the fits
  are thousands of tiny L-BFGS-B problems, 10-20x slower with a thread per
  core on a busy 2-core machine."""
  runs = _runs(rows)
  N, D, L, C = runs["N"], runs["D"], runs["L"], runs["C"]
  logN, logD, logL = np.log(N), np.log(D), np.log(L)
  theta, objective = _fit_law(logN, logD, logL)
  law = _law(theta)
  intervals, fitted = _bootstrap(logN, logD, logL, runs["run"], theta,
                                 bootstrap, seed)

  sizes = np.unique(N)
  best_per_size = np.array([L[N == n].min() for n in sizes])
  frontier = compute_frontier(C, L)
  L_N = L_C = None
  if len(sizes) >= 3:
    p = fit_power_law(sizes, best_per_size)
    L_N = {"E": p["E"], "A": p["A"], "alpha": p["k"], "r2": p["r2"],
           "sizes": len(sizes)}
  if len(frontier) >= 3:
    p = fit_power_law(C[frontier], L[frontier])
    L_C = {"E": p["E"], "A": p["A"], "gamma": p["k"], "r2": p["r2"],
           "frontier_runs": len(frontier)}
  on_frontier = set(frontier)
  return {
      "law": LAW, **law,
      "ci95": intervals,
      "bootstrap": {"resamples": bootstrap, "fitted": fitted, "seed": seed},
      "huber_delta": HUBER_DELTA,
      "huber_objective": objective * HUBER_DELTA ** 2,
      "L_N": L_N, "L_C": L_C,
      "isoflop": isoflop(N, D, L, runs["budget"]),
      "extrapolation": _extrapolation(N, D, L),
      "params_convention": "non-embedding",
      "flops_convention": "6ND",
      "runs": len(L), "skipped": runs["skipped"],
      "rows": [{"params": float(n), "tokens": float(d), "loss": float(l),
                "flops": float(c), "frontier": i in on_frontier}
               for i, (n, d, l, c) in enumerate(zip(N, D, L, C))],
  }


def fit_summary(result: dict) -> str:
  """A few lines for people: the law, its intervals, R^2, extrapolation."""
  r = result
  skipped = (f" ({r['skipped']} skipped: status not done)" if r["skipped"]
             else "")
  lines = [f"{r['runs']} runs{skipped}; N: non-embedding parameters; "
           f"compute: {r['flops_convention']}",
           f"L(N, D) = {r['E']:.4g} + {r['A']:.4g} / N^{r['alpha']:.4f} + "
           f"{r['B']:.4g} / D^{r['beta']:.4f}  (Huber objective "
           f"{r['huber_objective']:.3g})"]
  if r["ci95"]:
    lines.append(f"  95% intervals ({r['bootstrap']['fitted']} bootstrap "
                 "fits): " + ", ".join(
                     f"{k} [{lo:.4g}, {hi:.4g}]"
                     for k, (lo, hi) in r["ci95"].items()))
  if r["L_N"]:
    p = r["L_N"]
    lines.append(f"L(N) = {p['E']:.4g} + {p['A']:.4g} / N^{p['alpha']:.4f}"
                 f"  R^2 {p['r2']:.4f} (best run of {p['sizes']} sizes)")
  if r["L_C"]:
    p = r["L_C"]
    lines.append(f"L(C) = {p['E']:.4g} + {p['A']:.4g} / C^{p['gamma']:.4f}"
                 f"  R^2 {p['r2']:.4f} ({p['frontier_runs']} frontier runs)")
  iso = r["isoflop"]
  if iso:
    inside = sum(b["inside"] for b in iso["budgets"])
    text = (f"IsoFLOP: {len(iso['budgets'])} budgets, {inside} with a "
            "minimum inside the sizes tried")
    if iso["params_opt_law"]:
      text += (f"; N_opt ~ C^{iso['params_opt_law']['exponent']:.3f}, "
               f"D_opt ~ C^{iso['tokens_opt_law']['exponent']:.3f}")
    lines.append(text)
  x = r["extrapolation"]
  if x:
    verdict = "within" if x["within_target"] else "OUTSIDE"
    lines.append(
        f"extrapolation to N = {x['held_out_params']:.4g} (fitted without "
        f"it): max |error| {x['max_abs_relative_error']:.2%} over "
        f"{len(x['runs'])} runs, {verdict} the {x['target']:.0%} target")
  return "\n".join(lines)


# ---------------------------------------------------------------- the plots


def write_plots(result: dict, out_dir: str) -> list[str]:
  """Writes the PNGs of a fit (isoflop.png only with IsoFLOP budgets; an
  older one is removed) and returns their paths."""
  # Imported here: plans and in-process fits need no matplotlib. A bare
  # Figure renders with Agg and touches no global pyplot state.
  from matplotlib.figure import Figure

  runs = {c: np.array([r[c] for r in result["rows"]])
          for c in ("params", "tokens", "loss", "flops", "frontier")}
  drawings = ((PLOTS[0], 1, _draw_loss_vs_params),
              (PLOTS[1], 1, _draw_loss_vs_compute),
              (PLOTS[2], 1, _draw_isoflop if result["isoflop"] else None),
              (PLOTS[3], 2, _draw_residuals))
  paths = []
  for name, ncols, draw in drawings:
    path = os.path.join(out_dir, name)
    if draw is None:
      if os.path.exists(path):
        os.remove(path)  # an earlier fit's: stale
      continue
    fig = Figure(figsize=(7.5 * ncols, 5.2), dpi=110, layout="constrained")
    draw(fig, fig.subplots(1, ncols, squeeze=False)[0], result, runs)
    fig.savefig(path)
    paths.append(path)
  return paths


def _readable_log_y(ax) -> None:
  """A log loss axis labelled at halves: losses span less than a decade."""
  from matplotlib import ticker
  ax.set_yscale("log")
  ax.yaxis.set_major_locator(ticker.LogLocator(subs=np.arange(1, 10, 0.5)))
  ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _draw_loss_vs_params(fig, axes, result, runs) -> None:
  """Loss vs N, coloured by D, with the law's curve at each token budget
  (at a few when every run has its own, as in IsoFLOP tables)."""
  from matplotlib import cm, colors
  (ax,) = axes
  law = {k: result[k] for k in LAW_PARAMS}
  N, D, L = runs["params"], runs["tokens"], runs["loss"]
  n_grid = np.geomspace(N.min() / 1.5, N.max() * 1.5, 200)
  budgets = np.unique(D)
  if len(budgets) > 8:
    budgets = np.geomspace(D.min(), D.max(), 5)
  # A longer colour scale than the runs need, so that none is pale yellow.
  norm = colors.LogNorm(D.min(), D.max() * (D.max() / D.min()) ** 0.15)
  for d in budgets:
    ax.plot(n_grid, predict(law, n_grid, d), color=cm.viridis(norm(d)),
            lw=1.2, label=f"fit at D = {d:.3g} tokens")
  points = ax.scatter(N, L, c=D, cmap="viridis", norm=norm, s=24, zorder=3,
                      edgecolor="white", linewidth=0.4,
                      label="runs (colour: their D)")
  fig.colorbar(points, ax=ax, label="training tokens D of the run"
               ).ax.set_ylim(D.min(), D.max())
  ax.axhline(law["E"], color="0.5", ls="--", lw=1,
             label=f"E = {law['E']:.3g} (irreducible)")
  ax.set_xscale("log")
  _readable_log_y(ax)
  law_text = (f"L = {law['E']:.3g} + {law['A']:.3g}/N^{law['alpha']:.3f} + "
              f"{law['B']:.3g}/D^{law['beta']:.3f}")
  ax.set(xlabel="non-embedding parameters N", ylabel="loss (nats per token)",
         title=f"Loss vs model size; the fit {law_text}")
  ax.title.set_fontsize("medium")
  ax.legend(fontsize="small")


def _draw_loss_vs_compute(fig, axes, result, runs) -> None:
  """Loss vs compute, the frontier and L(C)."""
  (ax,) = axes
  C, L, frontier = runs["flops"], runs["loss"], runs["frontier"]
  ax.scatter(C[~frontier], L[~frontier], color="0.65", s=18, label="runs")
  ax.scatter(C[frontier], L[frontier], color="C3", s=30, zorder=3,
             label="compute frontier")
  title = "Loss vs training compute"
  if result["L_C"]:
    p = result["L_C"]
    c_grid = np.geomspace(C.min() / 1.5, C.max() * 1.5, 200)
    ax.plot(c_grid, p["E"] + p["A"] / c_grid ** p["gamma"], color="C3",
            label=f"L(C) = {p['E']:.3g} + {p['A']:.3g} / C^{p['gamma']:.3f}"
            f" (R² {p['r2']:.4f})")
  else:
    title += " (too few frontier runs for L(C))"
  ax.set_xscale("log")
  _readable_log_y(ax)
  ax.set(xlabel=f"training compute C (FLOPs, {result['flops_convention']})",
         ylabel="loss (nats per token)", title=title)
  ax.legend(fontsize="small")


def _draw_isoflop(fig, axes, result, runs) -> None:
  """IsoFLOP profiles: parabolas in ln N and their minima."""
  from matplotlib import cm
  (ax,) = axes
  N, L = runs["params"], runs["loss"]
  budgets = result["isoflop"]["budgets"]
  colours = cm.plasma(np.linspace(0, 0.85, len(budgets)))
  for b, colour in zip(budgets, colours):
    idx = b["rows"]
    x = np.linspace(np.log(N[idx].min() / 1.3), np.log(N[idx].max() * 1.3),
                    100)
    ax.scatter(N[idx], L[idx], color=colour, s=22, zorder=3,
               label=f"C = {b['flops']:.3g} FLOPs")
    ax.plot(np.exp(x), np.polyval(b["parabola_ln_params"], x),
            color=colour, lw=1.2)
    if b["inside"]:
      ax.scatter([b["params_opt"]], [b["loss_opt"]], marker="*", s=160,
                 color=colour, edgecolor="black", zorder=4)
  ax.scatter([], [], marker="*", s=160, color="white", edgecolor="black",
             label="parabola minimum: N_opt(C)")
  ax.set_xscale("log")
  ax.set(xlabel="non-embedding parameters N",
         ylabel="loss (nats per token)",
         title="IsoFLOP profiles: loss vs size at fixed compute, "
         "parabolas in ln N")
  ax.legend(fontsize="small", loc="lower left")  # profiles fall rightward


def _draw_residuals(fig, axes, result, runs) -> None:
  """Residuals of L(N, D) in log loss, against N and against D."""
  from matplotlib import ticker
  law = {k: result[k] for k in LAW_PARAMS}
  N, D = runs["params"], runs["tokens"]
  residual = np.log(runs["loss"]) - np.log(predict(law, N, D))
  for ax, x, name in zip(axes, (N, D), ("non-embedding parameters N",
                                        "training tokens D")):
    ax.axhline(0, color="0.5", lw=1)
    ax.axhspan(-HUBER_DELTA, HUBER_DELTA, color="0.9",
               label=f"±{HUBER_DELTA:g} (Huber delta)")
    ax.scatter(x, residual, color="C0", s=20, zorder=3, label="runs")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # no crowded labels
    ax.set(xlabel=name, ylabel="ln(observed loss) - ln(fitted loss)",
           title=f"Residuals of the L(N, D) fit vs {name.split()[-1]}")
    ax.legend(fontsize="small")


# ----------------------------------------------------------------- the plan


def optimal_allocation(law: dict, flops: float) -> tuple[float, float]:
  """(N_opt, D_opt) minimizing L(N, D) subject to 6 N D = flops."""
  a, b = law["alpha"], law["beta"]
  g = (a * law["A"] / (b * law["B"])) ** (1 / (a + b))
  n = g * (flops / 6) ** (b / (a + b))
  return n, flops / (6 * n)


def nearest_shape(target_params: float) -> dict:
  """The shape our configs build (see the module docstring) whose
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
    raise ScalingError("the fit needs numbers E, A, B, alpha and beta (a "
                       "fit.json of `fit`)") from None
  if not all(math.isfinite(v) and v > 0 for v in law.values()):
    raise ScalingError(f"the fit's E, A, B, alpha and beta must be positive, "
                       f"got {law}")
  if not (math.isfinite(flops) and flops > 0):
    raise ScalingError(f"--flops must be a positive number, got {flops}")
  if batch_size < 1 or seq_len < 1:
    raise ScalingError("--batch-size and --seq-len must be positive")
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
      f"train.py flags: --config.model.num_layers={s['num_layers']} "
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


# ------------------------------------------------------------------ the CLI


def write_json(path: str, obj) -> None:
  """Written whole or not at all: a reader never sees half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _fit_command(args) -> None:
  if args.bootstrap < 0:
    raise ScalingError(f"--bootstrap must be >= 0, got {args.bootstrap}")
  result = fit(read_table(args.table), bootstrap=args.bootstrap,
               seed=args.seed)
  out = args.out or os.path.dirname(os.path.abspath(args.table))
  try:
    os.makedirs(out, exist_ok=True)
    paths = write_plots(result, out)
    write_json(os.path.join(out, "fit.json"), result)
  except OSError as e:
    raise ScalingError(f"cannot write to {out}: {e.strerror}") from e
  print(fit_summary(result))
  print(f"wrote {os.path.join(out, 'fit.json')} and "
        + ", ".join(os.path.basename(p) for p in paths))


def _plan_command(args) -> None:
  try:
    with open(args.fit) as f:
      fit_result = json.load(f)
  except OSError as e:
    raise ScalingError(f"cannot read {args.fit}: {e.strerror}") from e
  except ValueError as e:
    raise ScalingError(f"{args.fit} is not JSON: {e}") from e
  if not isinstance(fit_result, dict):
    raise ScalingError(f"{args.fit} is not a fit.json of `fit`")
  p = plan(fit_result, args.flops, args.batch_size, args.seq_len)
  print(plan_table(p))
  if args.out:
    try:
      write_json(args.out, p)
    except OSError as e:
      raise ScalingError(f"cannot write {args.out}: {e.strerror}") from e
    print(f"wrote {args.out}")


def time_budget(result: dict, sizes: list[dict], seconds: float) -> list:
  """What each size reaches in `seconds` of this machine at its measured
  tokens/s (`sizes`: {shape, params, tokens_per_sec, flops_per_token}), and
  the loss the fitted law predicts for those tokens; best first. On a CPU
  small models reach a smaller fraction of the matmul peak, so a time
  budget is not one FLOP budget."""
  law = {k: result[k] for k in LAW_PARAMS}
  options = []
  for size in sizes:
    tokens = size["tokens_per_sec"] * seconds
    options.append({**size, "tokens": tokens,
                    "flops_per_sec": size["tokens_per_sec"] *
                                     size["flops_per_token"],
                    "loss": float(predict(law, size["params"], tokens))})
  return sorted(options, key=lambda o: o["loss"])


def measure_sizes(rows: list[dict], rounds: int = 3, steps: int = 4) -> list:
  """Each size of a study (its runs' configs) timed here: train steps on
  random tokens, in rounds that alternate the sizes in this one process, so
  each sees the same machine (the runs' own logs ran two at a time beside
  other work). Medians."""
  import statistics
  from trainer import saved_config
  from trainer import timing
  runners = []
  for row in rows:
    if row["kind"] == "run" and row["status"] == "done":
      config = saved_config.load_saved(row["workdir"])
      with open(os.path.join(row["workdir"], "run.json")) as f:
        info = json.load(f)
      run = timing.jax_runner(config, info["vocab_size"])[2]
      runners.append(({
          "shape": "x".join(str(config.model[k]) for k in
                            ("num_layers", "d_model", "num_heads")),
          "params": row["params"],
          "flops_per_token": info["flops_per_token"]},
                      info["tokens_per_step"], run, []))
  for _ in range(rounds):
    for _, _, run, times in runners:
      times.append(run(steps) / steps)
  return [{**size, "tokens_per_sec": tokens / statistics.median(times)}
          for size, tokens, _, times in runners]


def study(spec: str, root: str, parallel: int, minutes: float,
          batch_size: int, seq_len: int) -> None:
  """The sweep of `spec` (resumed if it was interrupted), its results
  table, the fits and plots (root/fit/), and a recommendation for `minutes`
  of training on this machine (root/recommendation.json)."""
  from launch import sweep  # here: fits and plans need no trainer
  status = sweep.main(["run", spec, "--root", root, "--parallel",
                       str(parallel)])
  if status:
    raise ScalingError(f"the sweep stopped with status {status} (see its "
                       "table above); the same command resumes it")
  rows = sweep.collect(sweep.load(spec, root))
  result = fit(rows)
  out = os.path.join(root, "fit")
  os.makedirs(out, exist_ok=True)
  paths = write_plots(result, out)
  write_json(os.path.join(out, "fit.json"), result)
  print(fit_summary(result))
  print(f"wrote {os.path.join(out, 'fit.json')} and "
        + ", ".join(os.path.basename(p) for p in paths))

  seconds = 60 * minutes
  options = time_budget(result, measure_sizes(rows), seconds)
  largest = max(options, key=lambda o: o["params"])
  compute = plan(result, largest["flops_per_sec"] * seconds, batch_size,
                 seq_len)
  print(f"\n{minutes:g} minutes of training here, each size at the "
        "tokens/s measured now, in alternating rounds:")
  print(f"{'shape':>10} {'params':>9} {'tokens/s':>9} {'tokens':>9} "
        f"{'predicted loss':>15}")
  for o in options:
    print(f"{o['shape']:>10} {o['params']:>9.3g} {o['tokens_per_sec']:>9,.0f}"
          f" {o['tokens']:>9.3g} {o['loss']:>15.4f}")
  print(f"\nthe same time in FLOPs, at the {largest['flops_per_sec'] / 1e9:.1f}"
        f" GFLOP/s the largest size ran at: {compute['flops']:.3g}")
  print(plan_table(compute))
  write_json(os.path.join(root, "recommendation.json"),
              {"minutes": minutes, "by_time": options, "by_flops": compute})
  print(f"\nrecommended for {minutes:g} minutes here: {options[0]['shape']} "
        f"(predicted held-out loss {options[0]['loss']:.4f})")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m research.scaling", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  f = commands.add_parser("fit", help="fit scaling laws to a table of runs")
  f.add_argument("table", help="CSV with params, tokens, loss [, budget, "
                 "name, parent, status]")
  f.add_argument("--out", help="folder for fit.json and the plots "
                 "(default: the table's)")
  f.add_argument("--bootstrap", type=int, default=200,
                 help="resamples for the 95%% intervals (0: none; default "
                 "%(default)s)")
  f.add_argument("--seed", type=int, default=0,
                 help="of the resamples (default %(default)s)")
  p = commands.add_parser("plan", help="a compute-optimal model for a budget")
  p.add_argument("--fit", required=True, help="fit.json of `fit`")
  p.add_argument("--flops", type=float, required=True,
                 help="compute budget C = 6 N D")
  p.add_argument("--batch-size", type=int, default=32,
                 help="sequences per step (default %(default)s)")
  p.add_argument("--seq-len", type=int, default=128,
                 help="tokens per sequence (default %(default)s)")
  p.add_argument("--out", help="write the plan here as JSON")
  st = commands.add_parser(
      "study", help="sweep, fit, plot and recommend, on this machine")
  st.add_argument("spec", nargs="?", default="configs/sweeps/scaling.py",
                  help="the sweep (default %(default)s)")
  st.add_argument("--root", help="the sweep's root (default: "
                  "runs/sweeps/<spec file stem>)")
  st.add_argument("--parallel", type=int, default=2,
                  help="runs at a time (default %(default)s)")
  st.add_argument("--minutes", type=float, default=11.0,
                  help="the training time to recommend a model for "
                  "(default %(default)s)")
  st.add_argument("--batch-size", type=int, default=32,
                  help="sequences per step (default %(default)s)")
  st.add_argument("--seq-len", type=int, default=128,
                  help="tokens per sequence (default %(default)s)")
  args = parser.parse_args(argv)
  try:
    if args.command == "study":
      stem = os.path.splitext(os.path.basename(args.spec))[0]
      study(args.spec, args.root or os.path.join("runs", "sweeps", stem),
            args.parallel, args.minutes, args.batch_size, args.seq_len)
    else:
      (_fit_command if args.command == "fit" else _plan_command)(args)
  except ScalingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
