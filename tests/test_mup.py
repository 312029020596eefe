"""muP: the base width is the standard parametrization bit for bit; away
from it the hidden weights' updates, inits, the attention scale and the
output multiplier scale with the width; the coordinate check's slopes; the
config rules."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import param_shapes, tiny_config, tiny_model_config
from model import GPT, roles
from research import mup
from trainer import config as config_lib, optim, run as run_lib, sharding
from trainer import saved_config
from trainer import state as state_lib
from trainer.errors import ConfigError

L = 16
HIDDEN = ("qkv_kernel", "out_kernel", "Dense_0/kernel", "Dense_1/kernel")


def _mup_config(width=32, base=32, **train):
  config = tiny_config(**train)
  config.model.update(d_model=width, parametrization="mup",
                      mup_base_width=base)
  return config


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _is_hidden(path) -> bool:
  return _path(path).endswith(HIDDEN)


def dataclass_replace(cfg, **changes):
  import dataclasses
  return dataclasses.replace(cfg, **changes)


def _init_and_step(config, batch):
  """(params at init, loss of one step, params after it, the optimizer
  state, the step's program as StableHLO text without its outputs' names)
  of the config, as train.py builds and steps it."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model, tx, rules, shardings = run_lib.model_and_optimizer(config, 37, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = state_lib.init_state(model, tx, shardings, seed=0)
    init = jax.device_get(state.params)
    step = state_lib.make_train_step(model, tx, shardings,
                                     grad_accum_steps=1, seed=0)
    batch = sharding.to_global(batch, sharding.batch_sharding(mesh),
                               batch.shape)
    program = re.sub(r'jax\.result_info = "[^"]*"', "",
                     step.lower(state, batch).as_text())
    state, metrics = step(state, batch)
    return (init, float(metrics["loss"]), jax.device_get(state.params),
            jax.device_get(state.opt_state), program)


def test_base_width_is_the_standard_parametrization_bit_for_bit():
  """At d_model = mup_base_width: the same params from the same seed, the
  same loss, and the same params and Adam moments after a step. Compared
  bitwise because the train step is one program: muP's at its base width
  lowers to the standard one's text (the outputs' names aside: muP's
  optimizer state holds one more, empty, entry), so every CPU compiles
  both alike. (The init programs are the same text too.)"""
  batch = np.random.default_rng(0).integers(0, 37, (4, L + 1)).astype(
      np.int32)
  standard = tiny_config(weight_decay=0.1)
  mup_config = _mup_config(weight_decay=0.1)
  init_sp, loss_sp, after_sp, opt_sp, program_sp = _init_and_step(standard,
                                                                  batch)
  init_mup, loss_mup, after_mup, opt_mup, program_mup = _init_and_step(
      mup_config, batch)
  assert program_mup == program_sp  # else compare with a tolerance
  jax.tree.map(np.testing.assert_array_equal, init_sp, init_mup)
  assert loss_sp == loss_mup
  jax.tree.map(np.testing.assert_array_equal, after_sp, after_mup)
  adam = lambda opt: opt[1][0]  # (clip, (Adam, ...)): the moments
  jax.tree.map(np.testing.assert_array_equal, adam(opt_sp), adam(opt_mup))


