"""Counted n-gram language models (interpolated Kneser-Ney): the baseline
every GPT run here is compared against.

  python -m research.ngram [--source shakespeare] [--orders 1-8] \
      [--discounting modified|plain] [--out DIR]

Each model trains on the train split a GPT of `data.source` trains on (the
same preparation: tokenizer and holdout; by default Shakespeare by character
with Hamlet and The Tempest held out) and is scored on the whole validation
split, every token predicted from the ones before it. That is the GPT's
validation text: its eval scores the same tokens but the first one and the
last, incomplete window (126 of 272,383 at seq_len 128). Scores are nats per
token and bits per byte (nats / the UTF-8 bytes of the scored text / ln 2;
end-of-text is scored like any token and counts 0 bytes), as the GPT's.

Token model (over the prepared token ids: characters for `char`): modified
Kneser-Ney, interpolated (Chen and Goodman 1999, as KenLM builds it, without
its special case for n-grams at the start of the text):
  P_k(w | h) = (c(hw) - D_k(c(hw))) / c(h.) + gamma_k(h) P_k-1(w | h'),
  gamma_k(h) = (D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)) / c(h.),
h' being h without its first token and P_0(w) = 1 / vocabulary size, over
every id, those never seen included. The highest order counts occurrences;
the lower ones count continuations (the distinct tokens seen before an
n-gram). A context without counts (never seen, or cut short by the start of
the text) leaves its lower order unchanged. The discounts of each order come
from its counts of counts n1..n4: Y = n1 / (n1 + 2 n2),
Dc = c - (c + 1) Y n(c+1) / n(c); where a count of counts is 0 or a Dc is not
within (0, c) (too little text), KenLM's fallback 0.5, 1, 1.5. With
`--discounting plain`, plain interpolated Kneser-Ney: one discount per order
for every count, D = n1 / (n1 + 2 n2) (0.5 where n1 or n2 is 0). Either way
every conditional distribution sums to 1 over the vocabulary.

Word model: each document's text is split (WORD) into runs of word
characters, runs of whitespace and single other characters, which spell it
exactly; end-of-text follows each document, as in the token stream. The
vocabulary: every token seen at least MIN_WORD_COUNT times in training,
end-of-text, and <unk>, which stands for every other training token; the
same Kneser-Ney runs over these ids. A token w outside the vocabulary has
P(<unk> | h) S(w) / Z. S, its spelling, is a Kneser-Ney byte 5-gram
(SPELL_ORDER) over the distinct training tokens, each one's UTF-8 bytes
after four end marks (so that no context reaches into another token; the
marks themselves are counted too, which wastes a little of S on the empty
spelling) and ended by the next mark; Z = 1 - S(empty) - S summed over the
vocabulary, so the tokens outside it share exactly P(<unk> | h) (S and the
letter models below always use modified discounts). The model
sums to 1 over token sequences; over texts it is deficient (a sequence with
two word tokens side by side spells a text that splits otherwise), so its
bits are a true code length, a little above what a normalized model needs.

Letters (the classic account of how ChatGPT works): the training text in
lowercase letters a-z and single spaces, one Kneser-Ney model per order 1-5;
the order-2 table P(next | letter) as a heatmap, and text sampled from each
order (seeded).

DIR (default runs/ngram) gets results.json, letter_bigrams.png and
generated_words.txt. Bad input stops with one line `error: ...`, exit status
2, and nothing written.
"""

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
import time

import numpy as np

from data import prepare
import errors
from errors import BadInput

FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's, for D1, D2, D3+
MAX_ORDER = 16
WORD = re.compile(r"\w+|\s+|[^\w\s]")
MIN_WORD_COUNT = 2
UNK, EOT = 0, 1  # the word model's first ids; words follow
SPELL_ORDER = 5
SPELL_MARK = 256  # around spellings (bytes are 0-255)
LETTERS = " abcdefghijklmnopqrstuvwxyz"
LETTER_ORDERS = (1, 2, 3, 4, 5)


def modified_discounts(counts: np.ndarray) -> tuple[tuple, bool]:
  """(D1, D2, D3+) from the counts of counts, and whether the fallback
  replaced them."""
  n = [int(np.count_nonzero(counts == c)) for c in (1, 2, 3, 4)]
  if min(n) > 0:
    y = n[0] / (n[0] + 2 * n[1])
    d = tuple(c - (c + 1) * y * n[c] / n[c - 1] for c in (1, 2, 3))
    if all(0 < dc < c for c, dc in zip((1, 2, 3), d)):
      return d, False
  return FALLBACK_DISCOUNTS, True


