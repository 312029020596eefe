"""research.parens: the walk yields only balanced words, drawn as
documented (word and depth probabilities); packing puts every window's start
on a document, so every training target is legal; the metrics give known
numbers on hand-made tables (and 0 for the walk itself, a perfect model); a
tiny run of the whole command lowers the illegal mass well below an
untrained model's and writes results.json with the documented keys; bad
input stops with one line."""

import collections
import json
import math
import os

import numpy as np
import pytest

from research import parens, parens_data
from research.parens_data import CLOSE, END, OPEN, Walk


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
  return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("walk", [Walk(), Walk(max_depth=2, max_len=6)])
def test_the_walk_yields_only_balanced_words_within_its_limits(walk):
  words = walk.sample(20_000, seed=1)
  assert all(map(parens_data.is_balanced, words))
  assert max(map(len, words)) == walk.max_len
  assert (max(parens_data.prefix_depths(w).max() for w in words)
          == walk.max_depth)
  assert words == walk.sample(20_000, seed=1)
  assert words != walk.sample(20_000, seed=2)


def test_the_walk_draws_words_with_the_documented_probabilities():
  walk, n = Walk(), 40_000
  words = walk.sample(n, seed=3)
  p, q = walk.open_prob, walk.end_prob
  # "()" closes (1 - p), then ends (q); "()()" opens again first.
  for word, prob in [("()", (1 - p) * q), ("()()", (1 - p) * (1 - q) *
                                            (1 - p) * q),
                     ("(())", p * (1 - p) * (1 - p) * q)]:
    assert _within(words.count(word), n, prob), word
    assert math.isclose(math.exp(walk.log_prob(word)), prob)
  assert _within(sum(w.startswith("((") for w in words), n, p)


def test_the_walk_draws_depths_as_a_biased_random_walk():
  # Without the length cap, each excursion from depth 0 climbs to depth k
  # with the gambler's-ruin probability h_k = (r - 1) / (r^k - 1), r =
  # (1 - p) / p; a word has a geometric number of excursions (ends with q
  # at depth 0), so P(max depth >= k) = 1 - q (1 - h) / (1 - (1 - q)(1 - h)).
  walk, n = Walk(max_depth=6, max_len=4000), 30_000
  words = walk.sample(n, seed=5)
  deepest = np.array([parens_data.prefix_depths(w).max() for w in words])
  p, q = walk.open_prob, walk.end_prob
  r = (1 - p) / p
  for k in range(1, 7):
    h = (r - 1) / (r ** k - 1)
    expected = 1 - q * (1 - h) / (1 - (1 - q) * (1 - h))
    assert _within(int((deepest >= k).sum()), n, expected), k
  assert deepest.max() == 6  # the cap holds


def test_packing_starts_every_window_at_a_document():
  seq_len, words = 48, Walk(max_depth=4, max_len=24).sample(4000, seed=6)
  packed = parens_data.pack(words, seq_len)
  unused = collections.Counter(words)
  unused.subtract(packed)  # each word used at most once, nearly all used
  assert min(unused.values()) >= 0 and sum(unused.values()) < 0.1 * len(words)
  stream = "".join(w + END for w in packed)
  assert set(stream[seq_len::seq_len]) == {END}
  # Every target of every window is legal given what the window shows
  # (window 0 opens inside its first word, the others with the end).
  openers = []
  for start in range(0, len(stream) - seq_len, seq_len):
    window = stream[start:start + seq_len + 1]
    openers.append(window[start > 0:].split(END)[0])
    word = None if start == 0 else ""
    for token, target in zip(window, window[1:]):
      if token == END:
        word = ""
      elif word is not None:
        word += token
      if word is not None:
        legal = parens_data.legal_next(word)[-1]
        assert legal[(OPEN + CLOSE + END).index(target)], (start, window)
  # The words that open windows, which scoring and sampling reproduce, are
  # drawn as the walk draws them: not longer (as words put aside would
  # be) nor shorter (as fillers are).
  lengths = np.array([len(w) for w in words])
  sigma = lengths.std() / math.sqrt(len(openers))
  assert abs(np.mean([len(w) for w in openers]) - lengths.mean()) < 4 * sigma


