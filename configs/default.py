"""Default: a small GPT on Shakespeare, trained with the modern recipe, sized
for a 2-core CPU.

The 3 x 96 shape of configs/base.py (the scaling study's pick for this
budget) with the recipe pieces that helped in configs/sweeps/recipe.py:
Muon for the hidden matrices, ReLU squared, RMSNorm, QK-norm and an untied
output head. It reads the corpus through a BPE of 2,048 ids fitted to the
training split (2.7 characters a token), so a step sees 2.7x the text of a
character step for ~1.9x its time (docs/performance.md, "The recipe and the
speedrun").

Command:  python train.py
Expect:   11 minutes on a 2-core CPU from a fresh clone (setup, corpus
          download and the BPE fit included; 559 s of them training at
          ~9,000 tokens/s); validation loss 3.8863 nats per token, 2.1319
          bits per byte, 1.478 nats per character on the held-out works
          (Hamlet, The Tempest): below a counted modified Kneser-Ney 7-gram
          (1.532). 4 layers for 1,000 steps, about the same time, gave 1.490.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(activation="relu2", norm="rmsnorm", qk_norm=True,
                 tie_embeddings=False)
  c.data.update(tokenizer="bpe", bpe_vocab_size=2048)
  c.train.update(steps=1200, learning_rate=8e-3, optimizer="muon")
  return c
