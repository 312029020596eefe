"""GPT-3 6.7B: 32 layers x 4096 x 32 heads, context 2048, vocab 50257.

gpt3_small's recipe at 1024 x 2048 tokens (2M) a step and a peak rate of
1.2e-4: 143,052 steps, warmup 179, cosine to step 123,978. gpt3_xl's scanned
layers, full remat and FSDP. Attention: dense and banded (window 256) layers
alternating, as in gpt3_small.py.

Params:   6,658,404,352 (6444.2M non-embedding); the paper says 6.7B.
FLOPs:    per token 6N = 38.7 G as logged; 41.7 G in PaLM's count (+ output
          layer 1.24 G, attention 1.81 G).
Memory:   27.3 GiB per device at 8 sequences each on 128 devices (CPU
          plan: python -m launch.memory --config=configs/gpt3_6_7b.py
          --devices=128)

Command:  python train.py --config=configs/gpt3_6_7b.py
"""

from configs import gpt3_2_7b, gpt3_small


def get_config():
  return gpt3_small.sized(gpt3_2_7b.get_config(), 32, 4096, 32,
                          batch_size=1024, learning_rate=1.2e-4)
