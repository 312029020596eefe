"""GPT-3 Large (760M): 24 layers x 1536 x 16 heads, context 2048.

gpt3_small's recipe at 256 x 2048 tokens (0.5M) a step and a peak rate of
2.5e-4: 572,205 steps, warmup 715, cosine to step 495,911. gpt3_medium's
scanned layers, with full remat from here on. Attention: dense and banded
(window 256) layers alternating, as in gpt3_small.py.

Params:   760,300,032 (680.0M non-embedding).
FLOPs:    per token 6N = 4.08 G as logged; 5.05 G in PaLM's count (+ output
          layer 0.46 G, attention 0.51 G).
Memory:   22.1 GiB per device at 8 sequences each on 32 devices,
          data-parallel (CPU plan: python -m launch.memory
          --config=configs/gpt3_large.py --devices=32); 41.3 GiB with
          remat="dots"

Command:  python train.py --config=configs/gpt3_large.py
"""

from configs import gpt3_medium, gpt3_small


def get_config():
  c = gpt3_medium.get_config()
  c.model.remat = "full"
  return gpt3_small.sized(c, 24, 1536, 16, batch_size=256,
                          learning_rate=2.5e-4)
