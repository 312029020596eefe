"""Learning rate x width of the default model, 300 steps each.

Command:  python -m launch.sweep run configs/sweeps/lr.py
          python -m launch.sweep collect configs/sweeps/lr.py
Expect:   6 runs of 300 steps (1.2M tokens each), one at a time: 29 minutes
          on a busy 2-core CPU (2.5-3 minutes per d_model=64 run, 7 for
          d_model=128). Held-out loss at step 300 (runs/sweeps/lr/results.csv,
          final_eval_loss):

            d_model (params)   lr 4e-3   1.6e-2   6.4e-2
            64 (0.21M)          2.418     2.288    2.623
            128 (0.82M)         2.228     2.208    2.736

          At this short horizon 1.6e-2, 4x the default's peak (tuned for
          1,200 steps), is best at both widths and 6.4e-2 is too high; the
          wider model gains less from the higher rate. Runs are
          deterministic: the 4 that ran in two sweeps matched to 4 decimals.
"""


def get_sweep():
  return {
      "base": "configs/default.py",
      "overrides": {"train.steps": 300, "eval.every_steps": 100,
                    "checkpoint.every_steps": 100},
      "axes": [{"grid": {"model.d_model": [48, 96],
                         "train.learning_rate": [4e-3, 1.6e-2, 6.4e-2]}}],
  }