def plain_discounts(counts: np.ndarray) -> tuple[tuple, bool]:
  """One discount for every count, D = n1 / (n1 + 2 n2) (Ney, Essen and
  Kneser 1994), or 0.5 where n1 or n2 is 0; and whether it fell back."""
  n1, n2 = (int(np.count_nonzero(counts == c)) for c in (1, 2))
  if n1 and n2:
    return (n1 / (n1 + 2 * n2),) * 3, False
  return (0.5,) * 3, True


DISCOUNTING = {"modified": modified_discounts, "plain": plain_discounts}


@dataclasses.dataclass(frozen=True)
class Level:
  """The n-grams of one order. A gram's key is (the id of its context, an
  (n-1)-gram of the order below) * vocab_size + its last token; keys are
  sorted and a gram's id is its index. alpha: each gram's discounted
  probability; gamma: each context's weight on the order below (1 for a
  context without counts)."""
  keys: np.ndarray  # int64, [grams]
  alpha: np.ndarray  # float64, [grams]
  gamma: np.ndarray  # float64, [contexts]
  discounts: tuple
  fallback: bool


def _level(keys, counts, num_contexts: int, vocab_size: int,
           discounting: str) -> Level:
  discounts, fallback = DISCOUNTING[discounting](counts)
  discount = np.select([counts == 1, counts == 2, counts >= 3], discounts, 0.)
  context = keys // vocab_size
  total = np.bincount(context, counts, num_contexts)
  discounted = np.bincount(context, discount, num_contexts)
  seen = total > 0
  safe_total = np.where(seen, total, 1.0)
  return Level(keys, (counts - discount) / safe_total[context],
               np.where(seen, discounted / safe_total, 1.0), discounts,
               fallback)


def _count(tokens: np.ndarray, max_order: int, vocab_size: int):
  """Per order n: the sorted keys of the n-grams of `tokens`, their counts
  and their continuation counts (the last order has none)."""
  keys, counts, continuations = [], [], []
  ids = np.zeros(len(tokens), np.int64)  # the empty context of every token
  for n in range(1, max_order + 1):
    # The n-grams ending at tokens[n - 1:], after their (n-1)-gram contexts.
    key = ids[:len(tokens) - n + 1] * vocab_size + tokens[n - 1:]
    unique, first, gram_ids, count = np.unique(
        key, return_index=True, return_inverse=True, return_counts=True)
    if n > 1:  # n-gram i ends with the (n-1)-gram ids[i + 1]
      continuations.append(np.bincount(ids[first + 1],
                                       minlength=len(keys[-1])))
    keys.append(unique)
    counts.append(count)
    ids = gram_ids
  return keys, counts, continuations


class KneserNey:
  """An interpolated modified Kneser-Ney model of order len(levels) (see
  the module's docstring)."""

  def __init__(self, vocab_size: int, levels: list[Level]):
    self.vocab_size, self.levels = vocab_size, levels
    self.order = len(levels)

  @classmethod
  def fit(cls, tokens, order: int, vocab_size: int,
          discounting: str = "modified") -> "KneserNey":
    return fit_orders(tokens, (order,), vocab_size, discounting)[order]

  def probs(self, tokens) -> np.ndarray:
    """P(tokens[..., i] | the up to order - 1 tokens before it in its row),
    for every i."""
    tokens = _checked(tokens, self.vocab_size)
    p = np.full(tokens.shape, 1 / self.vocab_size)
    context = np.zeros(tokens.shape, np.int64)  # order 1's: the empty one
    for level in self.levels:
      known = context >= 0
      key = context * self.vocab_size + tokens
      gram = np.searchsorted(level.keys, key)
      found = known & (gram < len(level.keys))
      found[found] = level.keys[gram[found]] == key[found]
      alpha, gamma = np.zeros(tokens.shape), np.ones(tokens.shape)
      alpha[found] = level.alpha[gram[found]]
      gamma[known] = level.gamma[context[known]]
      p = alpha + gamma * p
      context = np.full_like(gram, -1)  # the next order's: this one's gram
      context[..., 1:] = np.where(found, gram, -1)[..., :-1]
    return p

  def log_probs(self, tokens) -> np.ndarray:
    return np.log(self.probs(tokens))

  def distribution(self, context) -> np.ndarray:
    """P(w | context) for every w in the vocabulary."""
    context = list(context)[max(0, len(context) - self.order + 1):]
    rows = np.empty((self.vocab_size, len(context) + 1), np.int64)
    rows[:, :-1] = context
    rows[:, -1] = np.arange(self.vocab_size)
    return self.probs(rows)[:, -1]

  def sample(self, length: int, rng: np.random.Generator,
             context=()) -> np.ndarray:
    """`length` tokens drawn one by one after `context`."""
    out = list(context)
    for _ in range(length):
      out.append(rng.choice(self.vocab_size, p=self.distribution(out)))
    return np.array(out[len(context):], np.int64)


