"""Balanced parentheses: does a transformer learn a grammar that needs
counting? One attention block against two (8 heads, width 128).

  python -m research.parens [--out DIR] [--steps N] [--samples N] ...
      [--set FIELD=VALUE ...]

Wolfram's account ("What is ChatGPT doing...") trained a transformer on
balanced parentheses plus an end token: with one attention block (8 heads,
feature vectors of 128) it learned little; with two it seemed to converge
after about 10 million examples, yet it still put 15% on an illegal ")"
with some 400,000 weights. This command repeats that comparison with the
project's own model and training loop (model.GPT, trainer.loop.train on a
prepared corpus, configs/parens.py) and scores both models.

Data. Documents are random walks on the depth (`Walk`: inside, open with
0.4 and close otherwise; at depth 0, end with 0.6; at most depth 8 and 64
characters), each followed by the end token as data.prepare packs them.
`pack` orders them so that every training window of model.seq_len tokens
starts at a document (right after an end token): no document is cut by a
window edge, every target is a legal continuation of what the window shows,
and each window opens exactly as scoring and sampling prompt the model (the
end token at position 0).

Metrics, per model (results.json; docs/parens.md):
- illegal mass: after every prefix of the held-out words (read after an end
  token), the probability on tokens that cannot continue a balanced word
  (")" at depth 0, the end inside or before the first "(", any other id),
  averaged over each word's positions and then over words; also the worst
  position and the mean per state (start, inside, depth 0);
- balanced fraction: samples at temperature 1 from the end token alone
  that are a balanced word followed by the end;
- greedy completion of d "(" for d = 1 .. 4 x the training depth: correct
  when it is exactly d ")" and the end; and the worst illegal mass along
  "(" * d + ")" * d;
- nats per token beside the walk's own (the least any model reaches).
Outputs: OUT/results.json, OUT/parens.png, OUT/{one_block,two_blocks}/
(each an ordinary workdir: metrics.jsonl, checkpoints, config.json). A
rerun reuses the prepared corpus and resumes or keeps finished models.
"""

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from data import disk
import errors
from errors import BadInput
from research.parens_data import (CLOSE, END, OPEN, Walk, illegal_mass,
                                  is_balanced, legal_next, prefix_depths,
                                  prepare_corpus, score_completion)

MODELS = {"one_block": 1, "two_blocks": 2}  # workdir name -> num_layers


# ------------------------------------------------------------------ the runs

def model_config(data_dir: str, num_layers: int, overrides: dict):
  """configs/parens.py on `data_dir` with `num_layers` blocks and the
  command's overrides (dotted field -> value)."""
  from configs import parens
  config = parens.get_config()
  config.data.source = data_dir
  config.model.num_layers = num_layers
  for field, value in overrides.items():
    section, name = field.split(".")
    config[section][name] = value
  return config


def parse_override(text: str, config) -> tuple[str, object]:
  """`section.field=value`, the value read as the field's type."""
  field, sep, raw = text.partition("=")
  section, _, name = field.partition(".")
  if not sep or section not in config or name not in config[section]:
    raise BadInput(f"--set {text!r}: give FIELD=VALUE with a field of "
                      "configs/parens.py, e.g. train.learning_rate=1e-3")
  kind = type(config[section][name])
  try:
    if kind is bool:
      value = {"true": True, "false": False}[raw.lower()]
    elif kind in (int, float, str):
      value = kind(raw)
    else:
      raise ValueError(f"a {kind.__name__} field")
  except (KeyError, ValueError) as e:
    raise BadInput(f"--set {text!r}: not a {kind.__name__} "
                      f"({e})") from None
  return field, value


# ---------------------------------------------------------------- scoring

