"""Muon (train.optimizer="muon"): the hidden kernels' updates are
orthogonalized matrices of RMS 0.2 x the rate, one per Q, K, V and layer,
the same scanned or unrolled; every other parameter's update is AdamW's bit
for bit; a resume with the other optimizer is refused. (Exact resume:
tests/test_trainer.py; meshes: tests/test_sharding.py; the config rules:
tests/test_config_rules.py.)"""

import os

import jax
import numpy as np
import pytest

from conftest import random_params, tiny_config
from model import roles
from test_roles import _stacked, _unstacked
from trainer import config as config_lib, optim, saved_config
from trainer.errors import ConfigError

LR = 1e-2


def _config(optimizer="muon", scan=False, weight_decay=0.0):
  config = tiny_config(optimizer=optimizer, schedule="constant",
                       warmup_steps=0, weight_decay=weight_decay,
                       learning_rate=LR)
  if optimizer == "muon":
    config.train.muon_learning_rate = 2 * LR
  config.model.scan_layers = scan
  return config


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: rng.normal(0, 1e-2, p.shape).astype(np.float32), params)


def _updates(config, params, grads, jit=False):
  """The optimizer's updates after a step for each of `grads` (eagerly
  unless `jit`: op by op, the same operations give the same bits in two
  optimizers)."""
  tx = optim.make_optimizer(config)
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  for g in grads:
    updates, state = update(g, state, params)
  return updates


def _matrices(path, u):
  """The update of a hidden kernel as Muon's matrices [batch, in, out]."""
  name = roles.names(path)[-1]
  if name == "qkv_kernel":  # [D, 3, H, K] -> [3, D, H * K]
    return u.reshape(u.shape[0], 3, -1).transpose(1, 0, 2)
  if name == "out_kernel":  # [H, K, D] -> [1, H * K, D]
    return u.reshape(1, -1, u.shape[-1])
  return u[None]


@pytest.fixture(scope="module")
def params():
  return random_params(config_lib.model_config(_config(), 37), seed=3)


def test_hidden_updates_are_orthogonal_the_rest_adamws(params):
  """The first step's update of each hidden kernel, over its rate, is an
  orthogonalized matrix per Q, K and V (Newton-Schulz: singular values
  near 1, spread ~0.7..1.2) of RMS about 0.2, unlike Adam's (whose entries are
  all +-1 on a first step); every other update equals AdamW's."""
  grads = [_grads(params, 0)]
  muon = _updates(_config(), params, grads)
  adamw = _updates(_config("adamw"), params, grads)
  hidden = 0
  for path, u in jax.tree_util.tree_leaves_with_path(muon):
    a = adamw
    for key in path:
      a = a[key.key]
    if roles.role(path) != roles.HIDDEN:
      np.testing.assert_array_equal(u, a, err_msg=jax.tree_util.keystr(path))
      continue
    hidden += 1
    for m in _matrices(path, np.asarray(u) / (-2 * LR)):
      scale = optim.MUON_RMS * np.sqrt(max(m.shape))
      singular = np.linalg.svd(m / scale, compute_uv=False)
      assert singular.max() < 1.25, (path, singular)
      # A random square matrix has a few singular values near 0, which 5
      # Newton-Schulz steps do not bring all the way up.
      assert np.mean(singular > 0.6) >= 0.9, (path, singular)
      rms = np.sqrt(np.mean(m**2)) / optim.MUON_RMS  # its singular values'
      assert 0.7 < rms < 1.2, (path, rms)
    # Adam's first step is a sign step (every entry about +-LR); Muon's not.
    assert np.median(np.abs(a)) == pytest.approx(LR, rel=1e-3)
    assert np.std(np.abs(u)) > 0.3 * np.mean(np.abs(u))
  assert hidden == 8  # 4 kernels x 2 layers


def test_weight_decay_is_decoupled_at_muons_rate(params):
  """Zero gradients: Muon's direction is 0 and its update weight decay
  alone, -muon_learning_rate * weight_decay * p (AdamW's: its own rate)."""
  config = _config(weight_decay=0.1)
  tx = optim.make_optimizer(config)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    p = params
    for key in path:
      p = p[key.key]
    role = roles.role(path)
    rate = {roles.HIDDEN: 2 * LR, roles.NORM: 0, roles.BIAS: 0}.get(role, LR)
    np.testing.assert_allclose(u, -rate * 0.1 * p, rtol=1e-6, atol=1e-12,
                               err_msg=jax.tree_util.keystr(path))


def test_scanned_and_unrolled_models_get_the_same_updates(params):
  """Two steps (momentum included) from the same gradients: each layer of
  the scanned model's stacked kernels is orthogonalized apart, as the
  unrolled model's are."""
  layers = _config().model.num_layers
  grads = [_grads(params, 0), _grads(params, 1)]
  unrolled = _updates(_config(scan=False), params, grads, jit=True)
  stack = lambda tree: _stacked(tree, layers)
  scanned = _unstacked(_updates(_config(scan=True), stack(params),
                                list(map(stack, grads)), jit=True), layers)
  for (path, u), s in zip(jax.tree_util.tree_leaves_with_path(unrolled),
                          jax.tree.leaves(scanned)):
    np.testing.assert_allclose(s, u, rtol=1e-4, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_dimension_numbers_come_from_names_and_ranks():
  dims = lambda path, shape: optim.muon_dimensions(
      tuple(jax.tree_util.DictKey(k) for k in path), np.zeros(shape))
  qkv = dims(("block_0", "Attention_0", "qkv_kernel"), (8, 3, 2, 4))
  assert (qkv.reduction_axis, qkv.output_axis) == (-4, (-2, -1))
  # A layers axis in front is one more batch axis.
  assert dims(("blocks", "Attention_0", "qkv_kernel"), (2, 8, 3, 2, 4)) == qkv
  assert dims(("lm_head", "kernel"), (8, 37)) is None
  assert dims(("block_0", "LayerNorm_0", "scale"), (8,)) is None
  with pytest.raises(ValueError, match="hidden parameter block_0/MLP_0/"
                     "Dense_0/kernel has shape \\(8,\\); MUON_AXES reads it "
                     "as rank 2"):
    dims(("block_0", "MLP_0", "Dense_0", "kernel"), (8,))
  with pytest.raises(ValueError, match="hidden parameter block_0/gate_kernel "
                     "has no Muon axes"):
    dims(("block_0", "gate_kernel"), (8, 8))


def test_a_run_resumes_with_its_own_optimizer(tmp_path):
  """The checkpoints hold one optimizer's state: resuming with the other
  is refused; a run saved before the field (no train.optimizer in its
  config.json) was AdamW's."""
  config = tiny_config()
  saved_config.save(config, str(tmp_path))
  config.train.optimizer = "muon"
  with pytest.raises(ConfigError, match=f"^{tmp_path} holds a run of another "
                     "config: train.optimizer \\(the run's 'adamw', now "
                     "'muon'\\); resume it with the run's values"):
    saved_config.check_resumable(config, str(tmp_path))
  path = os.path.join(tmp_path, "config.json")
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text.replace('"optimizer": "adamw",', ""))
  assert saved_config.load_saved(str(tmp_path)).train.optimizer == "adamw"
