"""GPT-3 2.7B: 32 layers x 2560 x 32 heads, context 2048, vocab 50257.

gpt3_small's recipe at 512 x 2048 tokens (1M) a step and a peak rate of
1.6e-4: 286,103 steps, warmup 358, cosine to step 247,955. gpt3_xl's scanned
layers, full remat and FSDP. Attention: dense and banded (window 256) layers
alternating, as in gpt3_small.py.

Params:   2,651,553,280 (2517.7M non-embedding); the paper says 2.7B.
FLOPs:    per token 6N = 15.1 G as logged; 17.0 G in PaLM's count (+ output
          layer 0.77 G, attention 1.13 G).
Memory:   20.0 GiB per device at 8 sequences each on 64 devices (CPU
          plan: python -m launch.memory --config=configs/gpt3_2_7b.py
          --devices=64)

Command:  python train.py --config=configs/gpt3_2_7b.py
"""

from configs import gpt3_small, gpt3_xl


def get_config():
  return gpt3_small.sized(gpt3_xl.get_config(), 32, 2560, 32,
                          batch_size=512, learning_rate=1.6e-4)
