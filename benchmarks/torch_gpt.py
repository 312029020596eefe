"""A plain PyTorch GPT of the same architecture, eager mode: the reference that
benchmarks/train_throughput.py --torch times side by side with ours.

Same shapes and work per step as model/gpt.py: learned positions, pre-LN
blocks, fused QKV, causal attention, tanh-GELU MLP, tied head, AdamW with
global-norm clipping; written as a PyTorch user writes it today, attention
through F.scaled_dot_product_attention(is_causal=True), PyTorch's fused path.
Needs `pip install torch` (not a project dependency).
"""

import time

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):

  def __init__(self, d, heads, mlp):
    super().__init__()
    self.heads = heads
    self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
    self.fc, self.out = nn.Linear(d, mlp), nn.Linear(mlp, d)

  def forward(self, x):
    B, L, D = x.shape
    q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
    q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2)
               for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = y.transpose(1, 2).reshape(B, L, D)
    x = x + self.proj(y)
    return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
    self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
    self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.num_heads, cfg.mlp_dim)
                                for _ in range(cfg.num_layers))
    self.ln_f = nn.LayerNorm(cfg.d_model)

  def forward(self, tokens):
    x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.ln_f(x) @ self.wte.weight.T


def runner(cfg, batch_size: int, seed: int = 0):
  """Returns run(steps) -> seconds, after one warm-up step."""
  torch.manual_seed(seed)
  model = GPT(cfg)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                          eps=1e-8, weight_decay=0.1)
  tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1))

  def step():
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  def run(steps):
    t = time.perf_counter()
    for _ in range(steps):
      step()
    return time.perf_counter() - t

  run(1)
  return run
