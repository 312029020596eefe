"""Hugging Face GPT-2 in and out (model/hf_gpt2.py, trainer/hf_gpt2.py):
logits equal to transformers' on a committed fixture, import then export
bit-exact, bad input refused with one line, and an import as the start of a
fine-tuning run.

tests/fixtures/hf_gpt2_tiny is GPT2LMHeadModel.save_pretrained output with
its logits, made by tests/fixtures/make_hf_gpt2_fixture.py; the test against
a GPT-2-small-shaped model runs only where torch and transformers import.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import safetensors.numpy
import tokenizers as hf_tokenizers

import layout
from conftest import BASE_CONFIG, REPO, param_shapes, tiny_model_config
from data import tokenizers
from model import GPT
from model import hf_gpt2 as mapping
from trainer import config as config_lib, hf_gpt2, run as run_lib, sharding
from trainer import objectives, saved_config
from trainer import state as state_lib

FIXTURE = os.path.join(REPO, "tests", "fixtures", "hf_gpt2_tiny")
WEIGHTS = "model.safetensors"


def _fixture_tensors() -> dict:
  return safetensors.numpy.load_file(os.path.join(FIXTURE, WEIGHTS))


def _hf_dir(tmp_path, config=None, tensors=None, name="hf") -> str:
  """A copy of the fixture with config.json fields replaced (None: removed)
  and, if given, other tensors."""
  path = tmp_path / name
  shutil.copytree(FIXTURE, path)
  if config:
    fields = json.loads((path / "config.json").read_text())
    fields.update(config)
    fields = {k: v for k, v in fields.items() if v is not None}
    (path / "config.json").write_text(json.dumps(fields))
  if tensors is not None:
    safetensors.numpy.save_file(tensors, str(path / WEIGHTS),
                                metadata={"format": "pt"})
  return str(path)


def _main(capsys, *argv):
  """(exit status, stdout, stderr) of `python -m trainer.hf_gpt2 ARGV`, run
  in this process."""
  status = hf_gpt2.main(list(argv))
  out = capsys.readouterr()
  return status, out.out, out.err


def _report(capsys, line: str) -> None:
  """Prints a measured number past pytest's capture."""
  with capsys.disabled():
    print(line)


def _logits(workdir, input_ids):
  """The model of a workdir and its logits of the real vocabulary (the
  padded ids' checked to be masked)."""
  _, cfg, _, params = hf_gpt2.load_params(workdir)
  logits = np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, input_ids))
  assert (logits[..., cfg.vocab_size:] == np.finfo(np.float32).min).all()
  return cfg, logits[..., :cfg.vocab_size]


def _import_from_before_padding(tmp_path, monkeypatch) -> str:
  """A workdir as imports were before model.vocab_multiple: the vocabulary
  unpadded, no such field in config.json, no run.json."""
  workdir = tmp_path / "old-import"
  with monkeypatch.context() as patch:
    run_config = hf_gpt2.run_config
    patch.setattr(hf_gpt2, "run_config", lambda fields: _unpadded(
        run_config(fields)))
    hf_gpt2.import_gpt2(FIXTURE, str(workdir))
  fields = json.loads((workdir / "config.json").read_text())
  del fields["model"]["vocab_multiple"]
  (workdir / "config.json").write_text(json.dumps(fields))
  (workdir / "run.json").unlink()
  return str(workdir)


def _unpadded(config):
  config.model.vocab_multiple = 1
  return config


# ---------------------------------------------------------------- mapping

MAPPING_VARIANTS = {
    "default": {},
    "padded": dict(vocab_multiple=128),
    "scan": dict(scan_layers=True),
    "d_ff-4-heads-3-layers": dict(d_ff=48, num_heads=4, num_layers=3),
}


@pytest.mark.parametrize("overrides", MAPPING_VARIANTS.values(),
                         ids=MAPPING_VARIANTS.keys())
