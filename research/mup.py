"""muP (Tensor Programs V): a coordinate check and learning-rate transfer.

  python -m research.mup coord_check [--widths 64,128,256,512] [--steps 4] \\
      [--out runs/mup/coord_check]
  python -m research.mup transfer [configs/sweeps/mup_transfer.py] \\
      [--parallel 2] [--out DIR]

`coord_check` trains the same small GPT at each width, under the standard
parametrization and under muP (base width: the smallest), for a few steps
of Adam at one learning rate on Shakespeare, averaged over seeds, and
records the mean |activation| of every layer's output (the embedding, each
block's attention and MLP outputs before the residual add, the logits over
the real vocabulary) before each step. Per parametrization, layer and step
it fits log(mean |activation|) = a + slope * log(width): under muP every
slope should be <= 0.1 (flat, or shrinking as the logits do at
initialization); under the standard parametrization the activations grow
with the width. It writes OUT/coord_check.json and OUT/coord_check.png and
exits 1 if some muP slope is above 0.1.

`transfer` runs the sweep spec (widths x learning rates x both
parametrizations, via `python -m launch.sweep run`; the same command
resumes it), collects its results.csv and writes, beside it,
transfer.json, transfer.md (the table) and transfer.png (held-out loss vs
learning rate per width). The best learning rate of each width is the grid
value with the lowest final held-out loss; muP transfers when its best
stays within one grid step across the widths, while the standard
parametrization's moves by two or more.

Bad input stops either with one line `error: ...` and exit status 2.
"""

import argparse
import math
import os
import resource
import sys
import time

import numpy as np

from data import disk
import errors
from errors import BadInput


SLOPE_LIMIT = 0.1  # the largest log-log slope muP's coordinates may have
PARAMETRIZATIONS = ("standard", "mup")


# ---------------------------------------------------------------- slopes

def loglog_slope(widths, values) -> float:
  """The least-squares slope of log(value) against log(width): 0 for flat,
  0.5 for values that grow as sqrt(width). NaN if any value is not a
  positive finite number (a run that diverged)."""
  x = np.log(np.asarray(widths, np.float64))
  y = np.asarray(values, np.float64)
  if len(x) < 2 or not np.all(np.isfinite(y) & (y > 0)):
    return float("nan")
  return float(np.polyfit(x, np.log(y), 1)[0])


def slopes(mean_abs: dict, widths) -> dict:
  """{parametrization: {layer: [slope at step t, ...]}} of mean_abs, which
  is {parametrization: {layer: [[value at width w, ...] at step t, ...]}}."""
  return {p: {layer: [loglog_slope(widths, at_t) for at_t in per_step]
              for layer, per_step in layers.items()}
          for p, layers in mean_abs.items()}


# ------------------------------------------------------------ coord check

def _config(parametrization: str, width: int, args, seed: int):
  from configs import base
  c = base.get_config()
  c.model.update(num_layers=args.layers, d_model=width, num_heads=args.heads,
                 seq_len=args.seq_len, dropout=0.0, scan_layers=False,
                 parametrization=parametrization,
                 mup_base_width=args.base_width or min(args.widths))
  c.train.update(batch_size=args.batch_size, learning_rate=args.lr,
                 warmup_steps=0, schedule="constant", seed=seed,
                 steps=max(args.steps, 1))
  c.data.source = args.source
  c.perf.peak_flops = 1e12  # no matmul measurement: nothing here needs MFU
  return c


def layer_names(num_layers: int) -> list:
  return (["embedding"] + [f"block_{i}.{part}" for i in range(num_layers)
                           for part in ("attention", "mlp")] + ["logits"])


