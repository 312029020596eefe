"""research.ngram: every Kneser-Ney distribution sums to 1, the models match
hand computations and a reference written from the definition, bits per
byte match a direct count, generation is seeded, and the CLI writes what it
documents or stops with one line."""

import collections
import json
import math
import os

import numpy as np
import pytest
from matplotlib import image

from data import tokenizers
from research import ngram

A, B, C, D = range(4)


def markov_tokens(length, vocab_size, seed):
  """Tokens with some structure: each mostly follows from the one before."""
  rng = np.random.default_rng(seed)
  table = rng.dirichlet(np.full(vocab_size, 0.3), vocab_size)
  tokens = [0]
  for _ in range(length - 1):
    tokens.append(rng.choice(vocab_size, p=table[tokens[-1]]))
  return np.array(tokens)


@pytest.mark.parametrize("length", [12, 3000])
def test_every_distribution_sums_to_one(length):
  # Ids 0-6 occur; 7 only last (a context never followed); 8 never.
  corpus = np.append(markov_tokens(length - 1, 7, seed=length), 7)
  rng = np.random.default_rng(0)
  models = ngram.fit_orders(corpus, (1, 2, 3, 4, 5), 9)
  for order, model in models.items():
    seen = [corpus[i:i + order - 1] for i in rng.integers(0, length - 5, 5)]
    unseen = [rng.integers(0, 9, order - 1) for _ in range(5)]
    for context in seen + unseen + [[], [8], [7], corpus[-4:], [8, 1]]:
      p = model.distribution(context)
      assert abs(p.sum() - 1) < 1e-9, (order, context)
      assert p.min() > 0, (order, context)


def test_modified_discounts_by_hand():
  # n1..n4 = 3, 2, 1, 1: Y = 3 / (3 + 2 * 2) = 3/7,
  # D1 = 1 - 2 Y n2/n1 = 1 - 2 (3/7)(2/3) = 3/7,
  # D2 = 2 - 3 Y n3/n2 = 2 - 3 (3/7)(1/2) = 19/14,
  # D3+ = 3 - 4 Y n4/n3 = 3 - 4 (3/7) = 9/7.
  discounts, fallback = ngram.modified_discounts(
      np.array([1, 1, 1, 2, 2, 3, 4, 7]))
  assert not fallback
  np.testing.assert_allclose(discounts, [3 / 7, 19 / 14, 9 / 7], rtol=1e-12)
  # No count of 3: the estimate is undefined.
  assert ngram.modified_discounts(np.array([1, 1, 2, 4])) == (
      ngram.FALLBACK_DISCOUNTS, True)


def test_unigram_with_modified_discounts_by_hand():
  # Counts 1, 1, 1, 2, 2, 3, 4 of ids 0-6, id 7 unseen: the discounts above
  # (3/7, 19/14, 9/7), N = 14 tokens, discounted mass
  # 3 (3/7) + 2 (19/14) + 2 (9/7) = 46/7, gamma = 46/7 / 14 = 23/49.
  corpus = [0, 1, 2, 3, 3, 4, 4, 5, 5, 5, 6, 6, 6, 6]
  model = ngram.KneserNey.fit(corpus, 1, 8)
  gamma = 23 / 49
  expected = [(1 - 3 / 7) / 14 + gamma / 8] * 3 + [
      (2 - 19 / 14) / 14 + gamma / 8] * 2 + [
          (3 - 9 / 7) / 14 + gamma / 8, (4 - 9 / 7) / 14 + gamma / 8,
          gamma / 8]
  np.testing.assert_allclose(model.distribution([]), expected, rtol=1e-12)
  assert math.isclose(expected[6], 99 / 392)
  # Plain: one discount n1 / (n1 + 2 n2) = 3/7 for every count; discounted
  # mass 7 (3/7) = 3, gamma = 3 / 14.
  plain = ngram.KneserNey.fit(corpus, 1, 8, discounting="plain")
  counts = np.array([1, 1, 1, 2, 2, 3, 4, 0])
  np.testing.assert_allclose(
      plain.distribution([]),
      np.maximum(counts - 3 / 7, 0) / 14 + 3 / 14 / 8, rtol=1e-12)