def test_mapping_fills_our_param_tree_and_inverts(overrides):
  """Every one of our parameters gets a GPT-2 tensor of its size, in the
  shape the model declares, and the way back gives the same bytes."""
  cfg = tiny_model_config(**overrides)
  rng = np.random.default_rng(0)
  D, F, L = cfg.d_model, cfg.mlp_dim, cfg.num_layers
  shapes = {"wte.weight": (cfg.vocab_size, D), "wpe.weight": (cfg.seq_len, D),
            "ln_f.weight": (D,), "ln_f.bias": (D,)}
  for i in range(L):
    shapes.update({
        f"h.{i}.ln_1.weight": (D,), f"h.{i}.ln_1.bias": (D,),
        f"h.{i}.attn.c_attn.weight": (D, 3 * D),
        f"h.{i}.attn.c_attn.bias": (3 * D,),
        f"h.{i}.attn.c_proj.weight": (D, D), f"h.{i}.attn.c_proj.bias": (D,),
        f"h.{i}.ln_2.weight": (D,), f"h.{i}.ln_2.bias": (D,),
        f"h.{i}.mlp.c_fc.weight": (D, F), f"h.{i}.mlp.c_fc.bias": (F,),
        f"h.{i}.mlp.c_proj.weight": (F, D), f"h.{i}.mlp.c_proj.bias": (D,)})
  tensors = {k: rng.normal(size=s).astype(np.float32)
             for k, s in shapes.items()}
  hf_gpt2.check_tensors(tensors, cfg, "random")
  params = mapping.params_from_gpt2(tensors, cfg)
  want = jax.tree.map(lambda s: s.shape, param_shapes(cfg))
  assert jax.tree.map(np.shape, params) == want
  assert not np.any(params["Embed_0"]["embedding"][cfg.vocab_size:])
  back = mapping.gpt2_from_params(params, cfg)
  assert sorted(back) == sorted("transformer." + k for k in tensors)
  for k, v in tensors.items():
    assert back["transformer." + k].tobytes() == v.tobytes(), k
  # Heads are contiguous column blocks of c_attn: q, k, v, then head by head.
  qkv = params["blocks"]["Attention_0"]["qkv_kernel"][0] if cfg.scan_layers \
      else params["block_0"]["Attention_0"]["qkv_kernel"]
  K = cfg.head_dim
  np.testing.assert_array_equal(
      qkv[:, 1, 1], tensors["h.0.attn.c_attn.weight"][:, D + K:D + 2 * K])


# ---------------------------------------------------------------- logits

def _hub_keys(tmp_path):
  """The fixture as the hub's gpt2 files name it: no `transformer.`, and the
  causal-mask buffers of older transformers."""
  tensors = {k.removeprefix("transformer."): v
             for k, v in _fixture_tensors().items()}
  for i in range(2):
    tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  return _hf_dir(tmp_path, tensors=tensors)


