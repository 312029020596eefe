"""The language and the corpus of research.parens (its docstring has the
data and the metrics): the walk that draws the documents, which tokens may
follow a prefix, and the documents packed and prepared for training."""

import collections
import dataclasses
import json
import os

import numpy as np

from data import disk, prepare
from errors import BadInput
from data.tokenizers import CHAR_EOT

OPEN, CLOSE, END = "(", ")", CHAR_EOT  # END: how the char tokenizer spells EOT


# ------------------------------------------------------------------ the data

@dataclasses.dataclass(frozen=True)
class Walk:
  """The documents: a random walk on the depth. A document opens with "(";
  inside (depth > 0) it opens with probability `open_prob` and closes
  otherwise; back at depth 0 it ends with probability `end_prob` and opens
  again otherwise. Opening stops at `max_depth` and wherever the closes it
  would need no longer fit in `max_len` characters, where the document then
  closes (or ends). With open_prob < 1/2 < end_prob the likeliest
  continuation of "((((" is to close every "(" and end, as a greedy
  completion should; uniformly drawn Dyck words would instead continue "("
  with "(" (3 times in 4): their greedy completion never closes."""
  open_prob: float = 0.4
  end_prob: float = 0.6
  max_depth: int = 8
  max_len: int = 64

  def next_probs(self, length, depth) -> np.ndarray:
    """P(open, close, end) of the next character of a document that has
    `length` characters so far and is at `depth` (arrays): [..., 3]."""
    length, depth = np.asarray(length), np.asarray(depth)
    start = length == 0
    inside = depth > 0
    room = length + depth + 2 <= self.max_len  # for "(" and its ")"s
    p_open = np.where(start, 1.0, np.where(
        inside, np.where(room & (depth < self.max_depth), self.open_prob, 0),
        np.where(room, 1 - self.end_prob, 0)))
    p_end = np.where(start | inside, 0.0, 1 - p_open)
    return np.stack([p_open, 1 - p_open - p_end, p_end], axis=-1)

  def sample(self, count: int, seed: int) -> list[str]:
    """`count` documents, all walks drawn side by side."""
    rng = np.random.default_rng(seed)
    chars_NxL = np.zeros((count, self.max_len), np.uint8)
    length, depth = np.zeros(count, int), np.zeros(count, int)
    live = np.arange(count)
    while live.size:
      cum = np.cumsum(self.next_probs(length[live], depth[live]), axis=-1)
      token = (rng.random(live.size)[:, None] >= cum[:, :2]).sum(-1)
      ended = token == 2
      move = live[~ended]
      chars_NxL[move, length[move]] = token[~ended]
      depth[move] += 1 - 2 * token[~ended]
      length[move] += 1
      live = move
    table = np.frombuffer((OPEN + CLOSE).encode(), np.uint8)
    return [table[row[:n]].tobytes().decode()
            for row, n in zip(chars_NxL, length)]

  def log_prob(self, word: str) -> float:
    """ln P(word, then the end) under the walk."""
    probs = self.next_probs(np.arange(len(word) + 1), prefix_depths(word))
    taken = [0 if c == OPEN else 1 for c in word] + [2]
    return float(np.log(probs[np.arange(len(taken)), taken]).sum())


def prefix_depths(word: str) -> np.ndarray:
  """The depth after each prefix of `word`, the empty one first: [n + 1]."""
  steps = [1 if c == OPEN else -1 for c in word]
  return np.concatenate([[0], np.cumsum(steps, dtype=int)])


def is_balanced(word: str) -> bool:
  """A non-empty word of "(" and ")" that never closes more than it opened
  and ends at depth 0."""
  if not word or set(word) - {OPEN, CLOSE}:
    return False
  depths = prefix_depths(word)
  return depths.min() == 0 and depths[-1] == 0


def legal_next(word: str) -> np.ndarray:
  """Which of (open, close, end) may follow each prefix of a balanced
  `word` in the language of non-empty balanced words: [n + 1, 3] bools.
  At the start only "("; inside (depth > 0) "(" or ")"; at depth 0 after a
  complete word "(" or the end. Everything else is illegal: ")" at depth 0,
  the end inside or at the start, and any other token."""
  depths = prefix_depths(word)
  started = np.arange(len(word) + 1) > 0
  return np.stack([np.ones_like(started), depths > 0,
                   (depths == 0) & started], axis=-1)


