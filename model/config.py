"""The GPT's architecture: GPTConfig, its derived sizes and muP's scales,
and the values its fields take."""

import dataclasses
import math

import jax
import jax.numpy as jnp

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
POSITIONS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")
# The MLP's nonlinearity: GPT-2's tanh GELU, or ReLU squared (Primer, So et
# al. 2021; the modded-nanogpt speedrun).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
}
LAYER_KINDS = ("dense", "local")
PARAMETRIZATIONS = ("standard", "mup")
ATTENTIONS = ("einsum", "xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
# Every logical axis name the arrays below carry: mesh.rules maps these.
LOGICAL_AXES = ("batch", "length", "embed", "heads", "head_dim", "mlp",
                "vocab", "layers")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """The architecture. A run's values are checked by the rules in
  trainer/config.py; the class itself refuses only sizes that would make
  its derived ones (head_dim) wrong."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  seq_len: int
  d_ff: int = 0  # 0 means 4 * d_model
  position: str = "learned"  # one of POSITIONS
  rope_base: float = 10000.0  # position="rope": base of the frequencies
  tie_embeddings: bool = True
  use_bias: bool = True
  dropout: float = 0.0
  scan_layers: bool = False
  remat: str = "none"  # a key of REMAT_POLICIES
  dtype: str = "float32"  # compute dtype (DTYPES); parameters: param_dtype
  param_dtype: str = "float32"
  attention: str = "einsum"  # one of ATTENTIONS
  attention_chunks: int = 2  # query blocks of the einsum attention
  # Layer kinds, comma-separated, repeated over the layers in order:
  # "dense,local" alternates them, starting with a dense layer.
  attention_pattern: str = "dense"
  local_window: int = 256  # keys a local layer's query sees, its own included
  vocab_multiple: int = 1  # pad the vocabulary to a multiple of this
  parametrization: str = "standard"  # one of PARAMETRIZATIONS
  mup_base_width: int = 96  # muP: the d_model at which it equals standard
  mup_base_heads: int = 0  # muP: the base model's heads (0: num_heads)
  # The modern recipe (docs/model.md); each default is GPT-2's.
  norm: str = "layernorm"  # one of NORMS: every norm of the model
  qk_norm: bool = False  # RMSNorm of each head's queries and keys
  activation: str = "gelu"  # a key of ACTIVATIONS
  zero_init_proj: bool = False  # the output projections start at zero
  logit_softcap: float = 0.0  # c > 0: logits = c * tanh(logits / c)
  value_embeds: int = 0  # value-embedding tables (value_embed_tables)

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(
          f"model.d_model={self.d_model} is not divisible by "
          f"model.num_heads={self.num_heads}; pick heads that divide it")
    if not set(self.pattern) <= set(LAYER_KINDS):
      raise ValueError(
          f"model.attention_pattern={self.attention_pattern!r} must list "
          f"layer kinds separated by commas, each one of {list(LAYER_KINDS)}"
          " (e.g. 'dense,local')")
    if self.scan_layers and self.num_layers % len(self.pattern):
      raise ValueError(
          f"model.num_layers={self.num_layers} must be a multiple of the "
          f"{len(self.pattern)} layers of model.attention_pattern="
          f"{self.attention_pattern!r} with model.scan_layers=True (it scans "
          "over repeats of the pattern)")
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(
          f"model.position='rope' rotates pairs of dimensions: head_dim = "
          f"d_model / num_heads = {self.head_dim} must be even")
    if 2 * self.value_embeds > self.num_layers:
      raise ValueError(
          f"model.value_embeds={self.value_embeds} tables go to the first "
          f"and the last {self.value_embeds} layers, more than "
          f"model.num_layers={self.num_layers}: set at most "
          f"{self.num_layers // 2}")
    if self.vocab_multiple < 1:
      raise ValueError(f"model.vocab_multiple={self.vocab_multiple} must be "
                       ">= 1 (1: no padding)")
    if self.dropout and self.attention != "einsum":
      raise ValueError(
          f"model.dropout={self.dropout} drops attention probabilities too, "
          f"which model.attention={self.attention!r} "
          "(jax.nn.dot_product_attention) cannot: use model.attention="
          "'einsum' or model.dropout=0")
    if self.parametrization == "mup":
      self._check_mup()

  def _check_mup(self):
    """muP scales every hidden width with d_model, the heads' size among
    them: the MLP's width is 4 * d_model and the heads stay those of the
    base model (attention_mult assumes head_dim grows with the width).

    The modern recipe keeps muP's guarantees, so it refuses none of it: an
    RMSNorm gain, like a LayerNorm's, is a vector whose coordinates stay
    O(1) at every width; qk_norm makes each query and key coordinate O(1),
    which muP's 1 / head_dim attention scale assumes of them anyway; relu2
    is, like GELU, a fixed nonlinearity of polynomially bounded derivative
    (what the Tensor Programs' limits need); zero_init_proj sets an init
    constant, not its scaling with width (Tensor Programs V starts the
    readout at zero); logit_softcap is a fixed function of the logits,
    whose updates output_mult already keeps width-independent; the
    value_embeds tables map the vocabulary to the width, as the token
    table does, and take its (input-layer) scaling."""
    if self.d_ff:
      raise ValueError(
          "model.parametrization='mup' scales the MLP with d_model: set "
          f"model.d_ff=0 (4 * d_model), not {self.d_ff}")
    if self.mup_base_heads and self.mup_base_heads != self.num_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} differs from muP's base model's "
          f"model.mup_base_heads={self.mup_base_heads}: muP's attention "
          "scale keeps the heads fixed as the width grows (head_dim grows "
          f"with it); set model.num_heads={self.mup_base_heads}")
    if self.mup_base_width < 1 or self.mup_base_width % self.num_heads:
      raise ValueError(
          f"model.mup_base_width={self.mup_base_width} must be a positive "
          f"multiple of model.num_heads={self.num_heads}: muP's base model "
          "is this one at d_model = mup_base_width, with the same heads")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return self.d_ff or 4 * self.d_model

  # muP (Tensor Programs V): the model at d_model = mup_base_width is the
  # standard one, bit for bit; wider (or narrower) ones scale as below, and
  # trainer.optim scales the hidden weights' Adam updates by 1 / width_mult.
  @property
  def width_mult(self) -> float:
    """d_model / mup_base_width under muP; 1 under the standard
    parametrization."""
    if self.parametrization == "mup":
      return self.d_model / self.mup_base_width
    return 1.0

  @property
  def hidden_init_scale(self) -> float:
    """Multiplies the init std of the hidden (width x width) weights: their
    variance goes as 1 / fan_in under muP."""
    return math.sqrt(1 / self.width_mult)

  @property
  def attention_mult(self) -> float:
    """Multiplies the queries, on top of attention's 1 / sqrt(head_dim):
    sqrt(base head_dim / head_dim) under muP, so that q.k is divided by
    head_dim (times sqrt(the base model's head_dim): 1 / sqrt(head_dim) at
    the base width)."""
    return math.sqrt(1 / self.width_mult)

  @property
  def attention_scale(self) -> float:
    """What q.k is multiplied by in all: 1 / sqrt(head_dim) (standard); muP's
    sqrt(base head_dim) / head_dim."""
    return 1.0 / math.sqrt(self.head_dim) * self.attention_mult

  @property
  def output_mult(self) -> float:
    """Multiplies the readout's input (the tied embedding or lm_head): muP's
    1 / width_mult keeps the logits' updates independent of the width."""
    return 1 / self.width_mult

  @property
  def value_embed_tables(self) -> tuple[int, ...]:
    """Each layer's value-embedding table, -1 for none: with E tables (the
    modded-nanogpt speedrun's value embeddings), table i is added to the
    values of layer i and of layer num_layers - E + i."""
    E, first_of_last = self.value_embeds, self.num_layers - self.value_embeds
    return tuple(i if i < E else i - first_of_last if i >= first_of_last
                 else -1 for i in range(self.num_layers))

  @property
  def pattern(self) -> tuple[str, ...]:
    return tuple(kind.strip() for kind in self.attention_pattern.split(","))

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """Each layer's kind: the pattern repeated over the layers."""
    return tuple(self.pattern[i % len(self.pattern)]
                 for i in range(self.num_layers))

  def window(self, kind: str) -> int:
    """Keys a query of a `kind` layer sees: its own and the window - 1
    before it. A dense layer's is the context, so that a sequence longer
    than that (sampling with rotary positions) keeps each layer within the
    context it was trained on."""
    if kind == "dense":
      return self.seq_len
    return min(self.local_window, self.seq_len)

  @property
  def cache_rolls(self) -> bool:
    """Whether a cached key stays valid once older tokens leave the window:
    true of rotary positions (relative), not of absolute ones."""
    return self.position == "rope"

  @property
  def padded_vocab_size(self) -> int:
    """The rows of the embedding and the columns of the output layer: the
    vocabulary rounded up to a multiple of vocab_multiple, so that tensor
    parallelism can split it evenly. The padded ids' logits are masked."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  def num_params(self, embeddings: bool = True, padded: bool = False) -> int:
    """Closed-form parameter count of this architecture: the real
    vocabulary's embedding, value embeddings and output layer (if untied),
    or with `padded` the padded one, as the param tree holds it. Without
    `embeddings`, no vocabulary or position table: the N of scaling laws,
    the same padded or not."""
    d, f, b = self.d_model, self.mlp_dim, int(self.use_bias)
    v = self.padded_vocab_size if padded else self.vocab_size
    attn = d * 3 * d + 3 * d * b + d * d + d * b
    attn += 2 * self.head_dim if self.qk_norm else 0  # two RMSNorm gains
    mlp = d * f + f * b + f * d + d * b
    norm = d * (1 + b) if self.norm == "layernorm" else d  # RMSNorm: no bias
    block = attn + mlp + 2 * norm
    n = self.num_layers * block + norm  # blocks + final norm
    if embeddings:
      n += v * d * (1 + self.value_embeds)
      n += self.seq_len * d if self.position == "learned" else 0
      n += 0 if self.tie_embeddings else d * v + b * v
    return n

  def flops_per_token(self) -> float:
    """Training FLOPs per token in the project's one convention, C = 6 N D
    (Kaplan et al., 2020): N the non-embedding parameters, each costing 2
    FLOPs per token forward and 4 backward. It leaves out the attention
    score and value matmuls (PaLM adds 12 * layers * d_model * context) and
    the output layer (6 * d_model * vocabulary), so MFU against it is lower
    than PaLM's by their share (docs/model.md, "FLOPs").
    """
    return 6 * self.num_params(embeddings=False)

