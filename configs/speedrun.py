"""The speedrun's config: the default model's shape (3 x 96) with the pieces
of the modern recipe that helped in configs/sweeps/recipe.py (Muon for the
hidden matrices, ReLU squared, RMSNorm, QK-norm and an untied output head,
not zero-initialized: a zero-initialized untied head cost ~0.3 nats there),
reading the corpus through a BPE of 2,048 ids fitted to its training split
(2.72 characters a token: each step sees 2.7x the text of a character step
for ~1.9x its time), 440 steps.

Command:  python -m benchmarks.speedrun --config=configs/speedrun.py --seeds 2
Measured: 1.5706 and 1.5789 nats per character (seeds 0, 1) at step 440,
          after 204.9 and 205.9 s of training on a 2-core AMD EPYC
          (2026-12-07; docs/performance.md, "The recipe and the speedrun").
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.update(activation="relu2", norm="rmsnorm", qk_norm=True,
                 tie_embeddings=False)
  c.data.update(tokenizer="bpe", bpe_vocab_size=2048)
  c.train.update(steps=440, learning_rate=8e-3, optimizer="muon",
                 muon_learning_rate=0.02)
  return c
