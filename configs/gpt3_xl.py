"""GPT-3 XL (1.3B): 24 layers x 2048 x 16 heads, context 2048, vocab 50257.

The GPT-3 paper lists 24 heads for XL, but 24 does not divide 2048; 16 heads
of 128 is what Pythia-1.4B uses. gpt3_small's recipe at 512 x 2048 tokens
(1M) a step and a peak rate of 2e-4: 286,103 steps, warmup 358, cosine to
step 247,955. Attention: dense and banded (window 256) layers alternating,
as in gpt3_small.py. The state sharded over all devices (FSDP).

Full remat over scanned layers: at 8 sequences per device launch/memory.py
plans 12.5 GiB of temporaries per device, 38 GiB with remat="dots", 172 GiB
with none. With unrolled layers the CPU compiler's plan does not shrink with
remat (127 GiB either way). Tensor parallelism splits the vocabulary too:
model.vocab_multiple (128) pads its 50257 ids to 50304, which mesh.tensor
= 2, 4, 8 ... 128 divide.

Params:   1,315,723,264 (1208.6M non-embedding); the paper says 1.3B.
FLOPs:    per token 6N = 7.25 G as logged; 8.55 G in PaLM's count (+ output
          layer 0.62 G, attention 0.68 G).
Memory:   12.8 GiB per device at 8 sequences each on 64 devices (CPU
          plan: python -m launch.memory --config=configs/gpt3_xl.py
          --devices=64; other layouts in docs/distributed.md)

Command:  python train.py --config=configs/gpt3_xl.py
"""

from configs import gpt3_large, gpt3_small


def get_config():
  c = gpt3_large.get_config()  # its scanned layers and remat
  c.mesh.update(data=1, fsdp=-1)
  return gpt3_small.sized(c, 24, 2048, 16, batch_size=512,
                          learning_rate=2e-4)
