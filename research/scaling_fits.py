"""The fits of research.scaling (its docstring describes them and fit.json):
reading a table of runs, L(N, D) by approach 3, L(N) and L(C), IsoFLOP
profiles and the extrapolation check."""

import csv
import itertools
import math

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

from errors import BadInput

LAW = "L(N, D) = E + A / N^alpha + B / D^beta"
LAW_PARAMS = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3
MIN_RUNS = 5  # approach 3 has five parameters
EXTRAPOLATION_TARGET = 0.03  # relative error the project accepts

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
        raise BadInput(
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
    raise BadInput(f"cannot read {path}: {e.strerror}") from e
  except (csv.Error, UnicodeDecodeError) as e:
    raise BadInput(f"{path} is not a readable CSV file: {e}") from e
  return rows


def _number(text: str | None, column: str, path: str, line: int) -> float:
  if text is None or not text.strip():
    raise BadInput(f"{path}, line {line}: no {column}")
  try:
    return float(text)
  except ValueError:
    raise BadInput(f"{path}, line {line}: {column} is {text!r}, not a "
                       "number") from None


def _runs(rows: list[dict]) -> dict:
  """The runs that count, as arrays N, D, L, C (6 N D), budget (nan where
  none), the run of each row (an index) and the number of rows skipped for
  their status; BadInput for rows a fit cannot use."""
  used = [(i, r) for i, r in enumerate(rows)
          if r.get("status", "done") == "done"]
  for i, r in used:
    where = f"line {r['line']}" if "line" in r else f"row {i}"
    for column in ("params", "tokens", "loss", "budget"):
      value = r.get(column)
      if value is None and column == "budget":
        continue
      if value is None:
        raise BadInput(f"{where}: no {column}")
      if not (math.isfinite(value) and value > 0):
        raise BadInput(f"{where}: {column} must be a positive number, "
                           f"got {value}")
  N, D, L = (np.array([r[c] for _, r in used], float)
             for c in ("params", "tokens", "loss"))
  skipped = len(rows) - len(used)
  note = f" ({skipped} skipped: status not done)" if skipped else ""
  if len(used) < MIN_RUNS:
    raise BadInput(f"{len(used)} runs{note}; a fit needs at least "
                       f"{MIN_RUNS}")
  for name, values in (("params", N), ("tokens", D)):
    if len(np.unique(values)) < 2:
      raise BadInput(f"every run has the same {name}; a fit needs runs "
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
  """Every fit of research.scaling's docstring over the rows (as read_table
  gives them); the dict that fit.json holds. BLAS runs on one thread: the
  fits are thousands of tiny L-BFGS-B problems, 10-20x slower with a thread
  per core on a busy 2-core machine."""
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
