"""Hugging Face GPT-2's tensors <-> our parameter tree: the name and shape
mapping, pure functions on arrays (trainer/hf_gpt2.py reads and writes the
files and workdirs).

GPT-2 stores its Conv1D weights [in, out], as a Flax Dense kernel is, so each
tensor maps onto one of ours by a reshape, never a transpose. `GLOBAL`,
`LAYER` and `HF_FIXED` are the whole mapping, read both ways; then our
vocabulary is padded to model.vocab_multiple (50257 -> 50304 ids at the
default 128; zero rows, whose logits the model masks) and cut back on
export.
"""

import math

import numpy as np
from flax import traverse_util

from model import GPTConfig, resize_vocab

# GPT-2 name, its shape, our parameter path, our shape. Shapes are products
# of V vocab, P positions, D width, F MLP width, H heads, K head dim.
GLOBAL = (
    ("wte.weight", "V D", "Embed_0/embedding", "V D"),
    ("wpe.weight", "P D", "wpe", "P D"),
    ("ln_f.weight", "D", "ln_f/scale", "D"),
    ("ln_f.bias", "D", "ln_f/bias", "D"),
)
# The same for each layer i: h.{i}.NAME <-> block_{i}/PATH, or row i of
# blocks/PATH with model.scan_layers.
LAYER = (
    ("ln_1.weight", "D", "LayerNorm_0/scale", "D"),
    ("ln_1.bias", "D", "LayerNorm_0/bias", "D"),
    ("attn.c_attn.weight", "D 3*D", "Attention_0/qkv_kernel", "D 3 H K"),
    ("attn.c_attn.bias", "3*D", "Attention_0/qkv_bias", "3 H K"),
    ("attn.c_proj.weight", "D D", "Attention_0/out_kernel", "H K D"),
    ("attn.c_proj.bias", "D", "Attention_0/out_bias", "D"),
    ("ln_2.weight", "D", "LayerNorm_1/scale", "D"),
    ("ln_2.bias", "D", "LayerNorm_1/bias", "D"),
    ("mlp.c_fc.weight", "D F", "MLP_0/Dense_0/kernel", "D F"),
    ("mlp.c_fc.bias", "F", "MLP_0/Dense_0/bias", "F"),
    ("mlp.c_proj.weight", "F D", "MLP_0/Dense_1/kernel", "F D"),
    ("mlp.c_proj.bias", "D", "MLP_0/Dense_1/bias", "D"),
)
# GPT2Config field <-> our model field.
HF_SIZES = (("vocab_size", "vocab_size"), ("n_layer", "num_layers"),
             ("n_embd", "d_model"), ("n_head", "num_heads"),
             ("n_positions", "seq_len"))
# GPT2Config fields whose value is our architecture: an import refuses any
# other (absent means GPT2Config's default, which is this value too), an
# export writes them.
HF_FIXED = {
    "model_type": "gpt2",
    "activation_function": "gelu_new",  # the tanh GELU
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}
# Other names HF gives the same function.
HF_SYNONYMS = {"activation_function": {"gelu_pytorch_tanh"}}
# Non-parameter buffers (the causal mask) that older files carry.
BUFFERS = ("attn.bias", "attn.masked_bias")
PREFIX = "transformer."


def _shape(spec: str, dims: dict) -> tuple[int, ...]:
  return tuple(math.prod(int(f) if f.isdigit() else dims[f]
                         for f in token.split("*")) for token in spec.split())


def rows(cfg: GPTConfig):
  """(GPT-2 name, its shape, our path, our shape) of every tensor, layers
  unstacked."""
  dims = dict(V=cfg.vocab_size, P=cfg.seq_len, D=cfg.d_model, F=cfg.mlp_dim,
              H=cfg.num_heads, K=cfg.head_dim)
  named = list(GLOBAL)
  for i in range(cfg.num_layers):
    named += [(f"h.{i}.{hf}", hf_shape, f"block_{i}/{ours}", our_shape)
              for hf, hf_shape, ours, our_shape in LAYER]
  return [(hf, _shape(hf_shape, dims), ours, _shape(our_shape, dims))
          for hf, hf_shape, ours, our_shape in named]


def params_from_gpt2(tensors: dict, cfg: GPTConfig) -> dict:
  """Our parameter tree, its vocabulary padded, from GPT-2 tensors (names
  without `transformer.`) that `check_tensors` accepted."""
  flat = {ours: np.asarray(tensors[hf], np.float32).reshape(our_shape)
          for hf, _, ours, our_shape in rows(cfg)}
  if cfg.scan_layers:
    for _, _, path, _ in LAYER:
      flat[f"blocks/{path}"] = np.stack(
          [flat.pop(f"block_{i}/{path}") for i in range(cfg.num_layers)])
  return resize_vocab(traverse_util.unflatten_dict(flat, sep="/"),
                      cfg.padded_vocab_size)


def gpt2_from_params(params, cfg: GPTConfig) -> dict:
  """GPT2LMHeadModel's float32 tensors (tied lm_head left out, as
  save_pretrained does) from our parameter tree, without the padded ids."""
  flat = traverse_util.flatten_dict(resize_vocab(params, cfg.vocab_size),
                                    sep="/")
  if cfg.scan_layers:
    for _, _, path, _ in LAYER:
      stacked = flat.pop(f"blocks/{path}")
      flat.update({f"block_{i}/{path}": stacked[i]
                   for i in range(cfg.num_layers)})
  tensors = {}
  for hf, hf_shape, ours, _ in rows(cfg):
    array = np.asarray(flat[ours]).astype(np.float32).reshape(hf_shape)
    tensors[PREFIX + hf] = np.ascontiguousarray(array)
  return tensors


def hf_config(cfg: GPTConfig, eot_id: int | None) -> dict:
  """GPT2Config's fields for our model (an end-of-text id, if known, is
  GPT-2's bos and eos token)."""
  fields = {"architectures": ["GPT2LMHeadModel"], **HF_FIXED}
  fields.update({hf: getattr(cfg, ours) for hf, ours in HF_SIZES})
  fields.update({
      "n_ctx": cfg.seq_len, "n_inner": cfg.d_ff or None,
      "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
      "attn_pdrop": cfg.dropout, "initializer_range": 0.02,
      "reorder_and_upcast_attn": False, "use_cache": True,
      "bos_token_id": eot_id, "eos_token_id": eot_id, "dtype": "float32"})
  return dict(sorted(fields.items()))
