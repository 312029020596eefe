"""GPT-2 medium (355M): 24 layers x 1024 x 16 heads, context 1024, vocab 50257.

gpt2_small's data, batch (512 x 1024 tokens), steps and schedule; the peak
rate 3e-4 is GPT-3's for this shape (GPT-2's own rates were tuned per size
and not published).

Params:   354,823,168 (302.3M non-embedding), as Hugging Face's gpt2-medium.
FLOPs:    per token 6N = 1.81 G (N: non-embedding parameters) as logged; 2.42 G
          in PaLM's count (+ the output layer 0.31 G + attention, 12 x layers x
          d_model x context, 0.30 G).
Memory:   41.5 GiB per device at 8 sequences each on 64 devices,
          data-parallel (the CPU compiler's plan:
          python -m launch.memory --config=configs/gpt2_medium.py --devices=64)

Command:  python train.py --config=configs/gpt2_medium.py
"""

from configs import gpt2_small


def get_config():
  c = gpt2_small.get_config()
  c.model.update(num_layers=24, d_model=1024, num_heads=16)
  c.train.learning_rate = 3e-4
  return c
