"""The speedrun's config: the default model (3 x 96) with the pieces of the
modern recipe that helped in configs/sweeps/recipe.py: Muon for the hidden
matrices, ReLU squared, RMSNorm, QK-norm and an untied output head (not
zero-initialized: a zero-initialized untied head cost ~0.3 nats there).

Command:  python -m benchmarks.speedrun --config=configs/speedrun.py
Measured: held-out 1.5824 nats/char at step 2,400 (first at or below 1.583)
          after 601.5 s of training on a quiet 2-core AMD EPYC, seed 0
          (2026-12-07; docs/performance.md, "The recipe and the speedrun").
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.update(activation="relu2", norm="rmsnorm", qk_norm=True,
                 tie_embeddings=False)
  c.train.update(steps=2400, learning_rate=8e-3, optimizer="muon",
                 muon_learning_rate=0.02)
  return c
