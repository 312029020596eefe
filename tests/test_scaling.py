"""research.scaling: the fits recover laws the data were made from, the
planner agrees with a numeric optimum and builds real shapes, and the CLI
writes what it documents or stops with one line."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

from conftest import REPO
from model import GPTConfig
from research import scaling, scaling_fits, scaling_plan, scaling_plots

# Like a character-level model's: losses from about 1.6 to 4.7 nats.
TRUE = dict(E=1.2, A=40.0, B=60.0, alpha=0.35, beta=0.3)
FIT_KEYS = {"law", "E", "A", "B", "alpha", "beta", "ci95", "bootstrap",
            "huber_delta", "huber_objective", "L_N", "L_C", "isoflop",
            "extrapolation", "params_convention", "flops_convention", "runs",
            "skipped", "rows"}


def grid_rows(sizes, budgets, noise, seed=0):
  """A run per (size, token budget), losses from TRUE times 1 + noise."""
  rng = np.random.default_rng(seed)
  return [{"params": float(n), "tokens": float(d),
           "loss": float(scaling_fits.predict(TRUE, n, d)
                         * (1 + noise * rng.standard_normal()))}
          for n in sizes for d in budgets]


def isoflop_rows(budgets, noise, seed=0):
  """7 sizes per compute budget around (not centred on) the true N_opt,
  each row with its designed budget."""
  rng = np.random.default_rng(seed)
  rows = []
  for c in budgets:
    n_opt, _ = scaling_plan.optimal_allocation(TRUE, c)
    for n in n_opt * 1.3 * np.geomspace(1 / 4, 4, 7):
      d = c / (6 * n)
      rows.append({"params": float(n), "tokens": float(d), "budget": c,
                   "loss": float(scaling_fits.predict(TRUE, n, d)
                                 * (1 + noise * rng.standard_normal()))})
  return rows


def write_table(path, rows, columns):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


def test_fit_recovers_known_law():
  # With 10 sizes x 8 budgets at 0.3% noise, 49 of seeds 0-49 meet these
  # tolerances: they are not tuned to this seed.
  rows = grid_rows(np.geomspace(1e4, 1e6, 10), np.geomspace(1e5, 1e8, 8),
                   noise=0.003)
  result = scaling_fits.fit(rows, bootstrap=20)
  assert abs(result["alpha"] - TRUE["alpha"]) < 0.01
  assert abs(result["beta"] - TRUE["beta"]) < 0.01
  assert abs(result["E"] - TRUE["E"]) < 0.02
  # The optimizer did at least as well as the truth on its own objective.
  logs = [np.log([r[k] for r in rows]) for k in ("params", "tokens", "loss")]
  theta = [math.log(TRUE["A"]), math.log(TRUE["B"]), math.log(TRUE["E"]),
           TRUE["alpha"], TRUE["beta"]]
  at_truth = scaling_fits._objective(np.array(theta), *logs)[0]
  assert result["huber_objective"] <= at_truth * scaling_fits.HUBER_DELTA ** 2
  assert result["bootstrap"]["fitted"] == 20
  for k in scaling_fits.LAW_PARAMS:
    lo, hi = result["ci95"][k]
    assert lo < hi and lo <= result[k] * 1.001 and result[k] <= hi * 1.001
  x = result["extrapolation"]
  assert x["held_out_params"] == 1e6 and len(x["runs"]) == 8
  assert x["within_target"] and x["max_abs_relative_error"] < 0.03
  assert result["flops_convention"] == "6ND" and result["skipped"] == 0


def test_power_law_fits_of_exact_laws():
  n = np.geomspace(1e4, 1e7, 8)
  p = scaling_fits.fit_power_law(n, 1.5 + 30 * n ** -0.25)
  assert p["k"] == pytest.approx(0.25, abs=1e-6)
  assert p["E"] == pytest.approx(1.5, abs=1e-6)
  assert p["A"] == pytest.approx(30, rel=1e-4)
  assert p["r2"] > 1 - 1e-10
  c = np.geomspace(1e12, 1e20, 9)  # FLOPs: columns of 1e-20 without scaling
  p = scaling_fits.fit_power_law(c, 2.0 + 1e3 * c ** -0.12)
  assert p["k"] == pytest.approx(0.12, abs=1e-6)
  assert p["E"] == pytest.approx(2.0, abs=1e-6)
  assert p["r2"] > 1 - 1e-10


def test_L_N_uses_the_best_run_of_each_size():
  sizes = np.geomspace(1e4, 1e6, 6)
  best = 1.5 + 30 * sizes ** -0.25
  rows = [{"params": n, "tokens": d, "loss": l + extra}
          for n, l in zip(sizes, best)
          for d, extra in ((1e6, 0.4), (1e7, 0.1), (1e8, 0.0))]
  result = scaling_fits.fit(rows, bootstrap=0)
  assert result["L_N"]["alpha"] == pytest.approx(0.25, abs=1e-5)
  assert result["L_N"]["E"] == pytest.approx(1.5, abs=1e-5)
  assert result["L_N"]["r2"] > 1 - 1e-9
  assert result["L_N"]["sizes"] == 6


def test_compute_frontier_of_a_toy_table():
  flops = [1, 2, 2, 3, 4, 5, 5, 6]
  loss = [5, 4, 4.5, 4.2, 3, 3, 2.5, 2.5]
  # (2, 4.5) loses to (2, 4) at equal compute, (3, 4.2) to (2, 4), (5, 3) to
  # (5, 2.5), and (6, 2.5) is no lower than (5, 2.5).
  assert scaling_fits.compute_frontier(flops, loss) == [0, 1, 4, 6]
  # C = 6 N D: tokens that give each run the toy's compute (x 6 * 2^20),
  # in powers of two, so that equal compute is exactly equal.
  rows = [{"params": 2.0 ** (10 + i % 3), "loss": l,
           "tokens": c * 2.0 ** (10 - i % 3), "flops": 1.0}
          for i, (c, l) in enumerate(zip(flops, loss))]
  result = scaling_fits.fit(rows, bootstrap=0)
  assert [i for i, r in enumerate(result["rows"]) if r["frontier"]] == [
      0, 1, 4, 6]
  assert result["L_C"]["frontier_runs"] == 4
  assert result["flops_convention"] == "6ND"
  assert [r["flops"] for r in result["rows"]] == [c * 6 * 2 ** 20
                                                  for c in flops]


def test_isoflop_budgets_are_the_designed_ones():
  """Budgets 9% apart stay apart; rows without a budget are in none."""
  budget = np.array([1.09e12, 1e12, 5e12, np.nan, 1e12, 1.09e12])
  assert scaling_fits.isoflop_budgets(budget) == [
      (1e12, [1, 4]), (1.09e12, [0, 5]), (5e12, [2])]


def test_the_bootstrap_draws_runs_with_their_branches(monkeypatch):
  """Rows of one run (its name, or its parent's) are drawn together: in
  every resample a run's three rows appear equally often."""
  rows = []
  for n in np.geomspace(1e4, 1e6, 4):
    for d in (1e6, 1e7):
      run = f"{n:g},{d:g}"
      for f in (1, 0.25, 0.5):
        rows.append({"params": n, "tokens": d * f,
                     "loss": float(scaling_fits.predict(TRUE, n, d * f)),
                     "name": run if f == 1 else f"{run}/cooldowns/{f}",
                     "parent": None if f == 1 else run})
  seen = []
  fit_law = scaling_fits._fit_law

  def recording(logN, logD, logL, **kwargs):
    seen.append(sorted(zip(logN, logD)))
    return fit_law(logN, logD, logL, **kwargs)
  monkeypatch.setattr(scaling_fits, "_fit_law", recording)
  run_of = {(math.log(r["params"]), math.log(r["tokens"])):
            r["parent"] or r["name"] for r in rows}
  scaling_fits.fit(rows, bootstrap=5)
  assert len(seen) >= 6  # the fit, the extrapolation and 5 resamples
  for sample in seen[1:6]:
    counts = {}
    for point in sample:
      counts.setdefault(run_of[point], []).append(point)
    assert all(len(points) % 3 == 0 for points in counts.values())


def test_isoflop_recovers_n_opt():
  budgets = np.geomspace(1e11, 1e14, 4)
  result = scaling_fits.fit(isoflop_rows(budgets, noise=0.002), bootstrap=0)
  iso = result["isoflop"]
  assert len(iso["budgets"]) == 4
  for b, c in zip(iso["budgets"], budgets):
    n_opt, d_opt = scaling_plan.optimal_allocation(TRUE, c)
    assert b["flops"] == pytest.approx(c, rel=1e-9)
    assert b["inside"]
    assert b["params_opt"] == pytest.approx(n_opt, rel=0.1)
    assert b["tokens_opt"] == pytest.approx(d_opt, rel=0.1)
  total = TRUE["alpha"] + TRUE["beta"]
  assert iso["params_opt_law"]["exponent"] == pytest.approx(
      TRUE["beta"] / total, abs=0.02)
  assert iso["tokens_opt_law"]["exponent"] == pytest.approx(
      TRUE["alpha"] / total, abs=0.02)


@pytest.mark.parametrize("flops", [1e10, 1e15, 1e20])
def test_plan_closed_form_is_the_brute_force_optimum(flops):
  n = np.exp(np.linspace(0, 50, 1_000_001))  # steps of 5e-5 in ln N
  losses = scaling_fits.predict(TRUE, n, flops / (6 * n))
  best = int(np.argmin(losses))
  assert 0 < best < len(n) - 1
  n_opt, d_opt = scaling_plan.optimal_allocation(TRUE, flops)
  assert n_opt == pytest.approx(n[best], rel=1e-4)
  assert 6 * n_opt * d_opt == pytest.approx(flops)
  p = scaling_plan.plan(TRUE, flops)
  assert p["compute_optimal"]["loss"] == pytest.approx(losses[best], rel=1e-9)


def _non_embedding(layers, d_model):
  return GPTConfig(vocab_size=1, seq_len=1, num_layers=layers,
                   d_model=d_model, num_heads=d_model // 32
                   ).num_params(embeddings=False)


def test_plan_builds_the_nearest_shape():
  p = scaling_plan.plan(TRUE, 1e15, batch_size=16, seq_len=256)
  n_opt, d_opt = (p["compute_optimal"][k] for k in ("params", "tokens"))
  s = p["shape"]
  assert s["d_model"] % 32 == 0 and s["head_dim"] in (32, 64)
  assert s["num_heads"] * s["head_dim"] == s["d_model"]
  assert 16 <= s["aspect_ratio"] == s["d_model"] / s["num_layers"] <= 128
  assert s["params"] == GPTConfig(
      vocab_size=1, seq_len=1, num_layers=s["num_layers"],
      d_model=s["d_model"], num_heads=s["num_heads"], d_ff=s["d_ff"]
  ).num_params(embeddings=False)
  # Every shape in the aspect range below 1e8 parameters (more layers or
  # width than this only build bigger ones): none is closer in log.
  distance = abs(math.log(s["params"] / n_opt))
  assert distance < math.log(1.05)
  for layers in range(1, 41):
    for d_model in range(32, 4097, 32):
      if 16 <= d_model / layers <= 128:
        assert abs(math.log(_non_embedding(layers, d_model) / n_opt)) >= (
            distance - 1e-12)
  assert s["steps"] == round(d_opt / (16 * 256))
  assert s["tokens"] == s["steps"] * 16 * 256
  assert s["loss"] == pytest.approx(
      scaling_fits.predict(TRUE, s["params"], s["tokens"]))
  big = scaling_plan.plan(TRUE, 1e22)["shape"]  # ~4e9 parameters
  assert abs(math.log(big["params"] / scaling_plan.optimal_allocation(
      TRUE, 1e22)[0])) < math.log(1.02)
  assert 16 <= big["aspect_ratio"] <= 128


def _pngs_readable(out_dir, names):
  for name in names:
    pixels = image.imread(os.path.join(out_dir, name))
    height, width = pixels.shape[:2]
    assert height >= 400 and width >= 600, name
    assert pixels.std() > 0.05, name  # not blank


def test_cli_fit_writes_json_and_plots(tmp_path, capsys):
  rows = isoflop_rows(np.geomspace(1e11, 1e13, 3), noise=0.003)
  for r in rows:
    r["status"] = "done"
  rows.append({"params": 5e3, "tokens": 1e5, "loss": "", "status": "failed"})
  rows.append({"params": 1e7, "tokens": 1e9, "loss": 0.1,
               "status": "running"})
  table = write_table(tmp_path / "results.csv", rows,
                      ["params", "tokens", "loss", "budget", "status"])
  out = tmp_path / "fits"
  assert scaling.main(["fit", table, "--out", str(out),
                       "--bootstrap", "10"]) == 0
  stdout = capsys.readouterr().out
  assert "21 runs (2 skipped: status not done)" in stdout
  assert "extrapolation to N" in stdout
  result = json.loads((out / "fit.json").read_text())
  assert set(result) == FIT_KEYS
  assert result["runs"] == 21 and result["skipped"] == 2
  assert len(result["rows"]) == 21
  assert max(r["params"] for r in result["rows"]) < 1e7  # running: unused
  assert result["flops_convention"] == "6ND"
  assert len(result["isoflop"]["budgets"]) == 3
  assert set(result["ci95"]) == set(scaling_fits.LAW_PARAMS)
  _pngs_readable(out, scaling_plots.PLOTS)


def test_cli_fit_defaults_to_the_tables_folder(tmp_path, capsys):
  """A grid of sizes x token budgets: no IsoFLOP budgets, so no
  isoflop.png (an earlier one is removed)."""
  rows = grid_rows(np.geomspace(1e4, 1e6, 4), [1e5, 1e6, 1e7], noise=0.003)
  table = write_table(tmp_path / "t.csv", rows, ["params", "tokens", "loss"])
  (tmp_path / "isoflop.png").write_bytes(b"from an earlier fit")
  assert scaling.main(["fit", table, "--bootstrap", "0"]) == 0
  result = json.loads((tmp_path / "fit.json").read_text())
  assert result["isoflop"] is None and result["ci95"] is None
  assert not (tmp_path / "isoflop.png").exists()
  _pngs_readable(tmp_path,
                 [n for n in scaling_plots.PLOTS if n != "isoflop.png"])


BAD_TABLES = {
    "no loss column": ("params,tokens,flops\n1e4,1e5,6e9\n", "lacks loss"),
    "too few runs": ("params,tokens,loss\n1e4,1e5,3\n1e5,1e6,2\n",
                     "2 runs; a fit needs at least 5"),
    "one size": ("params,tokens,loss\n" + "".join(
        f"1e4,{d},3\n" for d in (1e5, 1e6, 1e7, 1e8, 1e9)),
                 "every run has the same params"),
    "zero loss": ("params,tokens,loss\n1e4,1e5,3\n2e4,1e6,2.5\n4e4,1e7,0\n"
                  "8e4,1e8,2\n1.6e5,1e9,1.9\n",
                  "line 4: loss must be a positive number"),
    "not a number": ("params,tokens,loss\n1e4,1e5,abc\n", "line 2: loss is "),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_cli_fit_refuses_bad_tables(tmp_path, capsys, case):
  text, message = BAD_TABLES[case]
  (tmp_path / "t.csv").write_text(text)
  out = tmp_path / "out"
  assert scaling.main(["fit", str(tmp_path / "t.csv"), "--out",
                       str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err
  assert err.count("\n") == 1
  assert not out.exists()


def test_cli_fit_without_loss_column_exits_2(tmp_path):
  """As a real command: one line, status 2, nothing written."""
  (tmp_path / "t.csv").write_text("params,tokens\n1e4,1e5\n")
  proc = subprocess.run(
      [sys.executable, "-m", "research.scaling", "fit",
       str(tmp_path / "t.csv")], cwd=REPO, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
  assert "loss" in proc.stderr and proc.stdout == ""
  assert os.listdir(tmp_path) == ["t.csv"]


def test_cli_plan(tmp_path, capsys):
  fit_json = tmp_path / "fit.json"
  fit_json.write_text(json.dumps(TRUE))
  out = tmp_path / "plan.json"
  assert scaling.main(["plan", "--fit", str(fit_json), "--flops", "1e15",
                       "--out", str(out)]) == 0
  stdout = capsys.readouterr().out
  assert "compute-optimal" in stdout and "--config.train.steps=" in stdout
  assert json.loads(out.read_text()) == json.loads(json.dumps(
      scaling_plan.plan(TRUE, 1e15)))
  assert scaling.main(["plan", "--fit", str(fit_json), "--flops", "0"]) == 2
  fit_json.write_text(json.dumps({"E": 1.0}))
  assert scaling.main(["plan", "--fit", str(fit_json), "--flops", "1e15"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_time_budget_ranks_sizes_by_the_loss_they_reach():
  """A size reaches tokens = tokens/s x seconds, scored by the law: a
  faster small model can beat a slower large one, and the order says so."""
  sizes = [{"shape": "small", "params": 1e4, "tokens_per_sec": 1e5,
            "flops_per_token": 1e5},
           {"shape": "large", "params": 1e6, "tokens_per_sec": 1e3,
            "flops_per_token": 1e7}]
  options = scaling.time_budget(TRUE, sizes, seconds=100.0)
  for o in options:
    expected = scaling_fits.predict(TRUE, o["params"],
                                    o["tokens_per_sec"] * 100)
    assert o["tokens"] == o["tokens_per_sec"] * 100
    assert o["loss"] == pytest.approx(float(expected))
    assert o["flops_per_sec"] == o["tokens_per_sec"] * o["flops_per_token"]
  assert [o["loss"] for o in options] == sorted(o["loss"] for o in options)
  assert [o["shape"] for o in options] == ["small", "large"]
