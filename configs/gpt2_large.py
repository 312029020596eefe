"""GPT-2 large (774M): 36 layers x 1280 x 20 heads, context 1024, vocab 50257.

gpt2_medium's data, batch, steps and schedule at a peak rate of 2.5e-4
(GPT-3's for its 760M model).

Params:   774,030,080 (708.4M non-embedding), as Hugging Face's gpt2-large.
FLOPs:    per token 6N = 4.25 G as logged; 5.20 G in PaLM's count (+ output
          layer 0.39 G, attention 0.57 G).
Memory:   16.4 GiB per device at 8 sequences each on 64 devices,
          data-parallel, 8.7 of them the replicated state; scanned layers
          with full remat (CPU plan: python -m launch.memory
          --config=configs/gpt2_large.py --devices=64)

Command:  python train.py --config=configs/gpt2_large.py
"""

from configs import gpt2_medium


def get_config():
  c = gpt2_medium.get_config()
  c.model.update(num_layers=36, d_model=1280, num_heads=20, scan_layers=True,
                 remat="full")
  c.train.learning_rate = 2.5e-4
  return c
