"""Balanced parentheses: a 2-block GPT, 8 heads, width 128 (d_ff 512), on
the corpus `python -m research.parens` prepares (its docstring has the data,
the metrics and the 1-block comparison; docs/parens.md, the
results).

Command:  python -m research.parens        (prepares, trains both, scores)
          python train.py --config=configs/parens.py \\
              --workdir=runs/parens/two_blocks  (this model alone, once the
                                                 corpus is prepared)
          --config.model.num_layers=1           (the 1-block model)

Params:   413,568 for two blocks (396,800 without the token and position
          embeddings), 215,296 for one (198,528): the ~400,000 weights of
          the account we reproduce.
Why:      600 steps of 16 x 128 tokens (~130,000 documents) at a peak rate
          of 1e-2, cosine to 1e-3. 400 steps met the targets by a thin margin
          (two blocks: illegal mass 4.4e-4, 99.4% balanced samples); batch 8
          at this rate learned far less (2.4e-2 after 800 steps); batch 32
          learned somewhat more per step than 16 in a trial, at twice the
          cost per step.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(num_layers=2, d_model=128, num_heads=8, seq_len=128,
                 vocab_multiple=1)  # 3 ids: "(", ")" and end-of-text
  c.data.source = "runs/parens/data"
  c.train.update(steps=600, batch_size=16, learning_rate=1e-2,
                 warmup_steps=40, schedule="cosine", min_lr_ratio=0.1,
                 weight_decay=0.0, log_every_steps=50)
  c.eval.update(every_steps=300, max_batches=4)
  c.checkpoint.update(every_steps=300, keep=2)
  # train.py's sample: a prompt cannot spell the end token, so "(" opens it
  # at position 0 with no end before it, as only the first window of the
  # corpus does; research.parens samples and scores after the end token.
  c.sample.update(prompt="(", temperature=1.0, max_new_tokens=64, top=3)
  return c