def next_token_probs(model, params, tokenizer, words: list[str],
                     batch_size: int = 256) -> list[np.ndarray]:
  """For each word, P(open, close, end) after each of its prefixes, read
  after an end-of-text (a document's start, as in training): [n + 1, 3]."""
  import jax
  ids = np.array([*tokenizer.encode(OPEN + CLOSE), tokenizer.eot_id])
  forward = jax.jit(lambda params, tokens_BxL: jax.nn.softmax(
      model.apply({"params": params}, tokens_BxL))[..., ids])
  width = 1 + max(map(len, words))
  out = []
  for first in range(0, len(words), batch_size):
    chunk = words[first:first + batch_size]
    tokens_BxL = np.full((batch_size, width), tokenizer.eot_id, np.int32)
    for row, word in zip(tokens_BxL, chunk):
      row[1:1 + len(word)] = tokenizer.encode(word)
    probs_BxLx3 = np.asarray(forward(params, tokens_BxL), np.float64)
    out += [p[:len(w) + 1] for p, w in zip(probs_BxLx3, chunk)]
  return out


def heldout_scores(walk: Walk, words: list[str], probs: list) -> dict:
  """Illegal mass and loss of the model over held-out words, the loss of
  the walk itself beside it (the least any model can reach)."""
  per_word, states, taken_logp = [], {"start": [], "inside": [],
                                      "depth_0": []}, []
  for word, probs_Px3 in zip(words, probs):
    mass_P = illegal_mass(probs_Px3, legal_next(word))
    per_word.append(mass_P.mean())
    depths = prefix_depths(word)
    states["start"].append(mass_P[0])
    states["inside"] += list(mass_P[depths > 0])
    states["depth_0"] += list(mass_P[1:][depths[1:] == 0])
    taken = [0 if c == OPEN else 1 for c in word] + [2]
    taken_logp += list(np.log(probs_Px3[np.arange(len(taken)), taken]))
  tokens = sum(len(w) + 1 for w in words)
  return {
      "illegal_mass": float(np.mean(per_word)),
      "illegal_mass_worst": float(max(max(v) for v in states.values())),
      "illegal_mass_by_state": {k: float(np.mean(v))
                                for k, v in states.items()},
      "nats_per_token": float(-np.sum(taken_logp) / tokens),
      "ideal_nats_per_token": float(
          -sum(map(walk.log_prob, words)) / tokens)}


def sample_scores(walk: Walk, texts: list[str], train_words: set) -> dict:
  """Samples drawn from a document's start: the fractions that are balanced
  words followed by the end, that also keep the walk's limits, and that are
  balanced and never seen in training."""
  words = [t[:-1] if t.endswith(END) and is_balanced(t[:-1]) else None
           for t in texts]
  good = [w for w in words if w is not None]
  return {"samples": len(texts),
          "balanced_fraction": len(good) / len(texts),
          "within_limits_fraction": sum(
              len(w) <= walk.max_len and
              prefix_depths(w).max() <= walk.max_depth for w in good)
          / len(texts),
          "novel_fraction": sum(w not in train_words for w in good)
          / len(texts),
          "unbalanced_examples": [t for t, w in zip(texts, words)
                                  if w is None][:5]}


def evaluate(config, workdir: str, walk: Walk, val_words: list[str],
             train_words: set, num_samples: int, seed: int) -> dict:
  """The newest params of a trained workdir, scored on the held-out words,
  on samples and on greedy completions of "((((..." up to 4x max_depth."""
  import jax
  from model import generate
  from trainer import run as run_lib
  run = run_lib.build(config, workdir, splits=())
  tok, model = run.tokenizer, run.model
  depths = range(1, 4 * walk.max_depth + 1)
  paths = [OPEN * d + CLOSE * d for d in depths]
  key = jax.random.key(seed)
  with run.context():
    step, state = run.restore_latest(params_only=True)
    params = state.params
    probs = next_token_probs(model, params, tok, val_words + paths)
    texts = []
    for first in range(0, num_samples, 1000):
      outs = generate(model, params, [[tok.eot_id]] * min(
          1000, num_samples - first), jax.random.fold_in(key, first),
                      max_new_tokens=model.cfg.seq_len - 1, temperature=1.0,
                      stop_token=tok.eot_id)
      texts += [tok.decode(o[1:]) for o in outs]
    outs = generate(model, params, [[tok.eot_id, *tok.encode(OPEN * d)]
                                    for d in depths], key,
                    max_new_tokens=len(depths) + 2, temperature=0.0,
                    stop_token=tok.eot_id)
  greedy = []
  for d, out, path, path_probs in zip(depths, outs, paths,
                                      probs[len(val_words):]):
    row = score_completion(d, tok.decode(out[1 + d:]))
    row["path_illegal_mass_worst"] = float(
        illegal_mass(path_probs, legal_next(path)).max())
    greedy.append(row)
  correct = [g["correct"] for g in greedy]
  return {"workdir": workdir, "step": step,
          "num_layers": model.cfg.num_layers,
          "params": model.cfg.num_params(),
          **heldout_scores(walk, val_words, probs[:len(val_words)]),
          **sample_scores(walk, texts, train_words),
          "greedy_correct_up_to_depth": (correct + [False]).index(False),
          "greedy_correct_depths": [g["depth"] for g in greedy
                                    if g["correct"]],
          "greedy": greedy}


