"""Training throughput: tokens/s, step time, compile time, peak memory, MFU.

  python -m benchmarks.train_throughput                 # configs/base.py (3 x 96, characters)
  python -m benchmarks.train_throughput --shape=6x384   # 6 layers x 384 x 6 heads, batch 16 x 256
  python -m benchmarks.train_throughput --shape=6x384 --torch   # + PyTorch reference, side by side
  python -m benchmarks.train_throughput --versus model.attention_chunks=1   # + a variant, side by side
  python -m benchmarks.train_throughput --versus main   # + the code of a git revision, side by side
  python -m benchmarks.train_throughput --config=configs/gpt2_small.py --vocab=50257 \
      --set train.batch_size=32 model.dtype=bfloat16 model.attention=cudnn   # a GPU

Steps run on random tokens (the input pipeline is measured in training logs as
data_wait_ms). MFU counts model.flops_per_token() (6N, N the non-embedding
parameters: the project's one convention, docs/model.md "FLOPs") against the accelerator's datasheet peak (dense bf16) where
trainer.metrics knows the device, else against the median FLOP/s of a large
float32 matmul measured on this machine, so that on a CPU it reads as
"fraction of what XLA's matmul reaches here".
Rounds alternate between frameworks so that machine noise hits both alike.
A git revision given to --versus is extracted (git archive) into a
temporary directory and timed there, in a process of its own that runs its
rounds when this one tells it to, beside a second such process running
this working tree's code, so that both are timed alike (versus_revision).
"""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

import jax

from trainer import metrics, run as run_lib, sharding
from trainer.timing import jax_runner

SHAPES = {
    "default": {},
    "4x128": dict(num_layers=4, d_model=128, num_heads=4),  # the old default
    "6x384": dict(num_layers=6, d_model=384, num_heads=6, seq_len=256,
                  batch_size=16),
}


def _override(config, items) -> None:
  """Applies "section.field=value" overrides, typed like the field."""
  for item in items:
    key, value = item.split("=", 1)
    section, field = key.split(".")
    old = config[section][field]
    config[section][field] = type(old)(
        value == "True" if isinstance(old, bool) else value)


# Run in a revision's tree: its own jax_runner, driven over stdin/stdout
# (loading the config by hand: older revisions lack load_config).
_DRIVER = r"""
import importlib.util, json, sys
sys.path.insert(0, ".")
from benchmarks import train_throughput as tt
args = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("config", args["config"])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
overrides = dict(tt.SHAPES[args["shape"]])
if "batch_size" in overrides:
  config.train.batch_size = overrides.pop("batch_size")
config.model.update(overrides)
tt._override(config, args["set"])
_, compile_s, run = tt.jax_runner(config, args["vocab"])
import hashlib, re
import flax.linen as nn, jax, numpy as np
from trainer import sharding, state as state_lib
try:
  from trainer.run import model_and_optimizer
except ImportError:  # a revision from before trainer/run.py
  from trainer.loop import model_and_optimizer
mesh = sharding.make_mesh(config.mesh)
model, tx, rules, shardings = model_and_optimizer(config, args["vocab"], mesh)
shape = (config.train.batch_size, config.model.seq_len + 1)
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
  step = state_lib.make_train_step(model, tx, shardings, grad_accum_steps=1,
                                   seed=0)
  text = step.lower(state_lib.abstract_state(model, tx, shardings),
                    jax.ShapeDtypeStruct(shape, np.int32, sharding=(
                        sharding.batch_sharding(mesh)))).compile().as_text()
ops = re.findall(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+([\w-]+)\(", text,
                 re.M)
print("ready", compile_s, hashlib.sha256(repr(ops).encode()).hexdigest()[:16],
      len(ops), flush=True)
for line in sys.stdin:
  print(run(int(line)), flush=True)
"""


