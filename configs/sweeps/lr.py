"""Learning rate x width of the default model, 300 steps each.

Command:  python -m launch.sweep run configs/sweeps/lr.py
          python -m launch.sweep collect configs/sweeps/lr.py
Expect:   TODO
"""


def get_sweep():
  return {
      "base": "configs/default.py",
      "overrides": {"train.steps": 300, "eval.every_steps": 100,
                    "checkpoint.every_steps": 100},
      "axes": [{"grid": {"model.d_model": [64, 128],
                         "train.learning_rate": [4e-3, 1.6e-2, 6.4e-2]}}],
  }
