"""The plots of a fit of research.scaling: loss vs N, loss vs compute,
IsoFLOP profiles and residuals."""

import os

import numpy as np

from research.scaling_fits import HUBER_DELTA, LAW_PARAMS, predict

PLOTS = ("loss_vs_params.png", "loss_vs_compute.png", "isoflop.png",
         "residuals.png")


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
