"""GPT-3 175B: 96 layers x 12288 x 96 heads, context 2048.

gpt3_small's recipe at a peak rate of 0.6e-4 and the paper's 3.2M tokens a
step as 1536 x 2048 = 3.1M (1563 would not split over the devices): 95,368
steps, warmup 119, cosine to step 82,652. gpt3_xl's scanned layers and full
remat. Attention: dense and banded (window 256) layers alternating, as in
gpt3_small.py.

Laid out for 1024 devices: tensor parallelism over 8 (a node's GPUs), FSDP
over the rest, and 4 microbatches a step, so that each device holds 3
sequences at a time. Tensor parallelism splits the vocabulary: GPT-2's 50257
ids are padded to 50304 (model.vocab_multiple; padded ids get no
probability).
Eval and a checkpoint (2.1 TB of state) every 500 steps: about an hour at
40% MFU in bfloat16 on 1024 H100s.

Params:   174,604,259,328 (174,604,836,864 as padded to 50304 ids;
          173,961.5M non-embedding); the paper says 175.0B.
FLOPs:    per token 6N = 1044 G as logged; 1064 G in PaLM's count (+ output
          layer 3.7 G, attention 16.3 G). 300B tokens: 3.13e23 FLOPs as logged;
          the paper's 3.14e23 is 6 x all parameters x tokens.
Memory:   24.7 GiB per device on 1024 devices (the plan, its arithmetic
          and other layouts: docs/distributed.md, GPT-3 175B on 1024 devices):
          python -m launch.memory --config=configs/gpt3_175b.py --devices=1024

Command:  python train.py --config=configs/gpt3_175b.py
"""

from configs import gpt3_13b, gpt3_small


def get_config():
  c = gpt3_13b.get_config()
  c.mesh.update(data=1, fsdp=-1, tensor=8)
  c.train.grad_accum_steps = 4
  c.eval.every_steps = c.checkpoint.every_steps = 500
  return gpt3_small.sized(c, 96, 12288, 96, batch_size=1536,
                          learning_rate=0.6e-4)
