"""bfloat16 compute that keeps what must be float32 in float32: attention
scores and logits on every attention path, a bf16 run's loss near float32's;
and the settings training refuses (float16 without loss scaling, 16-bit
params, attention dropout where it cannot be applied)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from conftest import (random_params, run_train_py, tiny_config,
                      tiny_model_config, train_steps)
from model import GPT, KVCache
from trainer import config as config_lib
from trainer.errors import ConfigError

B, L = 4, 16


def _dots(jaxpr) -> list[tuple[tuple[str, ...], str]]:
  """(operand dtypes, result dtype) of every dot_general in a jaxpr, nested
  ones (scan, custom derivatives) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append((tuple(str(v.aval.dtype) for v in eqn.invars),
                    str(eqn.outvars[0].aval.dtype)))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          found += _dots(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          found += _dots(sub)
  return found


# Attention paths of a 2-layer bfloat16 model, and the matmuls of its
# forward pass that give float32 results: the score matmuls (2 query blocks
# of the einsum attention per dense layer, 1 per banded layer, 1 per layer
# through XLA or the cache) and the readout.
PATHS = {
    "einsum": (dict(), 2 * 2 + 1),
    "banded": (dict(attention_pattern="dense,local", local_window=4),
               2 + 1 + 1),
    "xla": (dict(attention="xla"), 2 + 1),
    "cached": (dict(), 2 + 1),
}


@pytest.mark.parametrize("path", PATHS)
def test_scores_and_logits_are_float32_on_every_path(path):
  """Every matmul takes bfloat16 operands; the attention scores and the
  logits come out in float32 (summed there, never rounded to bfloat16),
  the rest in bfloat16. Few logits are then bfloat16 numbers (all of them
  were, when the readout's result was bfloat16)."""
  overrides, float32_results = PATHS[path]
  cfg = tiny_model_config(dtype="bfloat16", **overrides)
  model, params = GPT(cfg), random_params(tiny_model_config(), seed=3,
                                          std=0.1)
  tokens = jax.random.randint(jax.random.key(0), (B, L), 0, 37)
  if path == "cached":
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))
    forward = lambda p: model.apply({"params": p}, tokens,
                                    cache=KVCache.empty(cfg, B),
                                    pos_BxL=pos)[0]
  else:
    forward = lambda p: model.apply({"params": p}, tokens)
  dots = _dots(jax.make_jaxpr(forward)(params).jaxpr)
  assert {operands for operands, _ in dots} == {("bfloat16", "bfloat16")}
  results = [result for _, result in dots]
  assert results.count("float32") == float32_results, results
  assert set(results) == {"float32", "bfloat16"}
  logits = np.asarray(jax.jit(forward)(params))
  as_bf16 = logits.astype(jnp.bfloat16).astype(np.float32)
  assert np.mean(logits == as_bf16) < 0.05


def test_a_bf16_runs_loss_stays_near_float32s():
  """6 AdamW steps from the same params, the einsum attention's dense and
  banded layers: the bfloat16 run's loss stays within 3e-3 nats of the
  float32 run's at every step (measured here: 4.6e-4; bfloat16's rounding
  is 2^-9 of a value)."""
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 37, (8, L + 1)).astype(np.int32)
             for _ in range(6)]
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(warmup_steps=0, schedule="constant",
                         learning_rate=3e-3)
    config.model.update(dtype=dtype, attention_pattern="dense,local",
                        local_window=6)
    losses[dtype], _, _ = train_steps(config, batches,
                                      devices=jax.devices()[:1])
  assert losses["float32"][-1] < losses["float32"][0] - 0.01  # it learns
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0,
                             atol=3e-3)


@pytest.mark.parametrize("fields, message", [
    (dict(dtype="float16"),
     "model.dtype='float16' needs loss scaling, which this trainer does not "
     "have (small gradients would flush to 0): use model.dtype='bfloat16', "
     "float32's range at float16's speed"),
    (dict(dtype="bfloat16", param_dtype="bfloat16"),
     "model.param_dtype='bfloat16' would keep the weights and Adam's moments "
     "in 16 bits, where small updates round away: train with "
     "model.param_dtype='float32' (model.dtype='bfloat16' computes in "
     "bfloat16)"),
    (dict(dropout=0.1, attention="xla"),
     "model.dropout=0.1 drops attention probabilities too, which "
     "model.attention='xla' (jax.nn.dot_product_attention) cannot: use "
     "model.attention='einsum' or model.dropout=0"),
    (dict(dropout=0.1, attention="cudnn", dtype="bfloat16"),
     "model.dropout=0.1 drops attention probabilities too, which "
     "model.attention='cudnn' (jax.nn.dot_product_attention) cannot"),
])
def test_training_refuses(fields, message):
  config = tiny_config()
  config.model.update(fields)
  with pytest.raises(ConfigError, match="^" + re.escape(message)):
    config_lib.validate(config)


def test_float16_ends_train_py_with_one_line(tmp_path):
  result = run_train_py("--config.model.dtype=float16",
                        f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2
  assert result.stderr == (
      "error: model.dtype='float16' needs loss scaling, which this trainer "
      "does not have (small gradients would flush to 0): use model.dtype="
      "'bfloat16', float32's range at float16's speed\n")
  assert not (tmp_path / "run").exists()
