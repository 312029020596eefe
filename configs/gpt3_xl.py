"""GPT-3 XL (1.3B): 24 layers x 2048 x 16 heads, context 2048, vocab 50257.

The GPT-3 paper lists 24 heads for XL, but 24 does not divide 2048; 16 heads
of 128 is what Pythia-1.4B uses. Batch 512 x 2048 = 1M tokens, as GPT-3;
300B tokens are ~286k steps; warmup 375M tokens. Byte-level Shakespeare by
default; for GPT-2 token ids, prepare a corpus with `python -m data.prepare
--tokenizer gpt2 --tokenizer-files DIR` and pass --config.data.source=THAT_DIR.

Full remat over scanned layers: at 8 sequences per device launch/memory.py
plans 11 GiB of temporaries per device, 35 GiB with remat="dots", 191 GiB
with none. With unrolled layers the CPU compiler's plan does not shrink with
remat (147 GiB either way). Tensor parallelism splits the vocabulary too:
model.vocab_multiple (128) pads its 50257 ids to 50304, which mesh.tensor
= 2, 4, 8 ... 128 divide.

Command:  python train.py --config=configs/gpt3_xl.py
Memory:   python -m launch.memory --config=configs/gpt3_xl.py --devices=64 \
              --config.mesh.data=8 --config.mesh.fsdp=8
"""

from configs import gpt2_small


def get_config():
  c = gpt2_small.get_config()  # its vocabulary, data, eval and checkpoints
  c.model.update(num_layers=24, d_model=2048, num_heads=16, seq_len=2048,
                 scan_layers=True, remat="full")
  c.train.update(steps=286_000, learning_rate=2e-4, warmup_steps=358)
  return c