def illegal_mass(probs_Px3: np.ndarray, legal_Px3: np.ndarray) -> np.ndarray:
  """Per position, the probability not on a legal next token: 1 minus the
  legal ones' share of (open, close, end), columns of a distribution over
  the whole vocabulary (so mass on any other token counts as illegal)."""
  return 1.0 - np.where(legal_Px3, probs_Px3, 0.0).sum(-1)


def score_completion(depth: int, continuation: str) -> dict:
  """A greedy continuation of depth `depth`'s "((((...": correct if it is
  exactly `depth` closes and the end."""
  closes = len(continuation) - len(continuation.lstrip(CLOSE))
  return {"depth": depth, "continuation": continuation,
          "closes": closes, "correct": continuation == CLOSE * depth + END}


# ---------------------------------------------------------------- the corpus

def pack(words: list[str], seq_len: int) -> list[str]:
  """Words in the order to write them, one per document (each followed by
  the end token, as data.prepare packs them), so that every training window
  starts at a document: the end tokens fall exactly on the positions
  seq_len, 2 seq_len, ... that open windows 1, 2, ... (window 0 opens with
  the first word). No document is then cut by a window edge, every target in
  a window is a legal continuation of what the window shows, and a window
  opens with the end token just as scoring and sampling prompt the model.

  A word costs len + 1 tokens (its end); the first window holds seq_len + 1,
  the others seq_len. Words are taken in order while they fit. The first
  that does not (or would leave a gap of 1, 2 or 4, which no word fills:
  costs are odd and at least 3) is put aside in a pool, and the gap is
  filled from the pool, the longest word that leaves a fillable gap first,
  drawing further words into the pool while none does. The next window
  opens with the next word in order. The words that open a window (those
  that scoring and sampling reproduce) are thus drawn exactly as the walk
  draws them, as is every word that starts early enough to fit whatever it
  is; only the fillers at a window's end lean short. Words left in the pool
  at the end are not used."""
  stream, pool = iter(words), collections.defaultdict(list)  # cost -> words
  out, capacity = [], seq_len + 1

  def fits(gap: int, cost: int) -> bool:
    return gap - cost >= 0 and gap - cost not in (1, 2, 4)

  while True:
    gap, chosen = capacity, []
    for word in stream:
      if not fits(gap, len(word) + 1):
        pool[len(word) + 1].append(word)
        break
      chosen.append(word)
      gap -= len(word) + 1
      if not gap:
        break
    while gap:
      cost = max((c for c, pooled in pool.items() if pooled and fits(gap, c)),
                 default=0)
      if cost:
        chosen.append(pool[cost].pop())
        gap -= cost
        continue
      word = next(stream, None)
      if word is None:  # the last window cannot be filled: dropped
        return out
      pool[len(word) + 1].append(word)
    out += chosen
    capacity = seq_len


def prepare_corpus(out: str, walk: Walk, train_docs: int, val_docs: int,
                   seed: int, seq_len: int) -> tuple[prepare.Prepared, dict]:
  """Documents drawn from `walk` (train: seed, held out: seed + 1), packed
  into windows of `seq_len` (`pack`), as out/documents/{train,val}.jsonl,
  prepared with the char tokenizer into out/data, the val file held out.
  Files already holding the same documents are left alone, so a rerun
  reuses the preparation. Returns the prepared data and the words: the
  train words as packed (those trained on), the val words as drawn (to
  score; packing leans its fillers short) and as packed."""
  drawn = {"train": walk.sample(train_docs, seed),
           "val": walk.sample(val_docs, seed + 1)}
  packed = {split: pack(texts, seq_len) for split, texts in drawn.items()}
  documents = os.path.join(out, "documents")
  os.makedirs(documents, exist_ok=True)
  for split, texts in packed.items():
    _write_if_changed(os.path.join(documents, f"{split}.jsonl"), "".join(
        json.dumps({"text": t}) + "\n" for t in texts))
  data = prepare.build([documents], os.path.join(out, "data"), prepare.Options(
      tokenizer="char", holdout=("val",), seq_len=seq_len))
  for split in ("train", "val"):
    tokens = np.asarray(data.tokens(split))
    if not np.all(tokens[seq_len::seq_len] == data.tokenizer.eot_id):
      raise BadInput(f"{data.path}: the {split} windows do not start at "
                        "documents (the preparation reordered them); delete "
                        f"{out} and run again")
  return data, {"train": packed["train"], "val": drawn["val"],
                "val_packed": packed["val"]}


def _write_if_changed(path: str, text: str) -> None:
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
  with disk.replacing(path) as f:
    f.write(text)