def test_packing_puts_aside_a_word_that_does_not_fit():
  # Costs (length + 1) are odd and >= 3, so no word fills a gap of 1, 2
  # or 4. Window 0 holds 13 tokens: "()" (3) and "(())" (5) fit; "((()))"
  # (7) does not and is put aside; of the next words "()" would leave 2
  # and is put aside too, "()()" fills the gap. Window 1 opens with the
  # next word in order, "(()())", not with a word put aside; the last,
  # unfillable window is dropped.
  words = ["()", "(())", "((()))", "()", "()()", "(()())", "(())", "()"]
  packed = parens_data.pack(words, 12)
  assert packed == ["()", "(())", "()()", "(()())", "(())"]
  assert "".join(w + END for w in packed)[12::12] == END * 2


def test_the_walk_itself_puts_no_mass_on_illegal_tokens():
  walk = Walk(max_depth=3, max_len=10)
  for word in walk.sample(500, seed=4):
    probs_Px3 = walk.next_probs(np.arange(len(word) + 1),
                                parens_data.prefix_depths(word))
    np.testing.assert_allclose(probs_Px3.sum(-1), 1.0)
    mass = parens_data.illegal_mass(probs_Px3, parens_data.legal_next(word))
    assert np.abs(mass).max() < 1e-12, word


def test_illegal_mass_on_a_hand_made_table():
  #          open  close  end      legal              illegal
  table = np.array([[0.9, 0.1, 0.0],    # start: "("       0.1 on ")"
                    [0.3, 0.5, 0.2],    # depth 1: "(" ")"  0.2 on the end
                    [0.2, 0.15, 0.65]])  # depth 0: "(" end  0.15 on ")"
  legal = parens_data.legal_next("()")
  assert legal.tolist() == [[True, False, False], [True, True, False],
                            [True, False, True]]
  np.testing.assert_allclose(parens_data.illegal_mass(table, legal),
                             [0.1, 0.2, 0.15])
  # Mass on no token of the three (another id) is illegal too.
  assert parens_data.illegal_mass(np.array([[0.5, 0.0, 0.0]]),
                                  legal[:1]) == pytest.approx(0.5)
  walk = Walk()
  perfect = walk.next_probs(np.arange(3), parens_data.prefix_depths("()"))
  scores = parens.heldout_scores(walk, ["()", "()"], [table, perfect])
  assert scores["illegal_mass"] == pytest.approx((0.45 / 3 + 0) / 2)
  assert scores["illegal_mass_worst"] == pytest.approx(0.2)
  assert scores["illegal_mass_by_state"] == pytest.approx(
      {"start": 0.05, "inside": 0.1, "depth_0": 0.075})
  # The walk's loss is the ideal one.
  assert scores["ideal_nats_per_token"] == pytest.approx(
      -walk.log_prob("()") / 3)
  assert parens.heldout_scores(walk, ["()"], [perfect])[
      "nats_per_token"] == pytest.approx(-walk.log_prob("()") / 3)


@pytest.mark.parametrize("word", ["()", "(())", "()(())", "((()))()",
                                  "(()())"])
def test_balanced_words(word):
  assert parens_data.is_balanced(word)


@pytest.mark.parametrize("word", ["", ")(", "(()", "())(", "(((", "())",
                                  "(a)", "()" + END, "())(()"])
def test_unbalanced_words(word):
  assert not parens_data.is_balanced(word)


@pytest.mark.parametrize("continuation,correct,closes", [
    (")))" + END, True, 3), (")))", False, 3), ("))))" + END, False, 4),
    ("))()" + END, False, 2), ("))" + END, False, 2),
    (")))()" + END, False, 3), ("(" + END, False, 0)])
def test_greedy_completion_scoring(continuation, correct, closes):
  row = parens_data.score_completion(3, continuation)
  assert (row["correct"], row["closes"]) == (correct, closes)


