"""A scaling study on the built-in corpus: 6 sizes x 3 token budgets.

Command:  python -m research.scaling study            # this spec, 2 at a time
          python -m launch.sweep run configs/sweeps/scaling.py   # the sweep alone
Expect:   see docs/scaling.md (the fitted law, its plots and
          the recommendation, with the time it took on a 2-core CPU).

Sizes from 1 x 32 to 4 x 128 (13K to 0.79M non-embedding parameters, 61x),
the default's batch of 32 x 128 characters. Each size is one wsd run (its
own decay over the last 20%) with cooldown branches at 1/4 and 1/2 of it:
three budgets for 1.15x the steps of the longest. Small models are cheap,
so they see more tokens (13M for the smallest, 4.9M for the largest): the
budgets span 1.2M to 13M tokens, from under- to over-trained, which is what
pins down both exponents. The learning rate shrinks with the width as
4e-3 * sqrt(128 / d_model), the default's at d_model 128. Evals: the whole
held-out split (Hamlet, The Tempest) once, at the end of every run and
branch.
"""

SIZES = (  # num_layers, d_model, num_heads, steps
    (1, 32, 2, 3200), (2, 32, 2, 3200), (2, 48, 2, 2400), (3, 64, 2, 1600),
    (3, 96, 3, 1200), (4, 128, 4, 1200))


def get_sweep():
  return {
      "base": "configs/base.py",
      "overrides": {
          "train.schedule": "wsd", "train.decay_fraction": 0.2,
          "eval.every_steps": 4000, "checkpoint.every_steps": 400,
          "sample.max_new_tokens": 50,
      },
      "axes": [{"zip": {
          "model.num_layers": [s[0] for s in SIZES],
          "model.d_model": [s[1] for s in SIZES],
          "model.num_heads": [s[2] for s in SIZES],
          "train.steps": [s[3] for s in SIZES],
          "train.learning_rate": [round(4e-3 * (128 / s[1]) ** 0.5, 5)
                                  for s in SIZES],
      }}],
      "cooldowns": [0.25, 0.5],
  }
