"""Hugging Face GPT-2 weights in and out, without torch.

  python -m trainer.hf_gpt2 import HF_DIR WORKDIR [--scan_layers]
  python -m trainer.hf_gpt2 export WORKDIR HF_DIR

HF_DIR is GPT2LMHeadModel's `save_pretrained` layout: config.json,
model.safetensors and, optionally, tokenizer files. An import writes WORKDIR
as a run that --mode=eval/sample and checkpoint.init_from read like an
exported one; an export writes the newest params of any run that GPT-2's
layout can express. Import then export gives back every tensor bit for bit.

The tensor names and shapes are model/hf_gpt2.py's mapping; this module
checks what it reads, and reads and writes the files and workdirs.
"""

import argparse
import json
import os
import shutil
import sys

import jax
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging

import errors
import layout
from configs import base
from data import disk, tokenizers
from model import GPTConfig
from model import hf_gpt2 as mapping
from trainer import checkpoint, metrics, run as run_lib, sharding
from trainer import config as config_lib, saved_config
from trainer import state as state_lib
from trainer.errors import ConfigError

_WEIGHTS = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt",
                    "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------- import

def model_fields(hf_config: dict, source: str) -> dict:
  """Our config.model fields for a GPT2Config, or a ConfigError naming the
  first feature our GPT lacks."""
  for field, ours in mapping.HF_FIXED.items():
    value = hf_config.get(field, ours)
    if value != ours and value not in mapping.HF_SYNONYMS.get(field, ()):
      raise ConfigError(f"{source}: {field}={value!r} is a GPT-2 variant "
                        f"our GPT cannot express (it has {field}={ours!r})")
  missing = [hf for hf, _ in mapping.HF_SIZES if hf not in hf_config]
  if missing:
    raise ConfigError(f"{source} has no {missing[0]}; is it a GPT-2 "
                      "config.json?")
  fields = {ours: hf_config[hf] for hf, ours in mapping.HF_SIZES}
  fields["d_ff"] = hf_config.get("n_inner") or 0  # None: 4 * n_embd
  return fields


def _read_tensors(path: str) -> dict:
  """The float tensors of a safetensors file, names without `transformer.`;
  the causal-mask buffers are left out."""
  tensors = {}
  try:
    with safetensors.safe_open(path, framework="np") as f:
      for key in f.keys():
        name = key.removeprefix(mapping.PREFIX)
        if ".".join(name.split(".")[-2:]) in mapping.BUFFERS:
          continue
        dtype = f.get_slice(key).get_dtype()
        if dtype not in ("F32", "F16"):
          raise ConfigError(
              f"{path}: {key} is {dtype}; only float32 and float16 are read "
              "(save the model in float32: model.float().save_pretrained)")
        tensors[name] = f.get_tensor(key)
  except (OSError, safetensors.SafetensorError) as e:
    raise ConfigError(f"{path} does not read as safetensors "
                      f"({str(e).splitlines()[0]})") from None
  return tensors


def check_tensors(tensors: dict, cfg: GPTConfig, source: str) -> None:
  """Every tensor of the config's GPT-2 present with its shape, no other
  one: else a ConfigError naming the first that is not."""
  rows = mapping.rows(cfg)
  for hf, hf_shape, _, _ in rows:
    if hf not in tensors:
      raise ConfigError(f"{source} has no tensor {hf}, which GPT-2 with this "
                        "config.json has")
    if tensors[hf].shape != hf_shape:
      raise ConfigError(f"{source}: {hf} has shape {tensors[hf].shape}; "
                        f"GPT-2 with this config.json has {hf_shape}")
  head = tensors.get("lm_head.weight")
  if head is not None and not np.array_equal(head, tensors["wte.weight"]):
    raise ConfigError(f"{source}: lm_head.weight differs from wte.weight; "
                      "our GPT has tied embeddings only")
  unknown = sorted(set(tensors) - {hf for hf, *_ in rows} - {"lm_head.weight"})
  if unknown:
    raise ConfigError(f"{source} has a tensor our GPT has no place for: "
                      f"{unknown[0]}")


