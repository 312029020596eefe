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
import json
import os
import sys

import layout
from data import disk
import errors
from errors import BadInput
from research.scaling_fits import (LAW_PARAMS, fit, fit_summary, predict,
                                   read_table)
from research.scaling_plan import plan, plan_table
from research.scaling_plots import write_plots


# ------------------------------------------------------------------ the CLI


def _fit_command(args) -> None:
  if args.bootstrap < 0:
    raise BadInput(f"--bootstrap must be >= 0, got {args.bootstrap}")
  result = fit(read_table(args.table), bootstrap=args.bootstrap,
               seed=args.seed)
  out = args.out or os.path.dirname(os.path.abspath(args.table))
  try:
    os.makedirs(out, exist_ok=True)
    paths = write_plots(result, out)
    disk.write_json(os.path.join(out, "fit.json"), result, indent=2)
  except OSError as e:
    raise BadInput(f"cannot write to {out}: {e.strerror}") from e
  print(fit_summary(result))
  print(f"wrote {os.path.join(out, 'fit.json')} and "
        + ", ".join(os.path.basename(p) for p in paths))


def _plan_command(args) -> None:
  try:
    with open(args.fit) as f:
      fit_result = json.load(f)
  except OSError as e:
    raise BadInput(f"cannot read {args.fit}: {e.strerror}") from e
  except ValueError as e:
    raise BadInput(f"{args.fit} is not JSON: {e}") from e
  if not isinstance(fit_result, dict):
    raise BadInput(f"{args.fit} is not a fit.json of `fit`")
  p = plan(fit_result, args.flops, args.batch_size, args.seq_len)
  print(plan_table(p))
  if args.out:
    try:
      disk.write_json(args.out, p, indent=2)
    except OSError as e:
      raise BadInput(f"cannot write {args.out}: {e.strerror}") from e
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
      with open(os.path.join(row["workdir"], layout.RUN)) as f:
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
  from launch.sweep import cli, results  # here: fits and plans need no trainer
  from launch.sweep.spec import load
  status = cli.main(["run", spec, "--root", root, "--parallel",
                     str(parallel)])
  if status:
    raise BadInput(f"the sweep stopped with status {status} (see its "
                       "table above); the same command resumes it")
  rows = results.collect(load(spec, root))
  result = fit(rows)
  out = os.path.join(root, "fit")
  os.makedirs(out, exist_ok=True)
  paths = write_plots(result, out)
  disk.write_json(os.path.join(out, "fit.json"), result, indent=2)
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
  disk.write_json(os.path.join(root, "recommendation.json"),
                  {"minutes": minutes, "by_time": options,
                   "by_flops": compute}, indent=2)
  print(f"\nrecommended for {minutes:g} minutes here: {options[0]['shape']} "
        f"(predicted held-out loss {options[0]['loss']:.4f})")


@errors.command
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
  if args.command == "study":
    stem = os.path.splitext(os.path.basename(args.spec))[0]
    study(args.spec, args.root or os.path.join("runs", "sweeps", stem),
          args.parallel, args.minutes, args.batch_size, args.seq_len)
  else:
    (_fit_command if args.command == "fit" else _plan_command)(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
