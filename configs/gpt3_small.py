"""GPT-3 Small (125M): 12 layers x 768 x 12 heads, context 2048, vocab 50257.

The recipe of the GPT-3 paper (Brown et al. 2020, Table 2.1 and Appendix
B), which every gpt3_*.py config takes from this one through `sized`: each
size's batch in tokens as sequences of 2048 and its peak rate; warmup over
375M tokens, cosine decay to 10% over 260B tokens, then 10% to 300B tokens
(train.cosine_steps); configs/base.py's AdamW (b1 0.9, b2 0.95, eps 1e-8,
weight decay 0.1, clip 1.0). Steps are token counts over the tokens of one
step, here 256 x 2048 = 524,288 (0.5M): 572,205 steps (300B, rounded up),
warmup 715, cosine to step 495,911. Overriding train.batch_size keeps these
steps: override train.steps, warmup_steps and cosine_steps with it.

Attention: GPT-3's layers alternate dense and locally banded attention
(model.attention_pattern="dense,local", a dense layer first; every gpt3_*.py
config takes it from here). The paper gives no band width: we take 256
(model.local_window), that of GPT-Neo, EleutherAI's open replication of
GPT-3, whose layers alternate "global" and "local" the same way. That is an
eighth of the context: a local layer's attention counts an eighth of a dense
one's FLOPs as logged (it computes 2 x 256 scores per query, in blocks), and
generation caches only its last 256 keys. The pattern adds no parameters.

gpt2_small's data (byte-level Shakespeare; see there for GPT-2 token ids),
eval and checkpoints.

Params:   125,226,240 (85.1M non-embedding).
FLOPs:    per token 6N = 0.51 G (N: non-embedding parameters) as logged; 0.87 G
          in PaLM's count (+ the output layer 0.23 G + attention, 12 x d_model x
          each layer's context or window, 0.13 G; 0.23 G with dense layers
          only).
Memory:   41.1 GiB per device at 8 sequences each on 32 devices,
          data-parallel, unrolled layers without remat (CPU plan:
          python -m launch.memory --config=configs/gpt3_small.py --devices=32)

Command:  python train.py --config=configs/gpt3_small.py
"""

import math

from configs import gpt2_small

TOKENS, COSINE_TOKENS, WARMUP_TOKENS = 300e9, 260e9, 375e6


def sized(c, num_layers, d_model, num_heads, batch_size, learning_rate):
  """`c` as GPT-3 trained a model of this shape: its batch (sequences)
  and peak rate, and the steps those make of the paper's token counts."""
  c.model.update(num_layers=num_layers, d_model=d_model, num_heads=num_heads)
  tokens = batch_size * c.model.seq_len
  c.train.update(batch_size=batch_size, learning_rate=learning_rate,
                 steps=math.ceil(TOKENS / tokens),
                 warmup_steps=round(WARMUP_TOKENS / tokens),
                 cosine_steps=round(COSINE_TOKENS / tokens))
  return c


def get_config():
  c = gpt2_small.get_config()
  c.model.update(seq_len=2048, attention_pattern="dense,local",
                 local_window=256)
  return sized(c, 12, 768, 12, batch_size=256, learning_rate=6e-4)
