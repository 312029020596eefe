"""Balanced parentheses: a 2-block GPT, 8 heads, width 128 (d_ff 512), on
the corpus `python -m research.parens` prepares (see its docstring for the
data, the metrics and the 1-block comparison).

Command:  python -m research.parens        (prepares, trains both, scores)
          python train.py --config=configs/parens.py \\
              --workdir=runs/parens/two_blocks  (this model alone, once the
                                                 corpus is prepared)
          --config.model.num_layers=1           (the 1-block model)

Params:   397,568 for two blocks (395,776 non-embedding), 199,424 for one:
          the ~400,000 weights of the account we reproduce.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.update(num_layers=2, d_model=128, num_heads=8, seq_len=128,
                 vocab_multiple=1)  # 3 ids: "(", ")" and end-of-text
  c.data.source = "runs/parens/data"
  c.train.update(steps=3000, batch_size=32, learning_rate=3e-3,
                 warmup_steps=100, weight_decay=0.0, log_every_steps=100)
  c.eval.update(every_steps=1000, max_batches=4)
  c.checkpoint.update(every_steps=500, keep=2)
  c.sample.update(prompt="(", temperature=1.0, max_new_tokens=64, top=3)
  return c
