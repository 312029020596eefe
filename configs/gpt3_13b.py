"""GPT-3 13B: 40 layers x 5120 x 40 heads, context 2048, vocab 50257.

The paper prints d_model 5140, which its 40 heads of d_head 128 do not make
(40 x 128 = 5120; 5140 / 40 = 128.5). gpt3_small's recipe at 1024 x 2048
tokens (2M) a step and a peak rate of 1e-4: 143,052 steps, warmup 179,
cosine to step 123,978. gpt3_xl's scanned layers, full remat and FSDP.
Attention: dense and banded (window 256) layers alternating, as in
gpt3_small.py.

Params:   12,853,386,240 (12585.6M non-embedding); the paper says 13.0B
          (with d_model 5140 it would be 12.94B).
FLOPs:    per token 6N = 75.5 G as logged; 79.9 G in PaLM's count (+ output
          layer 1.54 G, attention 2.83 G).
Memory:   36.3 GiB per device at 8 sequences each on 128 devices (CPU
          plan: python -m launch.memory --config=configs/gpt3_13b.py
          --devices=128)

Command:  python train.py --config=configs/gpt3_13b.py
"""

from configs import gpt3_6_7b, gpt3_small


def get_config():
  return gpt3_small.sized(gpt3_6_7b.get_config(), 40, 5120, 40,
                          batch_size=1024, learning_rate=1e-4)
