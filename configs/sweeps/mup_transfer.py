"""muP learning-rate transfer: 2 parametrizations x 4 widths x 9 learning
rates, 300 steps each.

Command:  python -m research.mup transfer        # this spec, 2 at a time
          python -m launch.sweep run configs/sweeps/mup_transfer.py   # the sweep alone
Expect:   see docs/mup.md (the table of held-out losses, the best
          learning rate per width, transfer.png, and the time it took).

A 2-layer GPT with 2 heads at d_model 16, 32, 64 and 128 (head_dim 8 to
64), on the default's Shakespeare characters, 300 steps of 16 x 64
characters (0.31M tokens), warmup 30 steps then cosine to 10%, weight decay
0.1; the peak learning rate on a factor-2 grid from 2^-10 to 2^-2. muP's
base width is 16, so there the two parametrizations are the same model and
train bit for bit alike (their rows of the table are equal). The loss is
the final one on the whole held-out split (Hamlet, The Tempest).
"""

WIDTHS = (16, 32, 64, 128)
LEARNING_RATES = tuple(2.0 ** -k for k in range(10, 1, -1))


def get_sweep():
  return {
      "base": "configs/base.py",
      "overrides": {
          "model.num_layers": 2, "model.num_heads": 2, "model.seq_len": 64,
          "model.mup_base_width": WIDTHS[0],
          "train.schedule": "cosine", "train.batch_size": 16,
          "train.steps": 300,
          "train.warmup_steps": 30, "train.log_every_steps": 50,
          "eval.every_steps": 1000, "checkpoint.every_steps": 1000,
          "sample.max_new_tokens": 1,
      },
      "axes": [{"grid": {"model.parametrization": ["standard", "mup"],
                         "model.d_model": list(WIDTHS),
                         "train.learning_rate": list(LEARNING_RATES)}}],
  }
