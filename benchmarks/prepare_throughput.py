"""Corpus preparation throughput: MB/s of UTF-8 input, byte and BPE, 1 and 2
worker processes.

  python -m benchmarks.prepare_throughput               # 128 MB, 3 repeats
  python -m benchmarks.prepare_throughput --mb=512 --workers=1,2,4

Generates a corpus (JSON Lines files of documents of Zipf-distributed words,
some with multi-byte characters), prepares it once per tokenizer (the BPE is
trained there, on a sample), then times re-tokenizing everything with that
tokenizer into the same directory (its task records removed): reading,
splitting, tokenizing and writing shards. Rounds alternate the worker counts;
reports the median of the rounds and their range: on a shared machine the
numbers are noisy.
"""

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from data import prepare, work


def make_corpus(path: str, megabytes: int, seed: int = 0) -> int:
  """Files of ~8 MB (1e6 bytes), documents of 50-2000 words; returns the
  bytes written."""
  rng = np.random.default_rng(seed)
  letters = list("abcdefghijklmnopqrstuvwxyz") + ["é", "ø", "ß", "—", "日", "🙂"]
  weights = np.array([8] * 26 + [1] * 6, float)
  words = ["".join(rng.choice(letters, rng.integers(1, 9),
                              p=weights / weights.sum())) for _ in range(20000)]
  zipf = 1 / np.arange(1, len(words) + 1)
  zipf /= zipf.sum()
  os.makedirs(path, exist_ok=True)
  total, index = 0, 0
  while total < megabytes * 1e6:
    lines = []
    size = 0
    while size < 8e6:
      ids = rng.choice(len(words), rng.integers(50, 2000), p=zipf)
      text = " ".join(words[i] for i in ids) + ".\n"
      lines.append(json.dumps({"text": text}, ensure_ascii=False) + "\n")
      size += len(lines[-1].encode("utf-8"))
    with open(os.path.join(path, f"part-{index:04d}.jsonl"), "w",
              encoding="utf-8") as f:
      f.writelines(lines)
    total, index = total + size, index + 1
  return total


def time_run(corpus: str, output: str, options: prepare.Options) -> float:
  """Seconds to re-tokenize everything (the tokenizer of `output` kept)."""
  shutil.rmtree(os.path.join(output, work.SHARDS))
  t = time.perf_counter()
  prepare.build([corpus], output, options)
  return time.perf_counter() - t


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mb", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--vocab-size", type=int, default=8192)
  parser.add_argument("--bpe-sample-mb", type=int, default=32)
  parser.add_argument("--dir", default="", help="work folder (default: temp)")
  args = parser.parse_args()
  root = args.dir or tempfile.mkdtemp(prefix="prepare_throughput_")
  corpus = os.path.join(root, "corpus")
  t = time.perf_counter()
  size = make_corpus(corpus, args.mb)
  print(f"corpus: {size / 1e6:.0f} MB in {corpus} "
        f"({time.perf_counter() - t:.0f} s to generate); {os.cpu_count()} "
        "CPU cores, maybe shared: medians of "
        f"{args.repeats}, range in brackets")
  results = []
  for kind in ("byte", "bpe"):
    output = os.path.join(root, kind)
    base = prepare.Options(tokenizer=kind, vocab_size=args.vocab_size,
                           bpe_sample_bytes=args.bpe_sample_mb * 2**20,
                           workers=1)
    t = time.perf_counter()
    first = prepare.build([corpus], output, base)
    tokens = first.meta["train_tokens"] + first.meta["val_tokens"]
    print(f"{kind}: first run {time.perf_counter() - t:.1f} s (fitting "
          f"included), {tokens:,} tokens, vocabulary "
          f"{first.meta['vocab_size']:,}")
    counts = [int(w) for w in args.workers.split(",")]
    rates = {w: [] for w in counts}
    for _ in range(args.repeats):  # rounds alternate, so noise hits all alike
      for w in counts:
        seconds = time_run(corpus, output, dataclasses.replace(base, workers=w))
        rates[w].append(size / 1e6 / seconds)
    for w in counts:
      results.append({"tokenizer": kind, "workers": w,
                      "mb_per_s": statistics.median(rates[w]),
                      "min": min(rates[w]), "max": max(rates[w])})
      print(f"  {w} worker(s): {results[-1]['mb_per_s']:6.1f} MB/s "
            f"[{min(rates[w]):.1f}-{max(rates[w]):.1f}]")
    print(f"  scaling {counts[0]} -> {counts[-1]} workers: "
          f"{results[-1]['mb_per_s'] / results[-len(counts)]['mb_per_s']:.2f}x")
  print(json.dumps(results))
  if not args.dir:
    shutil.rmtree(root)


if __name__ == "__main__":
  main()