def revision_runner(revision: str | None, args):
  """(run(steps) -> seconds, close(), compile seconds) of the train step
  as `revision`'s code has it (None: this working tree's), the same shape
  and overrides (--set), in a process of its own."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tree = repo
  if revision is not None:
    tree = tempfile.mkdtemp(prefix="throughput-")
    archive = subprocess.run(["git", "archive", revision], capture_output=True,
                             cwd=repo)
    if archive.returncode:
      raise SystemExit(f"--versus {revision}: not a git revision here "
                       f"({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout,
                   check=True)
  proc = subprocess.Popen(
      [sys.executable, "-c", _DRIVER, json.dumps(
          {"config": args.config, "shape": args.shape, "set": args.set,
           "vocab": args.vocab})],
      cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  ready = proc.stdout.readline()
  if not ready.startswith("ready"):
    raise SystemExit(f"--versus {revision}: its benchmark did not start")
  _, compile_s, hlo, instructions = ready.split()
  compile_s = float(compile_s)

  def run(steps):
    proc.stdin.write(f"{steps}\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())

  def close():
    proc.stdin.close()
    proc.wait()
    if tree != repo:
      shutil.rmtree(tree, ignore_errors=True)

  run.compiled_step = f"{hlo} ({instructions} instructions)"
  return run, close, compile_s


def versus_revision(revision: str, args):
  """Step times of this working tree's code ("jax") and `revision`'s
  ("jax_versus"), each in a process of its own, in alternating rounds. The
  process started first ran 5-10% faster here whatever its code (--versus
  HEAD), so the rounds are split into two halves that start the two in
  either order, and each half alternates which goes first in a round. Each
  side also reports a hash of its compiled step's instructions."""
  times = {"jax": [], "jax_versus": []}
  compile_s, compiled = None, {}
  for half, order in enumerate(((None, revision), (revision, None))):
    procs = {}
    for rev in order:
      name = "jax" if rev is None else "jax_versus"
      procs[name] = revision_runner(rev, args)
      compile_s = compile_s or procs[name][2]
      compiled[name] = procs[name][0].compiled_step
    for i in range((args.rounds + 1 - half) // 2):
      for name in list(procs)[::-1 if i % 2 else 1]:
        times[name].append(procs[name][0](args.steps) / args.steps)
    for _, close, _ in procs.values():
      close()
  return times, compile_s, compiled


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("benchmarked_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _parse_args():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="configs/base.py",
                 help="a config file (its get_config())")
  p.add_argument("--shape", choices=sorted(SHAPES), default="default")
  p.add_argument("--steps", type=int, default=10, help="steps per round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--vocab", type=int, default=84, help="Shakespeare chars: 84")
  p.add_argument("--torch", action="store_true", help="also run benchmarks/torch_gpt.py")
  p.add_argument("--set", nargs="*", default=[],
                 help="config overrides, e.g. model.scan_layers=True")
  p.add_argument("--versus", nargs="*", default=[],
                 help="also time the config with these further overrides "
                 "(reported as jax_versus_*), in alternating rounds; or a "
                 "git revision (e.g. main): the same config with that "
                 "revision's code")
  return p.parse_args()


def _time_in_process(config, args):
  """(model config, compile seconds, step times per runner, per-step
  tokens and FLOPs per token of the runners not timing the config's): the
  config, a --versus variant and --torch's reference, in alternating rounds
  in this process."""
  per_step = {}  # runner -> (tokens, FLOPs per token), where not the config's
  cfg, compile_s, run = jax_runner(config, args.vocab)
  runners = {"jax": run}
  if args.versus:
    versus = config.copy_and_resolve_references()
    _override(versus, args.versus)
    versus_cfg, _, runners["jax_versus"] = jax_runner(versus, args.vocab)
    # The variant may change the batch or the model: its own tokens/FLOPs.
    per_step["jax_versus"] = (versus.train.batch_size * versus_cfg.seq_len,
                              versus_cfg.flops_per_token())
  if args.torch:
    try:
      from benchmarks import torch_gpt
    except ImportError:
      sys.exit("error: --torch needs PyTorch (pip install torch); it is "
               "not a project dependency")
    runners["torch"] = torch_gpt.runner(cfg, config.train.batch_size)
  times = {name: [] for name in runners}
  for _ in range(args.rounds):
    for name, r in runners.items():
      times[name].append(r(args.steps) / args.steps)
  return cfg, compile_s, times, per_step


def _result(args, config, cfg, compile_s, times, per_step, compiled) -> dict:
  """The printed summary: the setup, the peak the MFU counts against, each
  runner's step time, tokens/s and MFU, and the side-by-side ratios
  (`compiled`: the two compiled steps' hashes of a --versus revision)."""
  tokens = config.train.batch_size * cfg.seq_len
  kind = jax.devices()[0].device_kind
  peak = metrics.known_peak_flops(kind) or metrics.measure_matmul_flops(
      n=2048, repeats=5)
  result = {"shape": f"{cfg.num_layers}x{cfg.d_model}x{cfg.num_heads}",
            "batch": f"{config.train.batch_size}x{cfg.seq_len}",
            "devices": f"{jax.device_count()} x {kind}",
            "dtype": cfg.dtype, "attention": cfg.attention,
            "compile_s": round(compile_s, 2),
            "peak_gflops": round(peak / 1e9, 1),
            "peak_from": ("datasheet, dense bf16" if metrics.known_peak_flops(kind)
                          else "measured float32 matmul"),
            "peak_rss_mib": round(resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024)}
  for name, ts in times.items():
    step = statistics.median(ts)
    n, flops = per_step.get(name, (tokens, cfg.flops_per_token()))
    result[f"{name}_step_ms"] = round(1e3 * step, 1)
    result[f"{name}_tokens_per_sec"] = round(n / step)
    result[f"{name}_mfu"] = round(flops * n / step / peak, 3)
  if compiled:
    # A hash of the compiled step's instructions (shapes and opcodes, in
    # order): equal hashes, the same program.
    result["compiled_step"] = compiled["jax"]
    result["compiled_step_versus"] = compiled["jax_versus"]
  if args.versus:
    result["versus"] = " ".join(args.versus)
    result["jax_over_versus"] = round(
        result["jax_tokens_per_sec"] / result["jax_versus_tokens_per_sec"], 3)
  if args.torch:
    result["jax_over_torch"] = round(
        result["jax_tokens_per_sec"] / result["torch_tokens_per_sec"], 3)
  return result


def main():
  args = _parse_args()
  config = load_config(args.config)
  overrides = dict(SHAPES[args.shape])
  if "batch_size" in overrides:
    config.train.batch_size = overrides.pop("batch_size")
  config.model.update(overrides)
  _override(config, args.set)

  revision = (args.versus[0] if len(args.versus) == 1 and
              "=" not in args.versus[0] else None)
  if revision:
    cfg = run_lib.model_and_optimizer(config, args.vocab, sharding.make_mesh(
        config.mesh))[0].cfg
    times, compile_s, compiled = versus_revision(revision, args)
    per_step = {}
  else:
    cfg, compile_s, times, per_step = _time_in_process(config, args)
    compiled = None
  print(json.dumps(_result(args, config, cfg, compile_s, times, per_step,
                           compiled), indent=1))


if __name__ == "__main__":
  main()