def _activations_fn(model):
  """jitted (params, tokens) -> {layer: mean |output|}, the outputs taken
  with flax's capture_intermediates (the model is not changed for it)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from model import gpt

  def captured(module, method):
    return method == "__call__" and (
        isinstance(module, (gpt.Attention, gpt.MLP)) or
        (isinstance(module, nn.Dropout) and isinstance(module.parent, gpt.GPT)))

  cfg = model.cfg
  mean_abs = lambda x: jnp.mean(jnp.abs(x.astype(jnp.float32)))

  def activations(params, tokens_BxL):
    logits_BxLxV, state = model.apply(
        {"params": params}, tokens_BxL, capture_intermediates=captured,
        mutable=["intermediates"])
    found = state["intermediates"]
    out = {"embedding": mean_abs(found["Dropout_0"]["__call__"][0])}
    for i in range(cfg.num_layers):
      block = found[f"block_{i}"]
      out[f"block_{i}.attention"] = mean_abs(
          block["Attention_0"]["__call__"][0][0])  # (output, cache)
      out[f"block_{i}.mlp"] = mean_abs(block["MLP_0"]["__call__"][0])
    out["logits"] = mean_abs(logits_BxLxV[..., :cfg.vocab_size])
    return out

  return jax.jit(activations)


def _batches(tokens, seq_len: int, batch_size: int, count: int, seed: int):
  """`count` batches of random windows of seq_len + 1 tokens, the same for
  every width of a seed."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - seq_len - 1, (count, batch_size))
  return [np.stack([np.asarray(tokens[s:s + seq_len + 1], np.int32)
                    for s in row]) for row in starts]


def run_coord_check(args) -> dict:
  """Trains every (parametrization, width) for args.steps steps per seed
  and returns the result JSON (mean |activation| per layer, width and step,
  averaged over seeds; the slopes; whether muP's are flat)."""
  import flax.linen as nn
  import jax
  from data import prepare
  from trainer import run as run_lib, sharding
  from trainer import state as state_lib

  first = _config("standard", args.widths[0], args, 0)
  data = prepare.of_config(first)
  vocab = data.tokenizer.vocab_size
  train_tokens = data.tokens("train")
  batches = {seed: _batches(train_tokens, args.seq_len, args.batch_size,
                            args.steps + 1, seed) for seed in args.seeds}
  layers = layer_names(args.layers)
  # sums[p][layer][t][w]: summed over seeds
  sums = {p: {layer: np.zeros((args.steps + 1, len(args.widths)))
              for layer in layers} for p in PARAMETRIZATIONS}
  started = time.monotonic()
  for p in PARAMETRIZATIONS:
    for w_index, width in enumerate(args.widths):
      config = _config(p, width, args, args.seeds[0])
      mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
      model, tx, rules, shardings = run_lib.model_and_optimizer(config, vocab,
                                                                mesh)
      batch_sharding = sharding.batch_sharding(mesh)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = state_lib.make_train_step(model, tx, shardings,
                                         grad_accum_steps=1, seed=0)
        activations = _activations_fn(model)
        for seed in args.seeds:
          state = state_lib.init_state(model, tx, shardings, seed)
          for t, batch in enumerate(batches[seed]):
            batch = sharding.to_global(batch, batch_sharding, batch.shape)
            found = jax.device_get(activations(state.params, batch[:, :-1]))
            for layer in layers:
              sums[p][layer][t, w_index] += float(found[layer])
            if t < args.steps:
              state, _ = step(state, batch)
      print(f"{p:>8} width {width:>4}: done ({time.monotonic() - started:.0f}"
            " s)", flush=True)
  mean_abs = {p: {layer: (sums[p][layer] / len(args.seeds)).tolist()
                  for layer in layers} for p in PARAMETRIZATIONS}
  fitted = slopes(mean_abs, args.widths)
  mup_max = max(max(s) for s in fitted["mup"].values())
  return {
      "widths": args.widths, "steps": args.steps, "seeds": args.seeds,
      "learning_rate": args.lr,
      "base_width": args.base_width or min(args.widths),
      "model": {"num_layers": args.layers, "num_heads": args.heads,
                "seq_len": args.seq_len, "batch_size": args.batch_size,
                "vocab_size": vocab, "source": args.source},
      "layers": layers,
      "mean_abs": mean_abs,  # [parametrization][layer][step][width]
      "slopes": fitted,      # [parametrization][layer][step]
      "slope_limit": SLOPE_LIMIT,
      "mup_max_slope": mup_max,
      "standard_max_slope": max(max(s) for s in fitted["standard"].values()),
      "mup_flat": bool(mup_max <= SLOPE_LIMIT),
      "seconds": round(time.monotonic() - started, 1),
  }