# ------------------------------------------------------------ the experiment

TARGETS = {"illegal_mass": 1e-3, "balanced_fraction": 0.99, "wall_s": 900}


def run(out: str, walk: Walk, train_docs: int, val_docs: int,
        num_samples: int, seed: int, overrides: dict) -> dict:
  """Prepares the corpus, trains (or resumes) both models under `out`,
  scores them and writes out/results.json and out/parens.png."""
  from trainer import loop
  clock, load_before = time.perf_counter(), os.getloadavg()
  seq_len = model_config("", 1, overrides).model.seq_len
  if seq_len < max(walk.max_len, 8 * walk.max_depth + 1) + 1:
    raise BadInput(
        f"model.seq_len={seq_len} cannot hold the longest document "
        f"({walk.max_len} + the end) or the deepest greedy completion (an "
        f"end, {4 * walk.max_depth} opens, as many closes and the end); "
        "raise it or lower --max-len / --max-depth")
  data, words = prepare_corpus(out, walk, train_docs, val_docs, seed,
                               seq_len)
  train_words = set(words["train"])
  results = {"distribution": dataclasses.asdict(walk),
             "data": {"path": data.path,
                      "train_documents": len(words["train"]),
                      "val_documents": len(words["val"]),
                      "val_documents_packed": len(words["val_packed"]),
                      "train_tokens": data.meta["train_tokens"],
                      "val_tokens": data.meta["val_tokens"],
                      "distinct_train_documents": len(train_words),
                      "prepare_s": time.perf_counter() - clock},
             "targets": TARGETS, "models": {}}
  tokens_per_document = data.meta["train_tokens"] / len(words["train"])
  for name, num_layers in MODELS.items():
    config = model_config(data.path, num_layers, overrides)
    workdir = os.path.join(out, name)
    start = time.perf_counter()
    loop.train(config, workdir)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluate(config, workdir, walk, words["val"], train_words,
                      num_samples, seed)
    t = config.train
    scores.update(
        train_s=train_s, score_s=time.perf_counter() - start,
        sequences_seen=scores["step"] * t.batch_size * config.model.seq_len
        / tokens_per_document,
        config_overrides={"model.num_layers": num_layers, **overrides})
    scores["meets_targets"] = (
        scores["illegal_mass"] <= TARGETS["illegal_mass"] and
        scores["balanced_fraction"] >= TARGETS["balanced_fraction"])
    results["models"][name] = scores
  results["plot"] = write_plot(results, os.path.join(out, "parens.png"))
  results.update(wall_s=time.perf_counter() - clock,
                 load_average_before=load_before,
                 load_average_after=os.getloadavg(), cpus=os.cpu_count())
  disk.write_json(os.path.join(out, "results.json"), results)
  return results


