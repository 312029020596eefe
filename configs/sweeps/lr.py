"""Learning rate x width of the default model, 300 steps each.

Command:  python -m launch.sweep run configs/sweeps/lr.py
          python -m launch.sweep collect configs/sweeps/lr.py
Expect:   6 runs of 300 steps (1.2M tokens each), one at a time: 13 minutes
          on a 2-core AMD EPYC (2026-12-07, beside a test run; 1.5-2 minutes
          per d_model=48 run, 1.7-3 for d_model=96, evals over the whole
          held-out split included). Held-out loss at step 300
          (runs/sweeps/lr/results.csv, loss):

            d_model (params*)   lr 4e-3   1.6e-2   6.4e-2
            48 (0.085M)          2.416     2.244    2.549
            96 (0.336M)          2.253     2.081    2.787
            * non-embedding

          At this short horizon 1.6e-2, 3.5x the default's peak (tuned for
          3,600 steps), is best at both widths and 6.4e-2 is too high, more so
          for the wider model.
"""


def get_sweep():
  return {
      "base": "configs/base.py",
      "overrides": {"train.steps": 300, "eval.every_steps": 100,
                    "checkpoint.every_steps": 100},
      "axes": [{"grid": {"model.d_model": [48, 96],
                         "train.learning_rate": [4e-3, 1.6e-2, 6.4e-2]}}],
  }