def test_standard_optimizer_state_is_adamws():
  """The standard chain is optax.adamw's: checkpoints written before muP
  (and before weight decay went by role) restore into it."""
  config = tiny_config()
  params = param_shapes(tiny_model_config())
  t = config.train
  before = optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.adamw(
      optim.lr_schedule(config), b1=t.b1, b2=t.b2, eps=t.eps,
      weight_decay=t.weight_decay,
      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  assert (jax.tree.structure(jax.eval_shape(optim.make_optimizer(config).init,
                                            params)) ==
          jax.tree.structure(jax.eval_shape(before.init, params)))


@pytest.mark.parametrize("scan", [False, True])
def test_hidden_weights_are_the_attention_and_mlp_kernels(scan):
  config = _mup_config(width=64, base=32)
  config.model.scan_layers = scan
  cfg = config_lib.model_config(config, 37)

  def found(cfg):
    multipliers = optim.lr_multipliers(cfg)
    return {_path(p): multipliers.get(role, 1.0) for p, role in
            jax.tree_util.tree_flatten_with_path(
                roles.of(param_shapes(cfg)))[0]}

  for name, m in found(cfg).items():
    assert m == (0.5 if name.endswith(HIDDEN) else 1.0), name
  assert sum(m == 0.5 for m in found(cfg).values()) == (
      4 if scan else 4 * cfg.num_layers)
  assert found(dataclass_replace(cfg, tie_embeddings=False))[
      "lm_head/kernel"] == 1.0
  assert optim.lr_multipliers(tiny_model_config()) == {}  # standard


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_hidden_updates_scale_as_base_over_width(weight_decay):
  """The same gradients and params through the optimizers of one width
  (64) under muP (base 32) and standard: the hidden weights' Adam step is
  halved, every other update is the same (to float32 round-off: the two
  optimizers are different programs); weight decay is not scaled."""
  standard = tiny_config(weight_decay=weight_decay, warmup_steps=0)
  standard.model.d_model = 64
  mup_config = _mup_config(width=64, base=32, weight_decay=weight_decay,
                           warmup_steps=0)
  cfg = config_lib.model_config(mup_config, 37)
  params = jax.tree.map(
      lambda s: jax.random.normal(jax.random.key(s.size), s.shape),
      nn.unbox(jax.eval_shape(GPT(cfg).init, jax.random.key(0),
                              jnp.zeros((1, L), jnp.int32)))["params"])
  grads = jax.tree.map(lambda p: 1e-3 * jnp.cos(p), params)
  updates = {}
  for name, config in (("sp", standard), ("mup", mup_config)):
    tx = optim.make_optimizer(config)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(grads, state, params)
    updates[name], _ = jax.jit(tx.update)(grads, state, params)
  lr = float(optim.lr_schedule(mup_config)(1))
  assert lr > 0

  def check(path, p, sp, mu):
    if not _is_hidden(path):
      np.testing.assert_allclose(mu, sp, rtol=1e-6, atol=1e-9)
      return
    decay = -lr * weight_decay * p
    adam_sp = sp - decay
    np.testing.assert_allclose(mu, 0.5 * adam_sp + decay, rtol=1e-5,
                               atol=1e-9)
    assert np.abs(adam_sp).max() > 0

  jax.tree_util.tree_map_with_path(check, params, updates["sp"],
                                   updates["mup"])


def test_init_std_of_hidden_weights_goes_as_one_over_sqrt_width():
  cfg = config_lib.model_config(_mup_config(width=128, base=32), 37)
  params = nn.unbox(jax.jit(GPT(cfg).init)(
      jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"])
  attention = params["block_0"]["Attention_0"]
  np.testing.assert_allclose(np.std(attention["qkv_kernel"]), 0.02 / 2,
                             rtol=0.02)
  np.testing.assert_allclose(np.std(params["block_0"]["MLP_0"]["Dense_0"][
      "kernel"]), 0.02 / 2, rtol=0.02)
  np.testing.assert_allclose(  # GPT-2's 1/sqrt(2 layers) on top
      np.std(attention["out_kernel"]), 0.02 / 2 / 2, rtol=0.03)
  np.testing.assert_allclose(np.std(params["Embed_0"]["embedding"]), 0.02,
                             rtol=0.03)  # input weights: unchanged


def test_attention_scale_and_output_multiplier():
  base = config_lib.model_config(_mup_config(width=32, base=32), 37)
  assert base.attention_scale == 1.0 / math.sqrt(16)  # 2 heads of 16
  assert base.output_mult == 1 and base.hidden_init_scale == 1
  wide = config_lib.model_config(_mup_config(width=128, base=32), 37)
  assert wide.attention_scale == pytest.approx(math.sqrt(16) / 64)  # 1/K
  assert wide.output_mult == 0.25
  standard = tiny_model_config(d_model=128)
  assert standard.attention_scale == 1.0 / math.sqrt(64)
  assert standard.output_mult == 1


def test_attention_implementations_agree_under_mup():
  """The einsum attention, XLA's and the cached path use the same muP
  scale: logits agree away from the base width."""
  from model.kv_cache import KVCache
  cfg = config_lib.model_config(_mup_config(width=64, base=32), 37)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 37, (2, L)))
  params = jax.jit(GPT(cfg).init)(jax.random.key(0), tokens)["params"]
  # Sharper attention than at init, so that the scale matters.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 20 if _path(p).endswith("qkv_kernel") else x,
      nn.unbox(params))
  einsum = GPT(cfg).apply({"params": params}, tokens)
  xla = GPT(dataclass_replace(cfg, attention="xla")).apply(
      {"params": params}, tokens)
  np.testing.assert_allclose(xla, einsum, rtol=1e-4, atol=1e-4)
  pos = jnp.broadcast_to(jnp.arange(L), (2, L))
  cached, _ = GPT(cfg).apply({"params": params}, tokens,
                             cache=KVCache.empty(cfg, 2), pos_BxL=pos)
  np.testing.assert_allclose(cached, einsum, rtol=1e-4, atol=1e-4)
  standard = GPT(dataclass_replace(cfg, parametrization="standard")).apply(
      {"params": params}, tokens)
  assert np.abs(np.asarray(standard) - np.asarray(einsum)).max() > 1e-2


# ------------------------------------------------------- coordinate check

