"""GPT-3 Medium (350M): 24 layers x 1024 x 16 heads, context 2048.

gpt3_small's recipe at 256 x 2048 tokens (0.5M) a step and a peak rate of
3e-4: 572,205 steps, warmup 715, cosine to step 495,911. Scanned layers that
keep their matmul outputs for the backward pass (remat="dots"), since
unrolled layers without remat need 94 GiB at 8 sequences a device.
Attention: dense and banded (window 256) layers alternating, as in
gpt3_small.py.

Params:   355,871,744 (302.3M non-embedding); the paper says 350M.
FLOPs:    per token 6N = 1.81 G as logged; 2.46 G in PaLM's count (+ output
          layer 0.31 G, attention 0.34 G).
Memory:   28.3 GiB per device at 8 sequences each on 32 devices,
          data-parallel (CPU plan: python -m launch.memory
          --config=configs/gpt3_medium.py --devices=32); 15.6 GiB with
          remat="full"

Command:  python train.py --config=configs/gpt3_medium.py
"""

from configs import gpt3_small


def get_config():
  c = gpt3_small.get_config()
  c.model.update(scan_layers=True, remat="dots")
  return gpt3_small.sized(c, 24, 1024, 16, batch_size=256,
                          learning_rate=3e-4)