def coord_check_table(result: dict) -> str:
  """Markdown: each layer's slope at the first and last step, and the
  largest over the steps, under both parametrizations."""
  t = result["steps"]
  lines = [f"| layer | standard: step 0 | standard: step {t} | muP: step 0 | "
           f"muP: step {t} | muP: largest, steps 0-{t} |",
           "| --- | --- | --- | --- | --- | --- |"]
  for layer in result["layers"]:
    sp, mup = (result["slopes"][p][layer] for p in PARAMETRIZATIONS)
    lines.append(f"| {layer} | {sp[0]:+.3f} | {sp[-1]:+.3f} | {mup[0]:+.3f} "
                 f"| {mup[-1]:+.3f} | {max(mup):+.3f} |")
  return "\n".join(lines)


def plot_coord_check(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = sorted({0, 1, result["steps"] // 2, result["steps"]})
  steps = [t for t in steps if t <= result["steps"]]
  fig, axes = plt.subplots(2, len(steps), figsize=(3.6 * len(steps), 6.4),
                           sharex=True, squeeze=False)
  widths = result["widths"]
  for row, p in enumerate(PARAMETRIZATIONS):
    for col, t in enumerate(steps):
      ax = axes[row][col]
      for layer in result["layers"]:
        ax.plot(widths, [result["mean_abs"][p][layer][t][i]
                         for i in range(len(widths))], marker="o",
                label=layer)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_title(f"{'muP' if p == 'mup' else 'standard'}, step {t}")
      if col == 0:
        ax.set_ylabel("mean |activation|")
      if row == 1:
        ax.set_xlabel("width (d_model)")
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(f"coordinate check: lr {result['learning_rate']:g}, "
               f"{len(result['seeds'])} seeds, muP base width "
               f"{result['base_width']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _coord_check_command(args) -> int:
  if len(args.widths) < 2 or min(args.widths) < 1:
    raise BadInput("--widths needs at least two positive widths")
  if any(w % args.heads for w in args.widths):
    raise BadInput(f"every width must be a multiple of --heads={args.heads}")
  if args.steps < 0 or not args.seeds:
    raise BadInput("--steps must be >= 0 and --seeds non-empty")
  result = run_coord_check(args)
  os.makedirs(args.out, exist_ok=True)
  disk.write_json(os.path.join(args.out, "coord_check.json"), result,
                  indent=2)
  plot_coord_check(result, os.path.join(args.out, "coord_check.png"))
  print(coord_check_table(result))
  print(f"muP: largest slope {result['mup_max_slope']:+.3f} "
        f"({'flat' if result['mup_flat'] else 'NOT flat'}: limit "
        f"{SLOPE_LIMIT}); standard: largest {result['standard_max_slope']:+.3f}")
  print(f"wrote {args.out}/coord_check.json and coord_check.png "
        f"({result['seconds']:.0f} s)")
  return 0 if result["mup_flat"] else 1


# ---------------------------------------------------------------- transfer

def transfer_summary(rows: list) -> dict:
  """From a sweep's results rows (parametrization, d_model,
  learning_rate, loss): the loss grid and the best learning rate per width,
  and how far the best moves across the widths in grid steps."""
  grid = {}
  for row in rows:
    if row.get("kind", "run") != "run":
      continue
    p, w = row["model.parametrization"], int(row["model.d_model"])
    lr = float(row["train.learning_rate"])
    loss = row.get("loss")
    loss = float(loss) if loss not in (None, "") else float("nan")
    if row.get("status", "done") != "done":
      loss = float("nan")
    grid.setdefault(p, {}).setdefault(w, {})[lr] = loss
  if set(grid) != set(PARAMETRIZATIONS):
    raise BadInput("the results need runs of both parametrizations "
                   f"{list(PARAMETRIZATIONS)}, found {sorted(grid)}")
  lrs = sorted({lr for p in grid.values() for w in p.values() for lr in w})
  out = {"learning_rates": lrs, "parametrizations": {}}
  for p in PARAMETRIZATIONS:
    widths = sorted(grid[p])
    best = {}
    for w in widths:
      finite = {lr: l for lr, l in grid[p][w].items() if math.isfinite(l)}
      best[w] = min(finite, key=finite.get) if finite else None
    steps = [lrs.index(best[w]) for w in widths if best[w] is not None]
    edge = [w for w in widths if best[w] in (lrs[0], lrs[-1])]
    out["parametrizations"][p] = {
        "widths": widths,
        "loss": {str(w): {repr(lr): grid[p][w].get(lr, float("nan"))
                          for lr in lrs} for w in widths},
        "best_learning_rate": {str(w): best[w] for w in widths},
        "best_spread_steps": (max(steps) - min(steps)) if steps else None,
        "widths_with_a_best": len(steps),
        # A best at the grid's edge may lie beyond it: the spread is then a
        # lower bound.
        "best_at_grid_edge": edge,
        "complete": all(math.isfinite(grid[p][w].get(lr, float("nan")))
                        for w in widths for lr in lrs),
    }
  mup, sp = out["parametrizations"]["mup"], out["parametrizations"]["standard"]
  out["mup_transfers"] = (mup["widths_with_a_best"] >= 4 and
                          not mup["best_at_grid_edge"] and
                          mup["best_spread_steps"] <= 1)
  out["standard_moves"] = (sp["widths_with_a_best"] >= 4 and
                           sp["best_spread_steps"] >= 2)
  return out


def transfer_table(summary: dict) -> str:
  """Markdown: held-out loss per width and learning rate, the best bold."""
  lrs = summary["learning_rates"]
  lines = ["| parametrization | width | " + " | ".join(
      _lr_label(lr) for lr in lrs) + " | best |",
           "| --- | --- |" + " --- |" * (len(lrs) + 1)]
  for p in PARAMETRIZATIONS:
    s = summary["parametrizations"][p]
    for w in s["widths"]:
      best = s["best_learning_rate"][str(w)]
      cells = []
      for lr in lrs:
        loss = s["loss"][str(w)][repr(lr)]
        text = "-" if not math.isfinite(loss) else f"{loss:.4f}"
        cells.append(f"**{text}**" if lr == best else text)
      lines.append(f"| {'muP' if p == 'mup' else 'standard'} | {w} | "
                   + " | ".join(cells) + f" | {_lr_label(best)} |")
  return "\n".join(lines)


def _lr_label(lr) -> str:
  if lr is None:
    return "-"
  k = math.log2(lr)
  return f"2^{k:.0f}" if abs(k - round(k)) < 1e-9 else f"{lr:g}"


def plot_transfer(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  lrs = summary["learning_rates"]
  for ax, p in zip(axes, PARAMETRIZATIONS):
    s = summary["parametrizations"][p]
    for w in s["widths"]:
      losses = [s["loss"][str(w)][repr(lr)] for lr in lrs]
      line, = ax.plot(lrs, losses, marker="o", label=f"width {w}")
      best = s["best_learning_rate"][str(w)]
      if best is not None:
        ax.plot([best], [s["loss"][str(w)][repr(best)]], marker="*",
                markersize=14, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate (peak)")
    spread = s["best_spread_steps"]
    ax.set_title(f"{'muP' if p == 'mup' else 'standard'}: the best moves "
                 f"{spread} grid step{'' if spread == 1 else 's'}")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("held-out loss (nats/char)")
  axes[1].legend()
  finite = [v for p in summary["parametrizations"].values()
            for per_w in p["loss"].values() for v in per_w.values()
            if math.isfinite(v)]
  if finite:
    low = min(finite)
    axes[0].set_ylim(low - 0.05, min(max(finite), low + 1.2))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _transfer_command(args) -> int:
  from launch.sweep import cli, results
  from launch.sweep.spec import load
  root = args.root or os.path.join(
      "runs", "sweeps", os.path.splitext(os.path.basename(args.spec))[0])
  started = time.monotonic()
  if not args.summary_only:
    status = cli.main(["run", args.spec, "--root", root, "--parallel",
                       str(args.parallel)])
    if status:
      raise BadInput(f"the sweep stopped with status {status} (see its "
                     "table above); the same command resumes it")
  rows = results.collect(load(args.spec, root))
  summary = transfer_summary(rows)
  # The runs' own times, summed (they ran --parallel at a time); and, when
  # this command ran the sweep, its wall time and its train.py processes'
  # CPU time: the cost on an idle machine, whatever else shared this one.
  summary["runs_wall_s_sum"] = round(sum(r["wall_s"] or 0 for r in rows), 1)
  if not args.summary_only:
    summary["this_command_s"] = round(time.monotonic() - started, 1)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary["this_command_cpu_s"] = round(children.ru_utime +
                                          children.ru_stime, 1)
  out = args.out or root
  os.makedirs(out, exist_ok=True)
  disk.write_json(os.path.join(out, "transfer.json"), summary, indent=2)
  table = transfer_table(summary)
  with open(os.path.join(out, "transfer.md"), "w") as f:
    f.write(table + "\n")
  plot_transfer(summary, os.path.join(out, "transfer.png"))
  print(table)
  for p in PARAMETRIZATIONS:
    s = summary["parametrizations"][p]
    print(f"{p}: best learning rate per width "
          + ", ".join(f"{w}: {_lr_label(s['best_learning_rate'][str(w)])}"
                      for w in s["widths"])
          + f"; moves {s['best_spread_steps']} grid step(s)")
  print(f"muP transfers (within 1 step over >= 4 widths): "
        f"{summary['mup_transfers']}; standard moves >= 2 steps: "
        f"{summary['standard_moves']}")
  if not args.summary_only:
    print(f"this command: {summary['this_command_s'] / 60:.1f} minutes, its "
          f"runs {summary['this_command_cpu_s'] / 60:.1f} CPU minutes")
  print(f"wrote {out}/transfer.json, transfer.md and transfer.png")
  return 0 if summary["mup_transfers"] and summary["standard_moves"] else 1


# ------------------------------------------------------------------ the CLI

def _ints(text: str) -> list:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a comma-separated list of integers") from None


@errors.command
def main(argv: list | None = None) -> int:
  parser = errors.ArgumentParser(
      prog="python -m research.mup", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  c = commands.add_parser("coord_check", help="mean |activation| per layer "
                          "vs width, standard vs muP")
  c.add_argument("--widths", type=_ints, default=[64, 128, 256, 512],
                 help="d_model values, comma-separated (default 64,128,256,"
                 "512)")
  c.add_argument("--base-width", type=int, default=0,
                 help="muP's base width (default: the smallest width)")
  c.add_argument("--steps", type=int, default=4,
                 help="Adam steps (default %(default)s)")
  c.add_argument("--lr", type=float, default=1e-2,
                 help="learning rate, constant (default %(default)s)")
  c.add_argument("--seeds", type=_ints, default=[0, 1, 2],
                 help="seeds to average over (default 0,1,2)")
  c.add_argument("--layers", type=int, default=2)
  c.add_argument("--heads", type=int, default=4)
  c.add_argument("--seq-len", type=int, default=64)
  c.add_argument("--batch-size", type=int, default=16)
  c.add_argument("--source", default="shakespeare",
                 help="data.source (default %(default)s)")
  c.add_argument("--out", default=os.path.join("runs", "mup", "coord_check"))
  t = commands.add_parser("transfer", help="the learning-rate transfer sweep "
                          "and its summary")
  t.add_argument("spec", nargs="?", default="configs/sweeps/mup_transfer.py")
  t.add_argument("--root", help="the sweep's root (default: "
                 "runs/sweeps/<spec file stem>)")
  t.add_argument("--parallel", type=int, default=2)
  t.add_argument("--out", help="where the summary goes (default: the root)")
  t.add_argument("--summary-only", action="store_true",
                 help="summarize the runs there are; start none")
  args = parser.parse_args(argv)
  if args.command == "coord_check":
    return _coord_check_command(args)
  return _transfer_command(args)


if __name__ == "__main__":
  sys.exit(main())