def _checked(tokens, vocab_size: int) -> np.ndarray:
  tokens = np.asarray(tokens, np.int64)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise BadInput(f"token ids must lie in [0, {vocab_size})")
  return tokens


def fit_orders(tokens, orders, vocab_size: int,
               discounting: str = "modified") -> dict[int, KneserNey]:
  """A model of each order in `orders`, counted in one pass: all share the
  lower orders (continuation counts) and differ in their highest."""
  tokens = _checked(tokens, vocab_size)
  if len(tokens) * vocab_size >= 2**62:
    raise BadInput(f"{len(tokens):,} tokens of {vocab_size:,} ids are too "
                     "many for 64-bit n-gram keys")
  keys, counts, continuations = _count(tokens, max(orders), vocab_size)
  contexts = [1] + [len(k) for k in keys[:-1]]
  lower = [_level(k, c, m, vocab_size, discounting)
           for k, c, m in zip(keys, continuations, contexts)]
  return {n: KneserNey(vocab_size, lower[:n - 1] + [
      _level(keys[n - 1], counts[n - 1], contexts[n - 1], vocab_size,
             discounting)]) for n in orders}


def bits_per_byte(log_probs: np.ndarray, num_bytes: int) -> float:
  return float(-log_probs.sum() / num_bytes / math.log(2))


# ---------------------------------------------------------------- words

