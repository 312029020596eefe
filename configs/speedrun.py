"""The speedrun's config: the default (configs/default.py) with 440 steps,
the last 88 of them the wsd decay.

Command:  python -m benchmarks.speedrun --config=configs/speedrun.py --seeds 2
Measured: 1.5706 and 1.5789 nats per character (seeds 0, 1) at step 440,
          after 204.9 and 205.9 s of training on a 2-core AMD EPYC
          (2026-12-07; docs/performance.md, "The recipe and the speedrun").
"""

from configs import default


def get_config():
  c = default.get_config()
  c.train.steps = 440
  return c
