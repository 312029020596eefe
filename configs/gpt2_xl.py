"""GPT-2 XL (1558M): 48 layers x 1600 x 25 heads, context 1024, vocab 50257.

gpt2_large's data, batch, steps, schedule, scanned layers and remat at a
peak rate of 2e-4 (GPT-3's for its 1.3B model); the state (16 bytes a
parameter with its gradient, 25 GB) sharded over all devices (FSDP).

Params:   1,557,611,200 (1475.6M non-embedding), as Hugging Face's gpt2-xl.
FLOPs:    per token 6N = 8.85 G as logged; 10.28 G in PaLM's count (+ output
          layer 0.48 G, attention 0.94 G).
Memory:   6.5 GiB per device at 8 sequences each on 64 devices (CPU
          plan: python -m launch.memory --config=configs/gpt2_xl.py
          --devices=64)

Command:  python train.py --config=configs/gpt2_xl.py
"""

from configs import gpt2_large


def get_config():
  c = gpt2_large.get_config()
  c.model.update(num_layers=48, d_model=1600, num_heads=25)
  c.train.learning_rate = 2e-4
  c.mesh.update(data=1, fsdp=-1)
  return c