def _read_tokenizer(hf_dir: str, vocab_size: int):
  """GPT-2's tokenizer in hf_dir (tokenizer.json, or vocab.json and
  merges.txt) with the names of its files there, or (None, [])."""
  files = [f for f in _TOKENIZER_FILES
           if os.path.isfile(os.path.join(hf_dir, f))]
  if not ({"tokenizer.json"} <= set(files) or
          {"vocab.json", "merges.txt"} <= set(files)):
    return None, []
  try:
    tok = tokenizers.BPETokenizer.load(hf_dir)
  except Exception as e:  # whatever the files hold, say which and why
    raise ConfigError(f"the tokenizer in {hf_dir} does not load as a "
                      f"byte-level BPE ({str(e).splitlines()[0]})") from None
  if tok.vocab_size > vocab_size:
    raise ConfigError(f"the tokenizer in {hf_dir} has {tok.vocab_size} ids, "
                      f"more than the model's vocab_size={vocab_size}")
  return tok, files


def run_config(fields: dict):
  """configs/base.py with the imported model: what eval, sample and
  init_from rebuild it from."""
  config = base.get_config()
  config.model.update(fields)
  config.model.dropout = 0.0
  config.data.source = ""
  config.data.tokenizer = "gpt2"
  return config


def _check_new_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"{workdir} is a file; give a directory")
  if os.path.exists(os.path.join(workdir, layout.CHECKPOINTS)):
    raise ConfigError(f"{workdir} already holds checkpoints; give a new "
                      "directory")


def import_gpt2(hf_dir: str, workdir: str, scan_layers: bool = False):
  """Writes WORKDIR from HF_DIR once all of it has been read and checked:
  bad input leaves nothing behind. Returns the model's GPTConfig."""
  config_path = os.path.join(hf_dir, "config.json")
  weights_path = os.path.join(hf_dir, _WEIGHTS)
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      raise ConfigError(f"{hf_dir} has no {os.path.basename(path)}; give a "
                        "directory written by GPT2LMHeadModel.save_pretrained")
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{config_path} does not read as JSON ({e})") from None
  config = run_config(model_fields(hf_config, config_path))
  config.model.scan_layers = scan_layers
  try:
    cfg = config_lib.model_config(config, config.model.vocab_size)
  except ConfigError as e:
    raise ConfigError(f"{config_path}: {e}") from None
  tensors = _read_tensors(weights_path)
  check_tensors(tensors, cfg, weights_path)
  tok, tokenizer_files = _read_tokenizer(hf_dir, cfg.vocab_size)
  _check_new_workdir(workdir)

  params = jax.device_put(mapping.params_from_gpt2(tensors, cfg))
  target = checkpoint.Checkpointer(workdir, keep=1)
  target.save_params(0, params, {
      "config": json.loads(config.to_json()), "step": 0,
      "imported_from": os.path.abspath(hf_dir)})
  target.close()
  saved_config.save(config, workdir)
  metrics.write_run_summary(workdir, cfg, config.train)
  if tok is not None:
    directory = os.path.join(workdir, layout.TOKENIZER)
    os.makedirs(directory, exist_ok=True)
    for name in tokenizer_files:
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(directory, name))
    if "tokenizer.json" not in tokenizer_files:
      tok.save(directory)
    with open(os.path.join(directory, tokenizers.SPEC), "w") as f:
      json.dump(tok.to_json(), f, indent=1)
  return cfg


# ---------------------------------------------------------------- export

def _check_gpt2_layout(model) -> None:
  """Refuses what GPT2LMHeadModel cannot hold, naming the field."""
  for field, gpt2 in (("position", "learned"), ("use_bias", True),
                      ("tie_embeddings", True), ("attention_pattern", "dense"),
                      ("norm", "layernorm"), ("qk_norm", False),
                      ("activation", "gelu"), ("logit_softcap", 0.0),
                      ("value_embeds", 0)):
    if model[field] != gpt2:
      raise ConfigError(f"model.{field}={model[field]!r}: GPT-2's layout "
                        f"holds model.{field}={gpt2!r} only")
  if (model.parametrization == "mup" and
      model.d_model != model.mup_base_width):
    raise ConfigError(
        f"model.parametrization='mup' at d_model={model.d_model}, not its "
        f"base width {model.mup_base_width}: GPT-2's layout has no output "
        "multiplier or 1/head_dim attention scale")


def _vocab_size(workdir: str, config, embedding_shape: tuple) -> int:
  """The real vocabulary of a run or import: its config's, else (trained
  runs may leave model.vocab_size 0, the tokenizer's) its run.json's, else
  the rows of an unpadded embedding."""
  if config.model.vocab_size:
    return config.model.vocab_size
  try:
    with open(os.path.join(workdir, layout.RUN)) as f:
      return json.load(f)["vocab_size"]
  except (OSError, ValueError, KeyError):
    pass
  if config.model.vocab_multiple == 1:
    return embedding_shape[0]
  raise ConfigError(
      f"{workdir} does not say how many of its {embedding_shape[0]} "
      "embedding rows are the vocabulary (model.vocab_size=0 in its "
      "config.json, no run.json); set model.vocab_size there")