def test_loglog_slopes():
  widths = [64, 128, 256, 512]
  assert mup.loglog_slope(widths, [3.0] * 4) == pytest.approx(0, abs=1e-12)
  assert mup.loglog_slope(widths, [0.1 * w ** 0.5 for w in widths]) == (
      pytest.approx(0.5))
  assert mup.loglog_slope(widths, [5 / w for w in widths]) == pytest.approx(
      -1)
  assert math.isnan(mup.loglog_slope(widths, [1, 2, float("nan"), 4]))
  assert math.isnan(mup.loglog_slope(widths, [1, 2, 0, 4]))
  # Fixed examples, against the closed form of least squares in log-log.
  assert mup.loglog_slope(widths, [1.0, 1.1, 0.95, 1.05]) == pytest.approx(
      -3.3612e-05, abs=1e-8)
  assert mup.loglog_slope(widths, [1.0, 1.2, 1.3, 1.5]) == pytest.approx(
      0.187036, abs=1e-6)
  result = mup.slopes({"mup": {"logits": [[1, 1, 1, 1], [1, 2, 4, 8]]}},
                      widths)
  assert result["mup"]["logits"] == [pytest.approx(0), pytest.approx(1)]


def test_coord_check_end_to_end(corpus_dir, data_cache, tmp_path,
                                monkeypatch):
  """Two tiny widths, one step: every layer is found and the files are
  written; at initialization the standard MLP output grows with the width
  (about as the width: two matmuls of fixed-std weights), muP's does not."""
  monkeypatch.setenv("GPT_JAX_CACHE", data_cache)
  status = mup.main(["coord_check", "--widths", "16,32", "--steps", "1",
                     "--seeds", "0", "--layers", "1", "--heads", "2",
                     "--seq-len", "8", "--batch-size", "2", "--source",
                     corpus_dir, "--out", str(tmp_path)])
  assert status in (0, 1)  # 1: some muP slope above 0.1 (two tiny widths)
  import json
  result = json.loads((tmp_path / "coord_check.json").read_text())
  assert result["layers"] == ["embedding", "block_0.attention",
                              "block_0.mlp", "logits"]
  assert (tmp_path / "coord_check.png").stat().st_size > 0
  mlp_at_init = {p: result["slopes"][p]["block_0.mlp"][0]
                 for p in ("standard", "mup")}
  assert mlp_at_init["standard"] > 0.5 > abs(mlp_at_init["mup"])


def test_transfer_summary_finds_the_best_learning_rates():
  rows = []
  lrs = [2 ** -k for k in (8, 7, 6, 5, 4)]
  for p, best_index in (("standard", {32: 3, 64: 2, 128: 1, 256: 0}),
                        ("mup", {32: 3, 64: 3, 128: 2, 256: 3})):
    for w, best in best_index.items():
      for i, lr in enumerate(lrs):
        rows.append({"kind": "run", "status": "done",
                     "model.parametrization": p, "model.d_model": w,
                     "train.learning_rate": lr, "loss": 2 + abs(i - best)})
  summary = mup.transfer_summary(rows)
  assert summary["parametrizations"]["standard"]["best_spread_steps"] == 3
  assert summary["parametrizations"]["mup"]["best_spread_steps"] == 1
  assert summary["mup_transfers"] and summary["standard_moves"]
  assert summary["parametrizations"]["standard"]["best_at_grid_edge"] == [256]
  # A best at the grid's edge may lie beyond it: no transfer shown.
  rows = [r for r in rows if r["train.learning_rate"] != 2 ** -4]
  assert not mup.transfer_summary(rows)["mup_transfers"]
  assert "**2.0000**" in mup.transfer_table(summary)


# ------------------------------------------------------------ config rules

@pytest.mark.parametrize("field, value, message", [
    ("parametrization", "mu-p", "model.parametrization='mu-p' must be one of"),
    ("mup_base_width", 0, "model.mup_base_width=0 must be an integer >= 1"),
    ("mup_base_width", 33, "model.mup_base_width=33 must be a positive "
     "multiple of model.num_heads=2"),
    ("d_ff", 100, "model.parametrization='mup' scales the MLP with d_model: "
     "set model.d_ff=0"),
    ("mup_base_heads", 4, "model.num_heads=2 differs from muP's base "
     "model's model.mup_base_heads=4: muP's attention scale keeps the heads "
     "fixed as the width grows (head_dim grows with it); set "
     "model.num_heads=4"),
])
def test_config_rules_refuse(field, value, message):
  config = _mup_config()
  config.model[field] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.validate(config)


def test_standard_ignores_the_base_width():
  config = tiny_config()
  config.model.mup_base_width = 33  # not a multiple of the heads: unused
  config_lib.validate(config)
  config.model.update(d_ff=100, mup_base_heads=5)
  config_lib.validate(config)


def test_export_to_gpt2_refuses_mup_away_from_its_base_width(tmp_path,
                                                             capsys):
  import os
  from trainer import hf_gpt2
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  config = hf_gpt2.run_config({"d_model": 96, "num_heads": 3})
  config.model.update(parametrization="mup", mup_base_width=48)
  saved_config.save(config, workdir)
  exported = tmp_path / "exported"
  assert hf_gpt2.main(["export", workdir, str(exported)]) == 2
  assert capsys.readouterr().err == (
      "error: model.parametrization='mup' at d_model=96, not its base "
      "width 48: GPT-2's layout has no output multiplier or 1/head_dim "
      "attention scale\n")
  assert not exported.exists()
