"""GPT-2 small (124M): 12 layers x 768 x 12 heads, context 1024, vocab 50257.

Real-scale shapes for tests (through jax.eval_shape) and for accelerators.
Byte-level Shakespeare by default; for GPT-2 token ids, prepare a corpus with
`python -m data.prepare --tokenizer gpt2 --tokenizer-files DIR` and pass
`--config.data.source=THAT_DIR`.

Params:   124,439,808 (85.1M non-embedding), as Hugging Face's gpt2.
FLOPs:    per token 6N = 0.51 G (N: non-embedding parameters) as logged; 0.86 G
          in PaLM's count (+ the output layer 0.23 G + attention, 12 x layers x
          d_model x context, 0.11 G).
Memory:   17.5 GiB per device at 8 sequences, data-parallel
          (docs/distributed.md).

Command:  python train.py --config=configs/gpt2_small.py
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(vocab_size=50257, num_layers=12, d_model=768, num_heads=12,
                 seq_len=1024)
  c.data.tokenizer = "byte"
  c.train.update(steps=600_000, batch_size=512, learning_rate=6e-4,
                 warmup_steps=2000, schedule="cosine")
  c.eval.update(every_steps=2000, batch_size=64, max_batches=20)
  c.checkpoint.every_steps = 2000
  return c
