"""Each parameter's role, from its path in the param tree: what the
optimizer treats alike (weight decay, muP's learning rates, Muon's
matrices).

The path names, not the shapes, decide: under model.scan_layers every
per-layer parameter gains a layers axis (a LayerNorm gain becomes a matrix,
qkv_bias is 3-D either way), and its role must not change with it. The
prefixes that place a parameter in a layer (block_3, blocks, blocks/block_1)
play no part, so a scanned and an unrolled model get the same roles.
"""

import jax

EMBEDDING = "embedding"  # the token table (the readout if tied), value_embeds
POSITION = "position"  # the learned position table
HIDDEN = "hidden"  # attention and MLP kernels: width x width matrices
HEAD = "head"  # the untied readout's kernel
BIAS = "bias"  # any bias of a projection, the readout's included
NORM = "norm"  # a LayerNorm's gain or bias, an RMSNorm's gain
ROLES = (EMBEDDING, POSITION, HIDDEN, HEAD, BIAS, NORM)


def names(path) -> tuple[str, ...]:
  """The dict keys of a key path (a box's attribute, as nn.Partitioned's
  `value`, is no name)."""
  return tuple(str(key.key) for key in path
               if isinstance(key, jax.tree_util.DictKey))


def role(path) -> str:
  """The role of the parameter at `path` (a key path or a tuple of names);
  a ValueError for a name no rule covers, so that a new parameter is given
  its role before any optimizer treats it."""
  if path and not isinstance(path[0], str):
    path = names(path)
  *modules, name = path
  module = modules[-1] if modules else ""
  if (module in ("ln_f", "q_norm", "k_norm") or
      module.startswith(("LayerNorm", "RMSNorm"))):
    return NORM
  if name in ("embedding", "value_embeds"):
    return EMBEDDING
  if name == "wpe":
    return POSITION
  if name.endswith("bias"):
    return BIAS
  if module == "lm_head" and name == "kernel":
    return HEAD
  if name.endswith("kernel"):
    return HIDDEN
  raise ValueError(f"parameter {'/'.join(path)} has no role; give it one in "
                   "model/roles.py")


def of(params):
  """A tree like `params` (boxed or not) of each leaf's role."""
  return jax.tree_util.tree_map_with_path(lambda path, _: role(path), params)
