"""The recipe's ablation: GPT-2's recipe, then each piece of the modern one
added in turn, on the default model (3 x 96) at a speedrun's budget, two
seeds each.

Command:  python -m launch.sweep run configs/sweeps/recipe.py
          python -m launch.sweep collect configs/sweeps/recipe.py
Table:    docs/performance.md, "The recipe"

Every run trains 900 steps (3.7M tokens) of batch 32 x 128 on a wsd schedule
at AdamW's peak 8e-3 (above the default's 4.6e-3, tuned for 3,600 steps:
configs/sweeps/lr.py found shorter runs want more) and reports the held-out
loss over the whole split. Each row keeps the previous ones' pieces.

Expect:   14 runs, ~3.5-5 minutes each on a 2-core AMD EPYC (2026-12-07).
          Held-out loss, mean of seeds 0 and 1: gpt2 1.7727, relu2 1.7737,
          rmsnorm 1.7696, qk_norm 1.7746, untied_zero_init 2.0616, softcap
          2.0683, muon 1.7053 (the table: docs/performance.md).
"""

# Each row adds one piece to the row before it.
ROWS = [
    ("gpt2", {"model.activation": "gelu"}),
    ("relu2", {"model.activation": "relu2"}),
    ("rmsnorm", {"model.norm": "rmsnorm"}),
    ("qk_norm", {"model.qk_norm": True}),
    ("untied_zero_init", {"model.tie_embeddings": False,
                          "model.zero_init_proj": True}),
    ("softcap", {"model.logit_softcap": 15.0}),
    ("muon", {"train.optimizer": "muon", "train.muon_learning_rate": 0.02}),
]


def _cumulative():
  rows, fields = [], {}
  for name, added in ROWS:
    fields = {**fields, **added}
    rows.append(fields)
  return rows


def get_sweep():
  return {
      "base": "configs/base.py",
      "overrides": {"train.steps": 900, "train.learning_rate": 8e-3,
                    "eval.every_steps": 300, "checkpoint.every_steps": 900,
                    "sample.max_new_tokens": 100},
      "axes": [{"list": _cumulative()}, {"seeds": [0, 1]}],
  }