def test_bigram_and_trigram_by_hand():
  # a b a c a b over a, b, c, d. Every order has a count of counts missing,
  # so every discount is the fallback D1 = 0.5, D2 = 1, D3+ = 1.5.
  corpus = [A, B, A, C, A, B]
  bigram = ngram.KneserNey.fit(corpus, 2, 4)
  trigram = ngram.KneserNey.fit(corpus, 3, 4)
  # Order 1 counts continuations: a follows b and c (2), b and c follow a
  # (1 each), d nothing. Total 4, discounted 1 + 0.5 + 0.5: gamma 1/2.
  p1 = np.array([(2 - 1) / 4 + 1 / 8, (1 - 0.5) / 4 + 1 / 8,
                 (1 - 0.5) / 4 + 1 / 8, 1 / 8])  # 3/8, 1/4, 1/4, 1/8
  # Order 2 (the top) counts occurrences: ab 2, ac 1 after a (total 3,
  # discounted 1 + 0.5: gamma 1/2); ba 1 after b (gamma 1/2).
  after_a = np.array([0, (2 - 1) / 3, (1 - 0.5) / 3, 0]) + p1 / 2
  after_b = np.array([(1 - 0.5) / 1, 0, 0, 0]) + p1 / 2
  np.testing.assert_allclose(after_a, [3 / 16, 11 / 24, 7 / 24, 1 / 16])
  np.testing.assert_allclose(bigram.distribution([A]), after_a, rtol=1e-12)
  np.testing.assert_allclose(bigram.distribution([B]), after_b, rtol=1e-12)
  np.testing.assert_allclose(bigram.distribution([D]), p1, rtol=1e-12)
  np.testing.assert_allclose(bigram.distribution([]), p1, rtol=1e-12)
  # In the trigram, order 2 counts continuations: ab only after c (the
  # first ab has nothing before it), ac after b: 1 each, total 2, gamma
  # 1/2, so P2(b | a) = 0.5 / 2 + p1(b) / 2 = 3/8. Order 3: cab once after
  # ca: P(b | c a) = 0.5 / 1 + P2(b | a) / 2 = 11/16.
  p2_b_after_a = 0.5 / 2 + p1[B] / 2
  assert math.isclose(trigram.distribution([C, A])[B],
                      0.5 + p2_b_after_a / 2, rel_tol=1e-12)
  assert math.isclose(trigram.distribution([C, A])[B], 11 / 16)
  # An unseen context falls to order 2: not the bigram model's 11/24.
  assert math.isclose(trigram.distribution([D, A])[B], 3 / 8)
  # The probabilities of a stream are those of the distributions.
  np.testing.assert_allclose(
      trigram.probs([D, C, A, B]),
      [p1[D], trigram.distribution([D])[C], trigram.distribution([D, C])[A],
       11 / 16], rtol=1e-12)


def reference_prob(corpus, order, vocab_size, context, token):
  """Interpolated modified Kneser-Ney from its definition, one probability
  at a time, with Python counters."""
  corpus = list(corpus)

  def counts(n):  # occurrences at the top order, else continuations
    grams = [tuple(corpus[i:i + n]) for i in range(len(corpus) - n + 1)]
    if n == order:
      return collections.Counter(grams)
    longer = {tuple(corpus[i:i + n + 1]) for i in range(len(corpus) - n)}
    return collections.Counter(g[1:] for g in longer)

  def prob(n):
    if n == 0:
      return 1 / vocab_size
    if len(context) < n - 1:  # the text is too short for this order
      return prob(n - 1)
    history = tuple(context[len(context) - n + 1:]) if n > 1 else ()
    count = counts(n)
    (d1, d2, d3), _ = ngram.modified_discounts(np.array(list(count.values())))
    discount = {0: 0, 1: d1, 2: d2}
    following = [c for g, c in count.items() if g[:-1] == history]
    if not following:
      return prob(n - 1)
    c = count.get(history + (token,), 0)
    gamma = sum(discount.get(k, d3) for k in following) / sum(following)
    return ((c - discount.get(c, d3)) / sum(following) +
            gamma * prob(n - 1))

  return prob(order)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bits_per_byte_equal_a_direct_computation(order):
  train_text = "Hé said: thou art\n— ’tis o’er, thou art the king é"
  val_text = "thou said é — ’tis the art, o king\n"
  tokenizer = tokenizers.CharTokenizer.fit([train_text, val_text])
  train = tokenizer.encode(train_text)
  val = tokenizer.encode(val_text)
  model = ngram.KneserNey.fit(train, order, tokenizer.vocab_size)
  bits = ngram.bits_per_byte(model.log_probs(val),
                             int(tokenizer.token_bytes()[val].sum()))
  direct = sum(-math.log2(reference_prob(train, order, tokenizer.vocab_size,
                                         val[:i], val[i]))
               for i in range(len(val)))
  assert len(val_text.encode("utf-8")) > len(val_text)  # bytes, not chars
  assert math.isclose(bits, direct / len(val_text.encode("utf-8")),
                      rel_tol=1e-12)