def load_params(workdir: str):
  """(config, GPTConfig, step, params as numpy) of the newest checkpoint of
  a run or import that restores."""
  config = saved_config.load_saved(workdir)
  source = checkpoint.Checkpointer(workdir, keep=1, read_only=True)
  step = source.latest_step()
  if step is None:
    raise ConfigError(f"{workdir} holds no checkpoint (nothing under "
                      f"{source.directory})")
  vocab_size = _vocab_size(
      workdir, config, source.saved_shapes(step)["params.Embed_0.embedding"])
  config.mesh = base.get_config().mesh
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model, tx, _, shardings = run_lib.model_and_optimizer(config, vocab_size,
                                                        mesh)
  target = state_lib.abstract_state(model, tx, shardings)
  with jax.set_mesh(mesh):
    step, state = source.restore_latest_valid(target, params_only=True)
  source.close()
  return config, model.cfg, step, jax.device_get(state.params)


def export_gpt2(workdir: str, hf_dir: str) -> int:
  """Writes HF_DIR from WORKDIR's newest params; returns their step."""
  _check_gpt2_layout(saved_config.load_saved(workdir).model)
  for name in ("config.json", _WEIGHTS):
    if os.path.exists(os.path.join(hf_dir, name)):
      raise ConfigError(f"{hf_dir} already holds {name}; give a new "
                        "directory")
  if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
    raise ConfigError(f"{hf_dir} is a file; give a directory")
  tokenizer_dir = os.path.join(workdir, layout.TOKENIZER)
  eot_id, tokenizer_files = None, []
  if os.path.isfile(os.path.join(tokenizer_dir, tokenizers.SPEC)):
    try:
      eot_id = tokenizers.load_dir(tokenizer_dir).eot_id
    except Exception as e:  # a missing or foreign file: say which and why
      raise ConfigError(f"the tokenizer in {tokenizer_dir} does not load "
                        f"({str(e).splitlines()[0]})") from None
    tokenizer_files = [f for f in _TOKENIZER_FILES
                       if os.path.isfile(os.path.join(tokenizer_dir, f))]
  _, cfg, step, params = load_params(workdir)

  os.makedirs(hf_dir, exist_ok=True)
  for name in tokenizer_files:
    shutil.copyfile(os.path.join(tokenizer_dir, name),
                    os.path.join(hf_dir, name))
  weights = os.path.join(hf_dir, _WEIGHTS)
  with disk.replacing(weights, "wb") as f:  # written by name, not in memory
    safetensors.numpy.save_file(mapping.gpt2_from_params(params, cfg),
                                f.name, metadata={"format": "pt"})
  disk.write_json(os.path.join(hf_dir, "config.json"),
                  mapping.hf_config(cfg, eot_id), indent=2)
  return step


# ---------------------------------------------------------------- command

@errors.command
def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m trainer.hf_gpt2",
      description="Hugging Face GPT-2 weights (GPT2LMHeadModel, safetensors) "
      "in and out of a run's workdir.")
  commands = p.add_subparsers(dest="command", required=True)
  imp = commands.add_parser(
      "import", help="HF_DIR -> WORKDIR, a run that --mode=eval/sample and "
      "checkpoint.init_from read")
  imp.add_argument("hf_dir")
  imp.add_argument("workdir")
  imp.add_argument("--scan_layers", action="store_true",
                   help="write the layers stacked (model.scan_layers=True)")
  exp = commands.add_parser(
      "export", help="the newest params of WORKDIR -> HF_DIR, which "
      "GPT2LMHeadModel.from_pretrained reads")
  exp.add_argument("workdir")
  exp.add_argument("hf_dir")
  args = p.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  if args.command == "import":
    cfg = import_gpt2(args.hf_dir, args.workdir, args.scan_layers)
    print(f"imported {args.hf_dir} ({cfg.num_layers} layers x "
          f"{cfg.d_model} x {cfg.num_heads} heads, context {cfg.seq_len}, "
          f"vocab {cfg.vocab_size} padded to {cfg.padded_vocab_size}: "
          f"{cfg.num_params() / 1e6:.2f}M params) to {args.workdir}")
  else:
    step = export_gpt2(args.workdir, args.hf_dir)
    print(f"exported the parameters of step {step} of {args.workdir} to "
          f"{args.hf_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