def write_plot(results: dict, path: str) -> str:
  """Greedy completion and the worst illegal mass along "(^d )^d" against
  the depth d, both models, the training depth marked."""
  from matplotlib.figure import Figure  # Agg, no pyplot state
  fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
  correct_ax, mass_ax = fig.subplots(1, 2)
  max_depth = results["distribution"]["max_depth"]
  for offset, (name, scores) in zip((-0.1, 0.1), results["models"].items()):
    depths = np.array([g["depth"] for g in scores["greedy"]])
    label = f"{scores['num_layers']} block{'s' * (scores['num_layers'] > 1)}"
    correct_ax.plot(depths + offset, [g["correct"] for g in scores["greedy"]],
                    "o", label=label)
    mass_ax.semilogy(depths, [max(g["path_illegal_mass_worst"], 1e-9)
                              for g in scores["greedy"]], "o-", label=label)
  for ax in (correct_ax, mass_ax):
    ax.axvline(max_depth, color="gray", ls="--",
               label=f"training depth {max_depth}")
    ax.set_xlabel('prompt depth d (d "(" after the end token)')
    ax.legend()
  correct_ax.set_yticks([0, 1], ["wrong", "correct"])
  correct_ax.set_title('greedy completion is exactly d ")" and the end')
  mass_ax.axhline(TARGETS["illegal_mass"], color="red", ls=":",
                  label="target")
  mass_ax.set_title('worst illegal mass along "(" * d + ")" * d')
  fig.savefig(path)
  return path


def print_table(results: dict) -> None:
  print(f"{'model':>10} {'params':>8} {'steps':>6} {'seqs seen':>10} "
        f"{'train s':>8} {'nats/tok':>9} {'ideal':>6} {'illegal':>9} "
        f"{'worst':>8} {'balanced':>9} {'greedy ok to d':>14}")
  for name, m in results["models"].items():
    print(f"{name:>10} {m['params']:>8,} {m['step']:>6} "
          f"{m['sequences_seen']:>10,.0f} {m['train_s']:>8.0f} "
          f"{m['nats_per_token']:>9.4f} {m['ideal_nats_per_token']:>6.4f} "
          f"{m['illegal_mass']:>9.2e} {m['illegal_mass_worst']:>8.2e} "
          f"{m['balanced_fraction']:>9.2%} "
          f"{m['greedy_correct_up_to_depth']:>14}")


@errors.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m research.parens", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=os.path.join("runs", "parens"),
                      help="output folder (default %(default)s)")
  parser.add_argument("--steps", type=int, default=0,
                      help="training steps of each model (default: "
                      "configs/parens.py's)")
  parser.add_argument("--train-docs", type=int, default=100_000,
                      help="training documents (default %(default)s)")
  parser.add_argument("--val-docs", type=int, default=2000,
                      help="held-out documents (default %(default)s)")
  parser.add_argument("--samples", type=int, default=1000,
                      help="sampled documents per model (default "
                      "%(default)s)")
  parser.add_argument("--max-depth", type=int, default=Walk.max_depth,
                      help="the deepest training document (default "
                      "%(default)s)")
  parser.add_argument("--max-len", type=int, default=Walk.max_len,
                      help="the longest training document (default "
                      "%(default)s)")
  parser.add_argument("--seed", type=int, default=0,
                      help="of the documents and samples (default "
                      "%(default)s)")
  parser.add_argument("--set", action="append", default=[],
                      metavar="FIELD=VALUE", help="override a field of "
                      "configs/parens.py for both models, e.g. "
                      "train.learning_rate=1e-3 (repeatable)")
  args = parser.parse_args(argv)
  for flag in ("steps", "train_docs", "val_docs", "samples", "max_depth",
               "max_len"):
    if getattr(args, flag) < (flag != "steps"):
      raise BadInput(f"--{flag.replace('_', '-')} must be at least "
                     f"{int(flag != 'steps')}")
  if args.max_len < 2:
    raise BadInput("--max-len must be at least 2 (the shortest document, "
                   "\"()\")")
  overrides = dict(parse_override(text, model_config("", 1, {}))
                   for text in args.set)
  if args.steps:
    overrides["train.steps"] = args.steps
  if os.path.isfile(args.out):
    raise BadInput(f"--out {args.out} is a file; give a folder")
  walk = Walk(max_depth=args.max_depth, max_len=args.max_len)
  results = run(args.out, walk, args.train_docs, args.val_docs,
                args.samples, args.seed, overrides)
  print_table(results)
  print(f"\n{results['wall_s']:.0f} s wall on {results['cpus']} CPUs, load "
        f"average {results['load_average_before'][0]:.1f} before and "
        f"{results['load_average_after'][0]:.1f} after; written to "
        f"{args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