def spelling_prob(words, token):
  """S(token), one conditional at a time: its bytes, then an end mark."""
  context = [ngram.SPELL_MARK] * (ngram.SPELL_ORDER - 1)
  p = 1.0
  for symbol in list(token.encode("utf-8")) + [ngram.SPELL_MARK]:
    p *= words.spelling.distribution(context)[symbol]
    context.append(symbol)
  return p


def test_word_bits_per_byte_equal_a_direct_computation():
  train = ["the king, the king! thou art the king.\nthe sea, the sea.",
           "thou art; the sea is the king's. the king."]
  val = ["the queen, thou art the sea!\n", "Ophélie the king"]
  words = ngram.Words.fit(train)
  ids, _ = words.encode(train)
  model = ngram.KneserNey.fit(ids, 3, words.vocab_size)
  bits = ngram.bits_per_byte(words.log_probs(model, val),
                             sum(len(t.encode("utf-8")) for t in val))
  # Directly: the vocabulary's tokens by the n-gram model, the others as
  # <unk> times their spelling, renormalized over the tokens outside it.
  vocab = [w for w, c in collections.Counter(
      w for t in train for w in ngram.WORD.findall(t)).items() if c >= 2]
  outside = (1 - spelling_prob(words, "") -
             sum(spelling_prob(words, w) for w in vocab))
  tokens = ngram.WORD.findall(val[0]) + [None] + ngram.WORD.findall(val[1])
  history, nats = [], 0.0
  for token in tokens:
    token_id = (ngram.EOT if token is None else
                words.ids.get(token, ngram.UNK))
    p = model.distribution(history)[token_id]
    if token_id == ngram.UNK:
      p *= spelling_prob(words, token) / outside
    nats -= math.log(p)
    history.append(token_id)
  assert {"queen", "Ophélie", "!"} <= {
      t for t in tokens if t not in words.ids}
  assert "".join(t or "" for t in tokens) == "".join(val)
  assert math.isclose(bits, nats / len("".join(val).encode("utf-8"))
                      / math.log(2), rel_tol=1e-12)


def test_generation_is_seeded():
  corpus = markov_tokens(2000, 6, seed=1)
  model = ngram.KneserNey.fit(corpus, 3, 6)
  first = model.sample(200, np.random.default_rng(5), context=[0])
  again = model.sample(200, np.random.default_rng(5), context=[0])
  other = model.sample(200, np.random.default_rng(6), context=[0])
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert first.min() >= 0 and first.max() < 6
  letters = ngram.fit_orders(ngram.letter_ids(
      "The king's men, to the sea! And so the queen went on... " * 20),
      (1, 3), len(ngram.LETTERS))
  for model in letters.values():
    lines = ngram.generate_letters(model, seed=0)
    assert lines == ngram.generate_letters(model, seed=0)
    assert lines != ngram.generate_letters(model, seed=1)
    assert set("".join(lines)) <= set(ngram.LETTERS)


def test_cli_writes_table_json_heatmap_and_words(corpus_dir, data_cache,
                                                 tmp_path, capsys):
  out = tmp_path / "ngram"
  assert ngram.main(["--source", corpus_dir, "--cache-dir", data_cache,
                     "--orders", "1-3", "--out", str(out)]) == 0
  stdout = capsys.readouterr().out
  assert "word bits/byte" in stdout and "char bits/byte" in stdout
  results = json.loads((out / "results.json").read_text())
  for name in ("token_model", "word_model"):
    rows = results[name]["rows"]
    assert [r["order"] for r in rows] == [1, 2, 3]
    assert all(0 < r["bits_per_byte"] < 8 for r in rows)
  assert results["word_model"]["val_bytes"] == results["val_bytes"]
  expected_bytes = sum(
      len(open(os.path.join(corpus_dir, f"{name}.txt"),
               encoding="utf-8").read().encode("utf-8"))
      for name in ("hamlet", "tempest"))
  assert results["val_bytes"] == expected_bytes
  table = np.array(results["letters"]["bigram_table"])
  np.testing.assert_allclose(table.sum(axis=1), 1, atol=1e-9)
  assert image.imread(out / "letter_bigrams.png").shape[0] > 400
  generated = (out / "generated_words.txt").read_text()
  assert all(f"letter {n}-gram model" in generated for n in range(1, 6))


@pytest.mark.parametrize("args, message", [
    (["--orders", "0-3"], "--orders"),
    (["--orders", "two"], "--orders"),
    (["--source", "no/such/corpus"], "data.source"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(args, message,
                                                      tmp_path, capsys):
  out = tmp_path / "out"
  assert ngram.main(args + ["--out", str(out),
                            "--cache-dir", str(tmp_path / "cache")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
  assert not out.exists()
