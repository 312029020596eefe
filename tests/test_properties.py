"""Model settings that must change how the model runs and nothing else:
bfloat16 compute, rematerialization, layers under nn.scan; and the FLOP
count MFU is computed from, against a hand count."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from configs import base
from conftest import random_params, tiny_config, tiny_model_config
from launch import memory
from model import GPT
from trainer import run as run_lib, sharding
from trainer import state as state_lib

B, L = 4, 16


def _tokens(seed=0):
  return jax.random.randint(jax.random.key(seed), (B, L + 1), 0, 37)


def _dot_dtypes(jaxpr) -> list[tuple[str, ...]]:
  """The operand dtypes of every dot_general in a jaxpr, nested ones
  (jit, scan, remat, custom derivatives) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          found += _dot_dtypes(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          found += _dot_dtypes(sub)
  return found


def _loss(model, params, tokens_BxL1):
  logits = model.apply({"params": params}, tokens_BxL1[:, :-1])
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, tokens_BxL1[:, 1:, None], -1).mean()


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_bfloat16_matmuls_forward_and_backward(scan):
  """Every matmul of the forward and backward pass takes bfloat16 operands
  (17 in the forward of 2 layers: QKV, 2 x 2 attention blocks, output, 2 MLP
  per layer, and the logits); with float32, none does."""
  tokens = _tokens()
  for dtype in ("bfloat16", "float32"):
    cfg = tiny_model_config(dtype=dtype, scan_layers=scan)
    model, params = GPT(cfg), random_params(cfg)
    loss = functools.partial(_loss, model, tokens_BxL1=tokens)
    forward = _dot_dtypes(jax.make_jaxpr(loss)(params).jaxpr)
    backward = _dot_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert len(forward) == (9 if scan else 17)  # scan: one block's dots
    assert len(backward) == 3 * len(forward)
    assert set(forward + backward) == {(dtype, dtype)}, dtype


def test_bfloat16_logits_are_rounded_and_params_stay_float32():
  """bfloat16 compute moves the logits by more than float32 round-off and
  less than a real change; a train step keeps params and Adam's moments in
  float32."""
  params = random_params(tiny_model_config(), seed=1, std=0.1)
  tokens = _tokens(1)[:, :-1]
  logits = {dtype: np.asarray(jax.jit(GPT(tiny_model_config(
      dtype=dtype)).apply)({"params": params}, tokens))
            for dtype in ("float32", "bfloat16")}
  other_attention = np.asarray(jax.jit(GPT(tiny_model_config(
      attention="xla")).apply)({"params": params}, tokens))
  float32_noise = np.abs(other_attention - logits["float32"]).max()
  bf16_change = np.abs(logits["bfloat16"] - logits["float32"]).max()
  assert float32_noise < 1e-5
  assert 1e-3 < bf16_change < 0.05 * np.abs(logits["float32"]).max()

  # The train step's output, traced (not compiled): params and moments.
  config = tiny_config()
  config.model.dtype = "bfloat16"
  mesh = sharding.make_mesh(config.mesh)
  model, tx, rules, shardings = run_lib.model_and_optimizer(config, 37, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = state_lib.abstract_state(model, tx, shardings)
    step = state_lib.make_train_step(model, tx, shardings, grad_accum_steps=1,
                                     seed=0)
    new_state, _ = jax.eval_shape(step, state, _tokens(2))
  arrays = [leaf for leaf in jax.tree.leaves((new_state.params,
                                              new_state.opt_state))
            if leaf.ndim]
  assert len(arrays) == 3 * len(jax.tree.leaves(state.params))
  assert {leaf.dtype for leaf in arrays} == {np.dtype("float32")}


def _stacked(params, num_layers):
  """Per-layer params (block_0, block_1, ...) in nn.scan's layout: one
  `blocks` tree whose leaves have a leading layer axis."""
  blocks = [params[f"block_{i}"] for i in range(num_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith("block_")}
  return {**rest, "blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}


@functools.cache
def _logits_and_grads(scan: bool, remat: str, dropout: float = 0.0):
  """Logits, loss and gradients of a 2-layer model with fixed params (the
  same for every layout) on one batch, the gradients in the unrolled
  layout."""
  cfg = tiny_model_config(scan_layers=scan, remat=remat, dropout=dropout)
  params = random_params(tiny_model_config(), seed=2, std=0.1)
  if scan:
    params = _stacked(params, 2)
  model, tokens = GPT(cfg), _tokens(3)
  rngs = {"dropout": jax.random.key(4, impl="rbg")} if dropout else None

  def loss_and_logits(params):
    logits = model.apply({"params": params}, tokens[:, :-1],
                         deterministic=not dropout, rngs=rngs)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean(), logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(
      loss_and_logits, has_aux=True))(params)
  if scan:
    grads = {**{k: v for k, v in grads.items() if k != "blocks"},
             **{f"block_{i}": jax.tree.map(lambda x, i=i: x[i],
                                           grads["blocks"])
                for i in range(2)}}
  return np.asarray(logits), float(loss), jax.device_get(grads)


def _assert_trees_close(got, want, atol):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_scanned_layers_equal_unrolled_layers():
  """The same parameters, stacked for nn.scan: the same logits and, layer
  by layer, the same gradients."""
  logits, loss, grads = _logits_and_grads(scan=False, remat="none")
  scan_logits, scan_loss, scan_grads = _logits_and_grads(scan=True,
                                                         remat="none")
  np.testing.assert_allclose(scan_logits, logits, rtol=0, atol=1e-5)
  assert scan_loss == pytest.approx(loss, rel=1e-6)
  _assert_trees_close(scan_grads, grads, atol=1e-7)


@pytest.mark.parametrize("scan, remat", [(False, "full"), (True, "full"),
                                         (True, "dots")],
                         ids=["layers-full", "scan-full", "scan-dots"])
def test_remat_leaves_gradients_unchanged(scan, remat):
  """Recomputed activations give the gradients of stored ones, dropout
  masks included (the recomputation must draw the same ones)."""
  _, loss, grads = _logits_and_grads(scan, "none", dropout=0.2)
  _, remat_loss, remat_grads = _logits_and_grads(scan, remat, dropout=0.2)
  assert remat_loss == pytest.approx(loss, rel=1e-6)
  _assert_trees_close(remat_grads, grads, atol=1e-7)


def test_remat_shrinks_the_train_steps_temporaries_under_scan():
  """launch.memory's ahead-of-time compile of the train step: with layers
  under nn.scan, remat stores less between the forward and backward pass
  (measured: 3.4 MB of temporaries without, 1.3 MB with full remat)."""
  temp = {}
  for remat in ("none", "full"):
    c = base.get_config()
    c.model.update(num_layers=2, d_model=32, num_heads=2, seq_len=32,
                   vocab_size=37, scan_layers=True, remat=remat)
    c.train.batch_size = 8
    temp[remat] = memory.measure(c)["temp_bytes"]
  assert temp["full"] < 0.5 * temp["none"], temp


def test_flops_per_token_by_hand():
  """6 N for 2 layers x 32, context 16, vocab 37 (tied embeddings, learned
  positions, biases): N the non-embedding parameters."""
  d, layers = 32, 2
  # QKV 3d^2 + 3d, output d^2 + d, MLP 8d^2 + 5d, two LayerNorms 4d.
  per_layer = 12 * d * d + 13 * d
  n = layers * per_layer + 2 * d  # and the final LayerNorm
  assert 6 * n == 152_832
  cfg = tiny_model_config()
  assert cfg.flops_per_token() == 152_832
  assert cfg.num_params(embeddings=False) == n