def test_sample_scores_by_hand():
  texts = ["()" + END, "(()" + END, "(())", "()()" + END, "((()))" + END]
  scores = parens.sample_scores(Walk(max_depth=2), texts, {"()"})
  assert scores["balanced_fraction"] == pytest.approx(3 / 5)
  assert scores["within_limits_fraction"] == pytest.approx(2 / 5)
  assert scores["novel_fraction"] == pytest.approx(2 / 5)
  assert scores["unbalanced_examples"] == ["(()" + END, "(())"]


STEPS = 60
TINY = ["--steps", str(STEPS), "--train-docs", "3000", "--val-docs", "100",
        "--samples", "6", "--max-depth", "2", "--max-len", "8",
        "--set", "model.d_model=32", "--set", "model.seq_len=32",
        "--set", "train.batch_size=8", "--set", "train.learning_rate=1e-2",
        "--set", "eval.batch_size=8", "--set", "perf.peak_flops=1e12"]
MODEL_KEYS = {
    "workdir", "step", "num_layers", "params", "illegal_mass",
    "illegal_mass_worst", "illegal_mass_by_state", "nats_per_token",
    "ideal_nats_per_token", "samples", "balanced_fraction",
    "within_limits_fraction", "novel_fraction", "unbalanced_examples",
    "greedy_correct_up_to_depth", "greedy_correct_depths", "greedy",
    "train_s", "score_s", "sequences_seen", "config_overrides",
    "meets_targets"}


def _untrained_illegal_mass(workdir: str, config, words: list[str]) -> float:
  """The illegal mass of the run's model at its initialization."""
  from trainer import run as run_lib
  from trainer import state as state_lib
  run = run_lib.build(config, workdir, splits=())
  with run.context():
    state = state_lib.init_state(run.model, run.tx, run.shardings, 0)
    probs = parens.next_token_probs(run.model, state.params, run.tokenizer,
                                    words)
  return parens.heldout_scores(Walk(), words, probs)["illegal_mass"]


def test_a_tiny_run_learns_and_writes_the_documented_results(tmp_path,
                                                              capsys):
  out = str(tmp_path / "parens")
  assert parens.main(["--out", out, *TINY]) == 0
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  assert set(results) == {
      "distribution", "data", "targets", "models", "plot", "wall_s",
      "load_average_before", "load_average_after", "cpus"}
  assert set(results["models"]) == {"one_block", "two_blocks"}
  with open(os.path.join(out, "documents", "val.jsonl")) as f:
    val_words = [json.loads(line)["text"] for line in f]
  for name, layers in (("one_block", 1), ("two_blocks", 2)):
    m = results["models"][name]
    assert set(m) == MODEL_KEYS
    assert (m["num_layers"], m["step"], m["samples"]) == (layers, STEPS, 6)
    assert 0 <= m["illegal_mass"] <= m["illegal_mass_worst"] <= 1
    assert [g["depth"] for g in m["greedy"]] == list(range(1, 9))
    with open(os.path.join(m["workdir"], "config.json")) as f:
      assert json.load(f)["model"]["num_layers"] == layers
    # Training moved mass off the illegal tokens: an untrained model puts
    # about a third of each position's mass on each token.
    untrained = _untrained_illegal_mass(
        m["workdir"], parens.model_config(
            results["data"]["path"], layers, m["config_overrides"]),
        val_words)
    assert untrained > 0.25
    assert m["illegal_mass"] < untrained / 10, (name, m["illegal_mass"])
  assert os.path.getsize(results["plot"]) > 0
  assert "two_blocks" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--max-len", "1"], "--max-len"),
    (["--set", "model.bogus=1"], "model.bogus"),
    (["--set", "train.steps=many"], "not a int"),
    (["--max-depth", "20"], "model.seq_len=128"),
])
def test_bad_input_stops_with_one_line(tmp_path, capsys, args, message):
  assert parens.main(["--out", str(tmp_path / "x"), *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err
  assert len(err.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "x")
