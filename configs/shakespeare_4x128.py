"""The default before the scaling study: 4 layers x 128 x 4 heads (0.79M
non-embedding parameters), 1,200 cosine steps of 32 x 128 characters.

Held-out loss 1.71 nats per character (2.47 bits per byte) on Hamlet and The
Tempest. The benchmarks' model (train_throughput --shape=4x128, decode,
wsd_cooldown), so their numbers stay comparable when the default changes.

Command:  python train.py --config=configs/shakespeare_4x128.py
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(num_layers=4, d_model=128, num_heads=4)
  c.train.update(steps=1200, learning_rate=4e-3, schedule="cosine")
  c.eval.every_steps = 200
  c.checkpoint.every_steps = 200
  return c