LAYOUTS = {
    "save_pretrained": (lambda tmp_path: FIXTURE, []),
    "hub-keys": (_hub_keys, []),
    "scan_layers": (lambda tmp_path: FIXTURE, ["--scan_layers"]),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_imported_fixture_gives_transformers_logits(layout, tmp_path, capsys):
  make_dir, flags = layout
  workdir = str(tmp_path / "run")
  status, out, err = _main(capsys, "import", make_dir(tmp_path), workdir,
                           *flags)
  assert status == 0, err
  assert "2 layers x 32 x 4 heads, context 64, vocab 288 padded to 384" in out
  expected = np.load(os.path.join(FIXTURE, "expected.npz"))
  cfg, logits = _logits(workdir, expected["input_ids"])
  assert cfg.scan_layers == bool(flags)
  diff = np.abs(logits - expected["logits"]).max()
  assert diff < 1e-4, diff  # 2.3e-6 measured, on logits up to 4.8
  assert np.abs(expected["logits"]).max() > 1  # not a near-constant model


# ---------------------------------------------------------------- round trip

@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_import_then_export_is_bit_exact(scan, tmp_path, capsys):
  workdir, exported = str(tmp_path / "run"), str(tmp_path / "exported")
  flags = ["--scan_layers"] if scan else []
  assert _main(capsys, "import", FIXTURE, workdir, *flags)[0] == 0

  # The workdir: a run's config, one params-only checkpoint, the tokenizer.
  config = saved_config.load_saved(workdir)
  config_lib.validate(config)
  assert dict(config.model) == {
      **dict(hf_gpt2.run_config({}).model), "vocab_size": 288,
      "vocab_multiple": 128, "num_layers": 2, "d_model": 32, "num_heads": 4,
      "seq_len": 64, "d_ff": 0, "dropout": 0.0, "scan_layers": scan}
  assert (config.data.tokenizer, config.data.source) == ("gpt2", "")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0"]
  with open(os.path.join(workdir, "checkpoints", "0", "run",
                         "metadata")) as f:
    run_info = json.load(f)
  assert run_info["imported_from"] == FIXTURE and run_info["step"] == 0
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  with open(os.path.join(tokenizer_dir, "spec.json")) as f:
    tok = tokenizers.from_json(json.load(f), tokenizer_dir)
  assert tok.vocab_size == 288 and tok.eot_id == 0
  if scan:  # as a trained run's config has it (the tokenizer's): run.json
    config.model.vocab_size = 0  # says how many rows are not padding
    saved_config.save(config, workdir)

  status, out, err = _main(capsys, "export", workdir, exported)
  assert status == 0, err
  assert f"exported the parameters of step 0 of {workdir}" in out
  original = _fixture_tensors()
  back = safetensors.numpy.load_file(os.path.join(exported, WEIGHTS))
  assert sorted(back) == sorted(original)  # no lm_head: tied
  for k in original:
    assert back[k].dtype == np.float32, k
    assert back[k].tobytes() == original[k].tobytes(), k
  with open(os.path.join(FIXTURE, "config.json")) as f:
    want = json.load(f)
  with open(os.path.join(exported, "config.json")) as f:
    got = json.load(f)
  for field in ("model_type", "architectures", "vocab_size", "n_positions",
                "n_embd", "n_layer", "n_head", "n_inner",
                "activation_function", "layer_norm_epsilon",
                "tie_word_embeddings", "scale_attn_weights",
                "scale_attn_by_inverse_layer_idx", "add_cross_attention",
                "reorder_and_upcast_attn", "bos_token_id", "eos_token_id"):
    assert got[field] == want[field], field
  assert got["n_ctx"] == 64
  assert sorted(os.listdir(exported)) == ["config.json", WEIGHTS,
                                          "tokenizer.json"]
  with open(os.path.join(FIXTURE, "tokenizer.json"), "rb") as a, \
      open(os.path.join(exported, "tokenizer.json"), "rb") as b:
    assert a.read() == b.read()


def test_vocab_and_merges_tokenizer_is_imported(tmp_path, capsys):
  """GPT-2's other tokenizer files: the workdir gets them and a
  tokenizer.json that tokenizes alike."""
  hf_dir = _hf_dir(tmp_path)
  original = hf_tokenizers.Tokenizer.from_file(
      os.path.join(hf_dir, "tokenizer.json"))
  original.model.save(hf_dir)  # vocab.json and merges.txt
  os.remove(os.path.join(hf_dir, "tokenizer.json"))
  workdir = str(tmp_path / "run")
  assert _main(capsys, "import", hf_dir, workdir)[0] == 0
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  assert sorted(os.listdir(tokenizer_dir)) == [
      "merges.txt", "spec.json", "tokenizer.json", "vocab.json"]
  with open(os.path.join(tokenizer_dir, "spec.json")) as f:
    tok = tokenizers.from_json(json.load(f), tokenizer_dir)
  text = "the king speaks of love; café — ’tis o’er"
  assert tok.encode(text).tolist() == original.encode(text).ids
  assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------- bad input

def _without(name):
  tensors = _fixture_tensors()
  del tensors[name]
  return tensors


def _replaced(name, array):
  return {**_fixture_tensors(), name: array}


BAD_INPUT = {
    "missing-tensor": (None, lambda: _without("transformer.h.1.mlp.c_fc.bias"),
                       "has no tensor h.1.mlp.c_fc.bias"),
    "wrong-shape": (None, lambda: _replaced(
        "transformer.h.0.attn.c_attn.weight", np.zeros((32, 95), np.float32)),
                    "h.0.attn.c_attn.weight has shape (32, 95); GPT-2 with "
                    "this config.json has (32, 96)"),
    "wrong-dtype": (None, lambda: _replaced("transformer.wpe.weight",
                                            np.zeros((64, 32), np.int32)),
                    "transformer.wpe.weight is I32"),
    "untied-lm_head": (None, lambda: _replaced(
        "lm_head.weight", np.ones((288, 32), np.float32)),
                       "lm_head.weight differs from wte.weight"),
    "unknown-tensor": (None, lambda: _replaced(
        "transformer.h.0.crossattention.c_attn.weight",
        np.ones((32, 64), np.float32)),
                       "no place for: h.0.crossattention.c_attn.weight"),
    "relu": ({"activation_function": "relu"}, None,
             "activation_function='relu' is a GPT-2 variant"),
    "epsilon": ({"layer_norm_epsilon": 1e-6}, None, "layer_norm_epsilon=1e-06"),
    "untied-config": ({"tie_word_embeddings": False}, None,
                      "tie_word_embeddings=False"),
    "scale_attn_by_inverse_layer_idx": (
        {"scale_attn_by_inverse_layer_idx": True}, None,
        "scale_attn_by_inverse_layer_idx=True"),
    "unscaled-attention": ({"scale_attn_weights": False}, None,
                           "scale_attn_weights=False"),
    "another-model": ({"model_type": "gpt_neo"}, None, "model_type='gpt_neo'"),
    "no-n_embd": ({"n_embd": None}, None, "config.json has no n_embd"),
    "heads-do-not-divide": ({"n_head": 5}, None,
                            "model.d_model=32 is not divisible by "
                            "model.num_heads=5"),
    "tokenizer-too-large": ({"vocab_size": 100}, lambda: {
        k: v[:100] if "wte" in k else v for k, v in _fixture_tensors().items()},
                            "has 288 ids, more than the model's "
                            "vocab_size=100"),
}


@pytest.mark.parametrize("bad", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_and_writes_nothing(bad, tmp_path, capsys):
  config, tensors, message = bad
  hf_dir = _hf_dir(tmp_path, config, tensors() if tensors else None)
  workdir = tmp_path / "run"
  status, out, err = _main(capsys, "import", hf_dir, str(workdir))
  assert status == 2 and not out
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert message in err, err
  assert not workdir.exists()


def test_bad_input_from_the_command_line(tmp_path):
  """The module as a command: one line on stderr, status 2, and an existing
  WORKDIR left as it was."""
  hf_dir = _hf_dir(tmp_path, {"activation_function": "gelu"})
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  result = subprocess.run(
      [sys.executable, "-m", "trainer.hf_gpt2", "import", hf_dir, str(workdir)],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and not result.stdout
  assert result.stderr == (
      f"error: {hf_dir}/config.json: activation_function='gelu' is a GPT-2 "
      "variant our GPT cannot express (it has "
      "activation_function='gelu_new')\n")
  assert os.listdir(workdir) == ["notes.txt"]


def test_a_workdir_with_checkpoints_is_refused(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert _main(capsys, "import", FIXTURE, workdir)[0] == 0
  before = sorted(os.walk(workdir))
  status, _, err = _main(capsys, "import", FIXTURE, workdir)
  assert status == 2
  assert err == f"error: {workdir} already holds checkpoints; give a new " \
      "directory\n"
  assert sorted(os.walk(workdir)) == before

  # An export does not overwrite an earlier one.
  exported = str(tmp_path / "exported")
  assert _main(capsys, "export", workdir, exported)[0] == 0
  status, _, err = _main(capsys, "export", workdir, exported)
  assert status == 2 and "already holds config.json" in err


@pytest.mark.parametrize("field, value, message", [
    ("position", "sinusoidal", "model.position='sinusoidal': GPT-2's layout "
     "holds model.position='learned' only"),
    ("position", "rope", "model.position='rope': GPT-2's layout holds "
     "model.position='learned' only"),
    ("use_bias", False, "model.use_bias=False: GPT-2's layout holds "
     "model.use_bias=True only"),
    ("tie_embeddings", False, "model.tie_embeddings=False: GPT-2's layout "
     "holds model.tie_embeddings=True only"),
    ("attention_pattern", "dense,local", "model.attention_pattern="
     "'dense,local': GPT-2's layout holds model.attention_pattern='dense' "
     "only"),
    ("norm", "rmsnorm", "model.norm='rmsnorm': GPT-2's layout holds "
     "model.norm='layernorm' only"),
    ("qk_norm", True, "model.qk_norm=True: GPT-2's layout holds "
     "model.qk_norm=False only"),
    ("activation", "relu2", "model.activation='relu2': GPT-2's layout holds "
     "model.activation='gelu' only"),
    ("logit_softcap", 30.0, "model.logit_softcap=30.0: GPT-2's layout holds "
     "model.logit_softcap=0.0 only"),
    ("value_embeds", 1, "model.value_embeds=1: GPT-2's layout holds "
     "model.value_embeds=0 only")],
                         ids=["position", "rope", "use_bias",
                              "tie_embeddings", "attention_pattern", "norm",
                              "qk_norm", "activation", "logit_softcap",
                              "value_embeds"])
def test_export_refuses_what_gpt2_cannot_hold(field, value, message, tmp_path,
                                              capsys):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  config = hf_gpt2.run_config({})
  config.model[field] = value
  saved_config.save(config, workdir)
  exported = tmp_path / "exported"
  status, out, err = _main(capsys, "export", workdir, str(exported))
  assert status == 2 and not out
  assert err == f"error: {message}\n"
  assert not exported.exists()


def test_export_of_a_checkpoint_its_config_does_not_fit(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert _main(capsys, "import", FIXTURE, workdir)[0] == 0
  config = saved_config.load_saved(workdir)
  config.model.d_model = 64
  saved_config.save(config, workdir)
  exported = tmp_path / "exported"
  status, _, err = _main(capsys, "export", workdir, str(exported))
  assert status == 2 and len(err.splitlines()) == 1
  assert "does not match the model" in err and (
      "(params.Embed_0.embedding: (384, 32) saved, (384, 64) wanted)" in err)
  assert not exported.exists()


# ---------------------------------------------------------------- init_from

@pytest.mark.parametrize("old", [False, True], ids=["import",
                                                   "unpadded-import"])
def test_init_from_an_import_starts_from_its_params(old, tmp_path, capsys,
                                                    monkeypatch):
  """checkpoint.init_from=<import> through the trainer's own restore: every
  parameter is the GPT-2 tensor's, also from an import from before
  vocabulary padding into a run that pads."""
  imported = str(tmp_path / "imported")
  if old:
    imported = _import_from_before_padding(tmp_path, monkeypatch)
  else:
    assert _main(capsys, "import", FIXTURE, imported)[0] == 0
  config = saved_config.load_saved(imported)
  assert config.model.vocab_multiple == (1 if old else 128)
  config.model.vocab_multiple = 128
  config.checkpoint.init_from = imported
  mesh = sharding.make_mesh(config.mesh)
  model, tx, rules, shardings = run_lib.model_and_optimizer(config, 288, mesh)
  run = run_lib.Run(config, str(tmp_path / "tuned"), None,
                    tokenizers.load_dir(os.path.join(imported,
                                                     layout.TOKENIZER)),
                    model, tx, mesh, rules, shardings, None, None)
  with jax.set_mesh(mesh):
    state = state_lib.init_state(model, tx, shardings, seed=0)
    state = run_lib._init_from(run, state, imported)
  assert f"starting from the parameters of {imported}/checkpoints/0" in (
      capsys.readouterr().out)
  params = jax.device_get(state.params)
  assert params["Embed_0"]["embedding"].shape == (384, 32)
  exported = mapping.gpt2_from_params(params, model.cfg)
  for k, v in _fixture_tensors().items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  assert int(state.step) == 0 and state.opt_state is not None


def test_an_import_is_used_with_its_own_tokenizer(tmp_path, capsys,
                                                   corpus_dir):
  """train.py's modes read the import's tokenizer (it has no corpus); a
  corpus with another tokenizer cannot fine-tune it."""
  imported = str(tmp_path / "imported")
  assert _main(capsys, "import", FIXTURE, imported)[0] == 0
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run(
      [sys.executable, "train.py", BASE_CONFIG, *args], cwd=REPO, env=env,
      text=True, capture_output=True, timeout=300)
  result = run(f"--workdir={imported}", "--mode=next", "--json",
               "--config.sample.prompt=Hello world")
  assert result.returncode == 0, result.stderr[-2000:]
  rows = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(rows) == 5 and all(r["id"] < 288 for r in rows)
  _, logits = _logits(imported, tokenizers.load_dir(os.path.join(
      imported, layout.TOKENIZER)).encode("Hello world")[None])
  assert rows[0]["id"] == int(np.argmax(logits[0, -1]))
  tuned = run(f"--config.checkpoint.init_from={imported}",
              f"--config.data.source={corpus_dir}",
              f"--config.data.cache_dir={tmp_path / 'cache'}",
              f"--workdir={tmp_path / 'tuned'}", "--config.train.steps=2",
              "--config.model.vocab_size=288", "--config.model.d_model=32",
              "--config.model.num_layers=2", "--config.model.num_heads=4",
              "--config.model.seq_len=64")
  assert tuned.returncode == 2, tuned.stderr[-2000:]
  assert tuned.stderr.strip().splitlines()[-1].startswith(
      f"error: the model of {imported} uses a bpe tokenizer of 288 ids, but "
      f"{corpus_dir} was prepared with a char tokenizer")
  assert not os.path.exists(tmp_path / "tuned" / "config.json")


def test_import_fine_tune_and_sample(tmp_path, capsys, corpus_dir):
  """docs/generation.md's example at the fixture's size: import, prepare a
  corpus with the import's tokenizer, fine-tune from the import, sample."""
  imported = str(tmp_path / "imported")
  assert _main(capsys, "import", FIXTURE, imported)[0] == 0
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run(
      [sys.executable, *args], cwd=REPO, env=env, text=True,
      capture_output=True, timeout=300)
  data = str(tmp_path / "data")
  prepared = run("-m", "data.prepare", "--input", corpus_dir, "--output",
                 data, "--tokenizer", "gpt2", "--tokenizer-files",
                 os.path.join(imported, layout.TOKENIZER), "--seq-len", "64",
                 "--holdout", "hamlet")
  assert prepared.returncode == 0, prepared.stderr[-2000:]
  tuned = str(tmp_path / "tuned")
  model = ("--config.model.vocab_size=288", "--config.model.num_layers=2",
           "--config.model.d_model=32", "--config.model.num_heads=4",
           "--config.model.seq_len=64")
  result = run("train.py", BASE_CONFIG,
               f"--config.checkpoint.init_from={imported}",
               f"--config.data.source={data}", f"--workdir={tuned}", *model,
               "--config.train.steps=3", "--config.train.batch_size=4",
               "--config.train.learning_rate=1e-4",
               "--config.sample.max_new_tokens=5",
               "--config.perf.peak_flops=1e12")
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"starting from the parameters of {imported}/checkpoints/0" in (
      result.stdout + result.stderr)
  sample = run("train.py", "--mode=sample", f"--workdir={tuned}",
               "--config.sample.prompt=Hello", "--config.sample.temperature=0")
  assert sample.returncode == 0, sample.stderr[-2000:]
  assert sample.stdout.startswith("Hello")


def test_an_import_from_before_padding_still_loads(tmp_path, monkeypatch,
                                                   capsys):
  """Its config.json without model.vocab_multiple reads as 1 (unpadded, as
  it was written): its logits are transformers', its export bit-exact."""
  workdir = _import_from_before_padding(tmp_path, monkeypatch)
  expected = np.load(os.path.join(FIXTURE, "expected.npz"))
  cfg, logits = _logits(workdir, expected["input_ids"])
  assert cfg.padded_vocab_size == cfg.vocab_size == 288
  assert np.abs(logits - expected["logits"]).max() < 1e-4
  exported = str(tmp_path / "exported")
  assert _main(capsys, "export", workdir, exported)[0] == 0
  back = safetensors.numpy.load_file(os.path.join(exported, WEIGHTS))
  for k, v in _fixture_tensors().items():
    assert back[k].tobytes() == v.tobytes(), k


# ---------------------------------------------------------------- GPT-2 small

def test_gpt2_small_shape_against_transformers(tmp_path, capsys):
  """A random model of GPT-2 small's shape (12 x 768 x 12, vocab 50257,
  context 1024): logits and the gradients of the next-token loss equal to
  transformers', and our export read back by from_pretrained. Only where
  torch and transformers are installed (they are not requirements)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  start = time.perf_counter()
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
  with torch.no_grad():  # biases and LayerNorms off their constant init
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.05 * torch.randn_like(p))
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
  model.save_pretrained(hf_dir)
  input_ids = torch.randint(0, 50257, (2, 256),
                            generator=torch.Generator().manual_seed(0))
  out = model(input_ids, labels=input_ids)
  out.loss.backward()
  want_logits = out.logits.detach().numpy()
  want_grads = {"transformer." + k: p.grad.numpy()
                for k, p in model.transformer.named_parameters()}

  assert _main(capsys, "import", hf_dir, workdir)[0] == 0
  _, cfg, _, params = hf_gpt2.load_params(workdir)
  gpt = GPT(cfg)
  ids = jax.numpy.asarray(input_ids.numpy(), jax.numpy.int32)

  def loss_fn(params):
    logits = gpt.apply({"params": params}, ids)
    loss = objectives.cross_entropy(logits[:, :-1], ids[:, 1:]).mean()
    return loss, logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params)
  assert cfg.padded_vocab_size == 50304
  logits = np.asarray(logits)[..., :cfg.vocab_size]  # the rest: masked
  logit_diff = float(np.abs(logits - want_logits).max())
  _report(capsys, f"\nlogits: max abs difference {logit_diff:.2e} (logits "
          f"up to {np.abs(want_logits).max():.2f}); loss {float(loss):.6f} "
          f"vs {out.loss.item():.6f}")
  assert logit_diff < 1e-4
  grads = mapping.gpt2_from_params(jax.device_get(grads), cfg)
  for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
               "transformer.h.11.mlp.c_proj.weight", "transformer.ln_f.weight"):
    diff = np.abs(grads[name] - want_grads[name]).max()
    scale = np.abs(want_grads[name]).max()
    _report(capsys, f"grad {name}: max abs difference {diff:.2e} of "
            f"{scale:.2e}")
    assert diff <= 1e-5 * scale, name

  exported = str(tmp_path / "exported")
  assert _main(capsys, "export", workdir, exported)[0] == 0
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
  with torch.no_grad():
    again = reloaded(input_ids).logits.numpy()
  np.testing.assert_array_equal(again, want_logits)
  _report(capsys, f"took {time.perf_counter() - start:.0f} s")
