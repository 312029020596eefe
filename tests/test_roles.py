"""Parameter roles: every parameter's role, weight decay and learning-rate
multiplier, by name, the same with layers scanned or unrolled; a scanned
and an unrolled model train alike under weight decay."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import param_shapes, random_params, tiny_config
from model import roles
from trainer import config as config_lib, optim, run as run_lib, sharding
from trainer import state as state_lib
from test_recipe import RECIPE

# What every block holds, by its path inside the block: (role, decayed,
# learning rate scaled by muP's 1 / width_mult).
BLOCK = {
    "Attention_0/qkv_kernel": ("hidden", True, True),
    "Attention_0/qkv_bias": ("bias", False, False),
    "Attention_0/out_kernel": ("hidden", True, True),
    "Attention_0/out_bias": ("bias", False, False),
    "LayerNorm_0/scale": ("norm", False, False),
    "LayerNorm_0/bias": ("norm", False, False),
    "LayerNorm_1/scale": ("norm", False, False),
    "LayerNorm_1/bias": ("norm", False, False),
    "MLP_0/Dense_0/kernel": ("hidden", True, True),
    "MLP_0/Dense_0/bias": ("bias", False, False),
    "MLP_0/Dense_1/kernel": ("hidden", True, True),
    "MLP_0/Dense_1/bias": ("bias", False, False),
}
# A block with model.norm="rmsnorm" and qk_norm: gains alone.
RMS_BLOCK = {**{path: want for path, want in BLOCK.items()
                if not path.startswith("LayerNorm")},
             **{path: ("norm", False, False) for path in (
                 "RMSNorm_0/scale", "RMSNorm_1/scale",
                 "Attention_0/q_norm/scale", "Attention_0/k_norm/scale")}}
# And the rest of the model.
OUTSIDE = {
    "Embed_0/embedding": ("embedding", True, False),
    "wpe": ("position", True, False),
    "ln_f/scale": ("norm", False, False),
    "ln_f/bias": ("norm", False, False),
    "lm_head/kernel": ("head", True, False),
    "lm_head/bias": ("bias", False, False),
    "value_embeds": ("embedding", True, False),
}


def _config(name: str, **model):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.model.update(model)
  return config


# (config, the block prefixes it has, muP's multiplier of hidden weights)
TABLES = {
    "base": (_config("base"),
                ("block_0/", "block_1/", "block_2/"), 1.0),
    "gpt2_large-scanned": (_config("gpt2_large"), ("blocks/",), 1.0),
    "gpt3_small-scanned-pattern": (
        _config("gpt3_small", scan_layers=True),
        ("blocks/block_0/", "blocks/block_1/"), 1.0),
    "mup-untied": (_config("base", parametrization="mup", d_model=384,
                           mup_base_width=96, tie_embeddings=False),
                   ("block_0/", "block_1/", "block_2/"), 0.25),
    "mup-recipe": (_config("base", parametrization="mup", d_model=384,
                           mup_base_width=96, **RECIPE),
                   ("block_0/", "block_1/", "block_2/"), 0.25),
    "recipe-scanned": (_config("base", scan_layers=True, **RECIPE),
                       ("blocks/",), 1.0),
}


def _table(config) -> dict:
  """{path: (role, decayed, learning-rate multiplier)} of every parameter
  of the config's model, as trainer.optim treats it."""
  cfg = config_lib.model_config(config, 50257)
  params = param_shapes(cfg)
  multipliers = optim.lr_multipliers(cfg)
  leaves = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(roles.names(path)): (role, decay,
                                        multipliers.get(role, 1.0))
          for (path, role), (_, decay) in zip(
              leaves(roles.of(params)), leaves(optim.decay_mask(params)))}


@pytest.mark.parametrize("name", TABLES)
def test_every_parameters_role_decay_and_learning_rate(name):
  config, prefixes, hidden_lr = TABLES[name]
  config_lib.validate(config)
  rms = config.model.norm == "rmsnorm"
  want = {prefix + tail: (role, decay, hidden_lr if scaled else 1.0)
          for prefix in prefixes for tail, (role, decay, scaled)
          in (RMS_BLOCK if rms else BLOCK).items()}
  want.update({path: (role, decay, 1.0) for path, (role, decay, _)
               in OUTSIDE.items() if not (rms and path == "ln_f/bias")})
  if config.model.tie_embeddings:
    del want["lm_head/kernel"], want["lm_head/bias"]
  if config.model.position != "learned":
    del want["wpe"]
  if not config.model.value_embeds:
    del want["value_embeds"]
  assert _table(config) == want


