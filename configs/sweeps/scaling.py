"""A scaling study on the built-in corpus: 6 sizes x 4 token budgets.

Command:  python -m research.scaling study            # this spec, 2 at a time
          python -m launch.sweep run configs/sweeps/scaling.py   # the sweep alone
Expect:   see README.md, "Scaling-law studies" (the fitted law, its plots and
          the recommended default, with the time it took on a 2-core CPU).

Sizes from 2 x 32 to 4 x 192 (26K to 1.8M non-embedding parameters, 70x),
the default's batch of 32 x 128 characters. Each size is one wsd run of 1,200
steps (4.9M tokens, its own decay over the last 20%) with cooldown branches
at 1/8, 1/4 and 1/2 of it: four budgets from 0.6M to 4.9M tokens for 1.2x
the steps of the longest. The learning rate shrinks with the width as
4e-3 * sqrt(128 / d_model), the default's at d_model 128. Evals: the whole
held-out split (Hamlet, The Tempest) once, at the end of every run and
branch.
"""

WIDTHS = (32, 48, 64, 96, 128, 192)


def get_sweep():
  return {
      "base": "configs/default.py",
      "overrides": {
          "train.steps": 1200, "train.schedule": "wsd",
          "train.decay_fraction": 0.2, "eval.every_steps": 1200,
          "checkpoint.every_steps": 300, "sample.max_new_tokens": 50,
      },
      "axes": [{"zip": {
          "model.num_layers": [2, 2, 3, 3, 4, 4],
          "model.d_model": list(WIDTHS),
          "model.num_heads": [2, 2, 2, 3, 4, 6],
          "train.learning_rate": [round(4e-3 * (128 / d) ** 0.5, 5)
                                  for d in WIDTHS],
      }}],
      "cooldowns": [0.125, 0.25, 0.5],
  }