def _spelled(tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """The spelling model's stream of `tokens`: SPELL_ORDER - 1 end marks
  before each token's UTF-8 bytes and after the last token, so that no
  context reaches into another token; and, per position, the token whose
  spelling it belongs to (its bytes and the first mark after them), or -1."""
  pad = SPELL_ORDER - 1
  encoded = [t.encode("utf-8") for t in tokens]
  lengths = np.array([len(e) for e in encoded], np.int64)
  data = np.frombuffer(b"".join(encoded), np.uint8).astype(np.int64)
  marks_at = np.repeat(np.append(np.cumsum(lengths) - lengths, len(data)),
                       pad)
  mark_owners = np.full((len(tokens) + 1, pad), -1)
  mark_owners[1:, 0] = np.arange(len(tokens))
  owners = np.repeat(np.arange(len(tokens)), lengths)
  return (np.insert(data, marks_at, SPELL_MARK),
          np.insert(owners, marks_at, mark_owners.ravel()))


def spelling_log_probs(spelling: KneserNey, tokens: list[str]) -> np.ndarray:
  """ln S(w) of each token: its bytes and end mark, after end marks."""
  stream, owners = _spelled(tokens)
  log_probs = spelling.log_probs(stream)
  scored = owners >= 0
  return np.bincount(owners[scored], log_probs[scored], len(tokens))


@dataclasses.dataclass(frozen=True)
class Words:
  """The word model's closed vocabulary (ids: UNK, EOT, then the words) and
  its spelling model of the tokens outside it."""
  ids: dict
  spelling: KneserNey
  log_z: float  # ln of the spelling model's mass outside the vocabulary

  @property
  def vocab_size(self) -> int:
    return len(self.ids) + 2

  @classmethod
  def fit(cls, texts: list[str]) -> "Words":
    counts = collections.Counter(w for t in texts for w in WORD.findall(t))
    vocab = sorted(w for w, c in counts.items() if c >= MIN_WORD_COUNT)
    ids = {w: i for i, w in enumerate(vocab, EOT + 1)}
    spelling = KneserNey.fit(_spelled(list(counts))[0], SPELL_ORDER,
                             SPELL_MARK + 1)
    inside = np.exp(spelling_log_probs(spelling, vocab)).sum()
    empty = spelling.distribution([SPELL_MARK] * (SPELL_ORDER - 1))[SPELL_MARK]
    return cls(ids, spelling, math.log(1 - empty - inside))

  def encode(self, texts: list[str]) -> tuple[np.ndarray, list[str]]:
    """The ids of the texts' tokens, EOT between texts; and each UNK's
    token."""
    ids, unknown = [], []
    for i, text in enumerate(texts):
      if i:
        ids.append(EOT)
      for w in WORD.findall(text):
        ids.append(self.ids.get(w, UNK))
        if ids[-1] == UNK:
          unknown.append(w)
    return np.array(ids, np.int64), unknown

  def log_probs(self, ngram: KneserNey, texts: list[str]) -> np.ndarray:
    """ln P of each token of `texts` (EOT between them)."""
    ids, unknown = self.encode(texts)
    log_probs = ngram.log_probs(ids)
    log_probs[ids == UNK] += (spelling_log_probs(self.spelling, unknown) -
                              self.log_z)
    return log_probs


def split_documents(tokens: np.ndarray, tokenizer) -> list[str]:
  """The texts between end-of-text tokens (the one after the last EOT is
  empty in a prepared split)."""
  pieces = np.split(tokens, np.flatnonzero(tokens == tokenizer.eot_id))
  return [tokenizer.decode(pieces[0])] + [tokenizer.decode(p[1:])
                                          for p in pieces[1:]]


# ---------------------------------------------------------------- letters

def letter_ids(text: str) -> np.ndarray:
  """`text` as ids of LETTERS: lowercase a-z, anything else a space, runs
  of spaces one."""
  letters = re.sub(r"[^a-z]+", " ", text.lower()).encode("ascii")
  codes = np.frombuffer(letters, np.uint8).astype(np.int64)
  return np.where(codes == ord(" "), 0, codes - ord("a") + 1)


def generate_letters(model: KneserNey, seed: int, examples: int = 3,
                     length: int = 60) -> list[str]:
  """Text drawn from a letter model after a space, seeded by (seed,
  order)."""
  rng = np.random.default_rng([seed, model.order])
  return [" ".join("".join(LETTERS[i] for i in model.sample(
      length, rng, context=[0])).split()) for _ in range(examples)]


def plot_letter_bigrams(model: KneserNey, path: str) -> np.ndarray:
  """The order-2 table P(next | letter) as a heatmap; returns the table."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import colors
  from matplotlib import pyplot as plt
  table = np.stack([model.distribution([i]) for i in range(len(LETTERS))])
  labels = ["\u2423"] + list(LETTERS[1:])  # a visible space
  fig, ax = plt.subplots(figsize=(8.5, 7.5))
  image = ax.imshow(table, cmap="magma", norm=colors.LogNorm(1e-4, 1))
  ax.set_xticks(range(len(LETTERS)), labels)
  ax.set_yticks(range(len(LETTERS)), labels)
  ax.tick_params(top=True, labeltop=True)
  ax.set_xlabel("next letter")
  ax.set_ylabel("letter")
  ax.set_title("Letter 2-gram model (Kneser-Ney): P(next letter | letter)")
  fig.colorbar(image, ax=ax, label="probability (log scale)", shrink=0.8)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return table


# ---------------------------------------------------------------- command

def parse_orders(text: str) -> tuple[int, ...]:
  """'1-8', '3' or '1,2,5'."""
  try:
    orders = set()
    for part in text.split(","):
      low, _, high = part.partition("-")
      orders.update(range(int(low), int(high or low) + 1))
  except ValueError:
    orders = set()
  if not orders or min(orders) < 1 or max(orders) > MAX_ORDER:
    raise BadInput(f"--orders {text!r}: give orders within 1-{MAX_ORDER}, "
                     "like 1-8, 3 or 1,2,5")
  return tuple(sorted(orders))


def run(source: str, tokenizer: str, holdout: tuple, cache_dir: str,
        orders: tuple, discounting: str, out: str, seed: int) -> dict:
  clock = time.perf_counter()
  data = prepare.prepare(source, tokenizer, holdout, cache_dir)
  tok = data.tokenizer
  train = np.asarray(data.tokens("train")[:], np.int64)
  val = np.asarray(data.tokens("val")[:], np.int64)
  val_bytes = int(tok.token_bytes()[val].sum())
  results = {"source": source, "data": data.path, "tokenizer": tok.kind,
             "vocab_size": tok.vocab_size, "train_tokens": len(train),
             "val_tokens": len(val), "val_bytes": val_bytes,
             "discounting": discounting, "seed": seed}

  start = time.perf_counter()
  models = fit_orders(train, orders, tok.vocab_size, discounting)
  results["token_model"] = {
      "fit_s": time.perf_counter() - start,
      "rows": [_row(n, m, lambda: m.log_probs(val), val_bytes)
               for n, m in models.items()]}

  start = time.perf_counter()
  train_texts = split_documents(train, tok)
  val_texts = split_documents(val, tok)
  words = Words.fit(train_texts)
  word_ids, _ = words.encode(train_texts)
  word_models = fit_orders(word_ids, orders, words.vocab_size, discounting)
  val_ids, unknown = words.encode(val_texts)
  word_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
  results["word_model"] = {
      "fit_s": time.perf_counter() - start, "vocab_size": words.vocab_size,
      "train_tokens": len(word_ids), "val_tokens": len(val_ids),
      "val_unknown_tokens": len(unknown), "val_bytes": word_bytes,
      "spelling_mass_outside_vocab": math.exp(words.log_z),
      "rows": [_row(n, m, lambda: words.log_probs(m, val_texts), word_bytes)
               for n, m in word_models.items()]}

  letter_models = fit_orders(letter_ids(" ".join(train_texts)),
                             LETTER_ORDERS, len(LETTERS))
  os.makedirs(out, exist_ok=True)
  table = plot_letter_bigrams(letter_models[2],
                              os.path.join(out, "letter_bigrams.png"))
  generated = {n: generate_letters(m, seed) for n, m in letter_models.items()}
  with open(os.path.join(out, "generated_words.txt"), "w") as f:
    for n, lines in generated.items():
      f.write(f"letter {n}-gram model (seed {seed}):\n")
      f.writelines(f"  {line}\n" for line in lines)
  results["letters"] = {"alphabet": LETTERS, "bigram_table": table.tolist(),
                        "generated": generated}
  results["total_s"] = time.perf_counter() - clock
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def _row(order: int, model: KneserNey, score, num_bytes: int) -> dict:
  """A model's line of results.json; `score` gives its ln P per token."""
  start = time.perf_counter()
  lp = score()
  top = model.levels[-1]
  return {"order": order, "nats_per_token": float(-lp.mean()),
          "bits_per_byte": bits_per_byte(lp, num_bytes),
          "grams": len(top.keys), "discounts": list(top.discounts),
          "fallback_discounts": top.fallback,
          "lower_discounts": [list(level.discounts)
                              for level in model.levels[:-1]],
          "score_s": time.perf_counter() - start}


def print_table(results: dict) -> None:
  kind = results["tokenizer"]
  tokens = {r["order"]: r for r in results["token_model"]["rows"]}
  words = {r["order"]: r for r in results["word_model"]["rows"]}
  print(f"{'order':>5} {kind + ' nats/token':>16} {kind + ' bits/byte':>15} "
        f"{'word bits/byte':>15}")
  for n in tokens:
    print(f"{n:>5} {tokens[n]['nats_per_token']:>16.4f} "
          f"{tokens[n]['bits_per_byte']:>15.4f} "
          f"{words[n]['bits_per_byte']:>15.4f}")


@errors.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m research.ngram", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", default="shakespeare",
                      help="as config.data.source (default %(default)s)")
  parser.add_argument("--tokenizer", default="char",
                      help="for raw text sources (default %(default)s)")
  parser.add_argument("--holdout", nargs="*", default=["hamlet", "tempest"],
                      help="documents held out, for raw text sources "
                      "(default %(default)s; none: by a hash)")
  parser.add_argument("--cache-dir", default="",
                      help="as config.data.cache_dir (default: "
                      "$GPT_JAX_CACHE or ~/.cache/gpt_jax)")
  parser.add_argument("--orders", default="1-8",
                      help="n-gram orders (default %(default)s)")
  parser.add_argument("--discounting", choices=sorted(DISCOUNTING),
                      default="modified",
                      help="of the token and word models: modified Kneser-"
                      "Ney's three discounts per order, or plain Kneser-"
                      "Ney's one (default %(default)s)")
  parser.add_argument("--out", default=os.path.join("runs", "ngram"),
                      help="output folder (default %(default)s)")
  parser.add_argument("--seed", type=int, default=0,
                      help="of the generated letters (default %(default)s)")
  args = parser.parse_args(argv)
  orders = parse_orders(args.orders)
  if os.path.isfile(args.out):
    raise BadInput(f"--out {args.out} is a file; give a folder")
  try:
    results = run(args.source, args.tokenizer, tuple(args.holdout),
                  args.cache_dir, orders, args.discounting, args.out,
                  args.seed)
  except OSError as e:  # a folder or file that cannot be read or written
    raise BadInput(str(e)) from e
  print_table(results)
  print(f"\n{results['val_tokens']:,} validation tokens, "
        f"{results['val_bytes']:,} bytes; {results['total_s']:.1f} s; "
        f"written to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