def test_roles_come_from_names_not_shapes():
  """A layers axis changes no role; a name no rule covers is refused."""
  assert roles.role(("blocks", "LayerNorm_0", "scale")) == roles.NORM
  assert roles.role(("blocks", "Attention_0", "q_norm", "scale")) == roles.NORM
  assert roles.role(("block_3", "Attention_0", "qkv_bias")) == roles.BIAS
  assert roles.role(("lm_head", "kernel")) == roles.HEAD
  with pytest.raises(ValueError, match="parameter block_0/gate has no role"):
    roles.role(("block_0", "gate"))


def _stacked(params, num_layers):
  """Per-layer params (block_0, block_1, ...) in nn.scan's layout."""
  blocks = [params[f"block_{i}"] for i in range(num_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith("block_")}
  return {**rest, "blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}


def _unstacked(params, num_layers):
  rest = {k: v for k, v in params.items() if k != "blocks"}
  return {**rest, **{f"block_{i}": jax.tree.map(lambda x, i=i: x[i],
                                                params["blocks"])
                     for i in range(num_layers)}}


def _config_for(scan: bool):
  """A constant learning rate and weight decay strong enough that a decayed
  LayerNorm gain would move by 3e-3 in 3 steps."""
  config = tiny_config(weight_decay=0.1, warmup_steps=0, schedule="constant",
                       learning_rate=1e-2)
  config.model.scan_layers = scan
  return config


def _after_steps(scan: bool, params, batches):
  """`params` (unrolled layout) after AdamW steps on `batches`, in the
  unrolled layout."""
  config = _config_for(scan)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model, tx, rules, shardings = run_lib.model_and_optimizer(config, 37, mesh)
  if scan:
    params = _stacked(params, config.model.num_layers)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda p: state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                    out_shardings=shardings)(params)
    step = state_lib.make_train_step(model, tx, shardings, grad_accum_steps=1,
                                     seed=0)
    for batch in batches:
      state, _ = step(state, batch)
  params = jax.device_get(state.params)
  return _unstacked(params, config.model.num_layers) if scan else params


def test_scanned_and_unrolled_models_train_alike_under_weight_decay():
  """The same initial values, 3 AdamW steps with weight decay: the scanned
  and the unrolled model end equal to round-off. (Decayed by rank, the
  scanned model's gains would end 3e-3 below the unrolled one's.)"""
  cfg = config_lib.model_config(_config_for(False), 37)
  params = random_params(cfg, seed=1, std=0.05)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 37, (4, cfg.seq_len + 1)).astype(np.int32)
             for _ in range(3)]
  unrolled = _after_steps(False, params, batches)
  scanned = _after_steps(True, params, batches)
  assert jax.tree.structure(scanned) == jax.tree.structure(unrolled)
  for (path, s), u, p in zip(jax.tree_util.tree_leaves_with_path(scanned),
                             jax.tree.leaves(unrolled),
                             jax.tree.leaves(params)):
    name = jax.tree_util.keystr(path)
    if name.endswith("['qkv_bias']"):
      # The key bias adds the same score to every key of a query: softmax
      # ignores it, its gradient is round-off, which Adam scales up.
      np.testing.assert_allclose(s[1], u[1], rtol=0, atol=1e-4, err_msg=name)
      s, u, p = s[::2], u[::2], p[::2]
    np.testing.assert_allclose(s, u, rtol=0, atol=2e-6, err_msg=name)
    assert np.abs(u - p).max() > 1e-3, name  # trained


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_gains_and_biases_are_not_decayed(scan):
  """With zero gradients Adam's step is 0: the update is weight decay
  alone, -learning_rate * weight_decay * p on the matrices and 0 on every
  gain and bias, the layers axis notwithstanding."""
  config = _config_for(scan)
  cfg = config_lib.model_config(config, 37)
  params = random_params(cfg, seed=2)
  tx = optim.make_optimizer(config)
  updates, _ = jax.jit(tx.update)(jax.tree.map(np.zeros_like, params),
                                  tx.init(params), params)
  decay = -config.train.learning_rate * config.train.weight_decay
  for path, u, p in zip(*zip(*jax.tree_util.tree_leaves_with_path(updates)),
                        jax.tree.leaves(params)):
    if roles.role(path) in (roles.NORM, roles.BIAS):
      assert not np.any(u), jax.tree_util.keystr(path)
    else:
      np.testing.assert_allclose(u, decay * p, rtol=1e-6,
                                 err_msg=jax.tree_util.keystr(path))
