"""Training objectives as small pure functions of (params, batch): the one
train step (trainer.state) takes its loss from `train.objective`.

  next-token  tokens [B, L+1]: mean cross-entropy of every next token.
  sft         a dict of [B, L+1] arrays (data.loader.PackedSource): tokens,
              segments, positions, weights; cross-entropy of the weighted
              (response) tokens, summed and divided by their count in the
              whole global batch, so that packing, padding and gradient
              accumulation leave it unchanged.
  dpo         a dict of [B, 2, L+1] arrays (data.loader.PairSource): tokens
              and weights, row 0 chosen, row 1 rejected; Direct Preference
              Optimization (Rafailov et al. 2023) against frozen reference
              params:
                loss = -log sigmoid(beta * ((c - c_ref) - (r - r_ref)))
              with c, r the summed log-probabilities of the chosen and the
              rejected response tokens (their closing EOT included).

Each loss function returns (loss, metrics), metrics being means over the
batch; each eval function returns sums over the rows a mask keeps, which
`summarize` turns into the eval record. OBJECTIVES, at the end, is the table
the train and eval steps read.
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

def cross_entropy(logits_BxLxV, targets_BxL):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL)


def apply(model, params, batch, rng=None, dropout=False):
  """Logits of the inputs (each row's first L tokens); an sft batch's rows
  hold several sequences kept apart by their segments and positions."""
  kwargs = {}
  if isinstance(batch, dict) and "segments" in batch:
    kwargs = dict(segment_ids=batch["segments"][:, :-1],
                  pos_BxL=batch["positions"][:, :-1])
  tokens_BxL1 = batch["tokens"] if isinstance(batch, dict) else batch
  return model.apply({"params": params}, tokens_BxL1[:, :-1],
                     deterministic=not dropout,
                     rngs={"dropout": rng} if dropout else None, **kwargs)


# ---------------------------------------------------------------- next-token

def next_token_loss(model, params, tokens_BxL1, rng, dropout=False):
  logits_BxLxV = apply(model, params, tokens_BxL1, rng, dropout)
  return cross_entropy(logits_BxLxV, tokens_BxL1[:, 1:]).mean(), {}


def next_token_eval(model, params, tokens_BxL1, mask_B, token_bytes_V):
  """Sums over the rows of mask_B: nats, target tokens, target bytes."""
  logits_BxLxV = apply(model, params, tokens_BxL1)
  targets_BxL = tokens_BxL1[:, 1:]
  weight_BxL = jnp.broadcast_to(mask_B[:, None], targets_BxL.shape)
  return _token_sums(logits_BxLxV, targets_BxL, weight_BxL, token_bytes_V)


def _token_sums(logits_BxLxV, targets_BxL, weight_BxL, token_bytes_V):
  weight_BxL = weight_BxL.astype(jnp.float32)
  nats = jnp.sum(cross_entropy(logits_BxLxV, targets_BxL) * weight_BxL)
  num_bytes = jnp.sum(token_bytes_V[targets_BxL] * weight_BxL)
  return {"nats": nats, "tokens": jnp.sum(weight_BxL),
          "bytes": num_bytes.astype(jnp.float32)}


# ---------------------------------------------------------------- sft

def sft_targets(batch):
  """(targets [B, L], weights [B, L] float32) of an sft batch."""
  return batch["tokens"][:, 1:], batch["weights"][:, 1:].astype(jnp.float32)


def sft_denominator(batch):
  """The count the summed loss is divided by: the weighted targets of the
  whole (global) batch, at least 1."""
  return jnp.maximum(jnp.sum(sft_targets(batch)[1]), 1.0)


def sft_loss(model, params, batch, rng, denominator, dropout=False):
  """Summed cross-entropy of the weighted targets over `denominator`."""
  logits_BxLxV = apply(model, params, batch, rng, dropout)
  targets_BxL, weights_BxL = sft_targets(batch)
  nats = jnp.sum(cross_entropy(logits_BxLxV, targets_BxL) * weights_BxL)
  return nats / denominator, {}


def sft_eval(model, params, batch, mask_B, token_bytes_V):
  """Sums over the rows of mask_B: nats, target tokens, target bytes."""
  logits_BxLxV = apply(model, params, batch)
  targets_BxL, weights_BxL = sft_targets(batch)
  return _token_sums(logits_BxLxV, targets_BxL,
                     weights_BxL * mask_B[:, None], token_bytes_V)


# ---------------------------------------------------------------- dpo

def _flat_pairs(batch):
  """A dpo batch's [B, 2, L+1] arrays as [2B, L+1] (rows 2i chosen, 2i + 1
  rejected)."""
  return {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}


def sequence_logps(logits_BxLxV, tokens_BxL1, weights_BxL1):
  """Per row: the summed log-probability of the weighted targets, and the
  token log-probabilities of the whole distribution (for the KL)."""
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  targets_BxL = tokens_BxL1[:, 1:]
  weights_BxL = weights_BxL1[:, 1:].astype(jnp.float32)
  token_logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None],
                                       axis=-1)[..., 0]
  return jnp.sum(token_logp_BxL * weights_BxL, axis=-1), logp_BxLxV


def dpo_from_logps(logp_Bx2, ref_logp_Bx2, beta):
  """DPO's formula on the summed log-probabilities of each pair's chosen
  (column 0) and rejected (column 1) response under the policy and the
  reference: per pair the loss -log sigmoid(margin), the rewards
  beta * (logp - ref_logp) and their margin, chosen minus rejected."""
  rewards_Bx2 = beta * (logp_Bx2 - ref_logp_Bx2)
  margin_B = rewards_Bx2[:, 0] - rewards_Bx2[:, 1]
  return -jax.nn.log_sigmoid(margin_B), rewards_Bx2, margin_B


def _reference_logps(params, ref_params, logps, ref_logps):
  """The reference's log-probabilities, or the policy's (without their
  gradient) where the two param trees are equal, as at a run's first step:
  its rewards and KL are then exactly 0, not the round-off between two
  compiled forward passes (one under the gradient) of the same weights."""
  same = jnp.all(jnp.stack([jnp.array_equal(p, r) for p, r in zip(
      jax.tree.leaves(params), jax.tree.leaves(ref_params))]))
  return jax.tree.map(
      lambda lp, ref: jnp.where(same, jax.lax.stop_gradient(lp), ref),
      logps, ref_logps)


def dpo_terms(model, params, batch, ref_params, beta):
  """Per pair: the loss, the chosen and rejected rewards (beta times the
  log-ratio to the reference) and per sequence the KL to the reference
  summed over its target tokens; with the target counts."""
  flat = _flat_pairs(batch)
  logits = apply(model, params, flat)
  ref_logits = jax.lax.stop_gradient(apply(model, ref_params, flat))
  logp_2B, logp_2BxLxV = sequence_logps(logits, flat["tokens"],
                                        flat["weights"])
  ref_logp_2B, ref_logp_2BxLxV = _reference_logps(
      params, ref_params, (logp_2B, logp_2BxLxV),
      sequence_logps(ref_logits, flat["tokens"], flat["weights"]))
  loss_B, rewards_Bx2, margin_B = dpo_from_logps(
      logp_2B.reshape(-1, 2), ref_logp_2B.reshape(-1, 2), beta)
  # KL(policy || reference) of the next-token distributions at the target
  # positions, summed over each sequence's targets.
  weights_2BxL = flat["weights"][:, 1:].astype(jnp.float32)
  kl_2BxL = jnp.sum(jnp.exp(logp_2BxLxV) * (logp_2BxLxV - ref_logp_2BxLxV),
                    axis=-1)
  return {"loss_B": loss_B,
          "chosen_B": rewards_Bx2[:, 0], "rejected_B": rewards_Bx2[:, 1],
          "margin_B": margin_B,
          "kl_2B": jnp.sum(kl_2BxL * weights_2BxL, axis=-1),
          "targets_2B": jnp.sum(weights_2BxL, axis=-1)}


def response_targets(batch) -> dict:
  """The target tokens of a dpo batch's chosen and rejected responses, each
  count at least 1: what the KL sums are divided by."""
  weights_Bx2xL = batch["weights"][..., 1:].astype(jnp.float32)
  return {side: jnp.maximum(jnp.sum(weights_Bx2xL[:, i]), 1.0)
          for i, side in enumerate(("chosen", "rejected"))}


def dpo_loss(model, params, batch, ref_params, beta, targets=None):
  """The mean loss over the pairs, and the metrics. The KL sums are divided
  by `targets` (response_targets of the whole global batch, split over the
  microbatches of gradient accumulation; by default this batch's)."""
  t = dpo_terms(model, params, batch, ref_params, beta)
  targets = response_targets(batch) if targets is None else targets
  metrics = {"reward_chosen": t["chosen_B"].mean(),
             "reward_rejected": t["rejected_B"].mean(),
             "reward_margin": t["margin_B"].mean(),
             "reward_accuracy": (t["margin_B"] > 0).astype(jnp.float32).mean(),
             **kl_per_token(t["kl_2B"][0::2].sum(), t["kl_2B"][1::2].sum(),
                            targets["chosen"], targets["rejected"])}
  return t["loss_B"].mean(), metrics


def kl_per_token(kl_chosen, kl_rejected, targets_chosen, targets_rejected):
  """The KL to the reference per target token, from its sums over the chosen
  and the rejected responses and their target counts (each at least 1):
  over both, the chosen ones, the rejected ones."""
  return {"kl_ref": (kl_chosen + kl_rejected) / (targets_chosen +
                                                 targets_rejected),
          "kl_ref_chosen": kl_chosen / targets_chosen,
          "kl_ref_rejected": kl_rejected / targets_rejected}


def dpo_eval(model, params, batch, mask_B, ref_params, beta):
  """Sums over the pairs of mask_B."""
  t = dpo_terms(model, params, batch, ref_params, beta)
  m = mask_B.astype(jnp.float32)
  return {"pairs": m.sum(), "loss": jnp.sum(t["loss_B"] * m),
          "chosen": jnp.sum(t["chosen_B"] * m),
          "rejected": jnp.sum(t["rejected_B"] * m),
          "margin": jnp.sum(t["margin_B"] * m),
          "correct": jnp.sum((t["margin_B"] > 0) * m),
          "kl_chosen": jnp.sum(t["kl_2B"][0::2] * m),
          "kl_rejected": jnp.sum(t["kl_2B"][1::2] * m),
          "targets_chosen": jnp.sum(t["targets_2B"][0::2] * m),
          "targets_rejected": jnp.sum(t["targets_2B"][1::2] * m)}


# ---------------------------------------------------------------- records

def summarize(objective: str, sums: dict) -> dict:
  """The eval record of an objective's summed eval values. eval_loss is the
  objective's loss (for dpo, its preference loss), which keep_best uses."""
  return OBJECTIVES[objective].record(sums)


def _dpo_record(sums: dict) -> dict:
  sums = {k: float(v) for k, v in sums.items()}
  n = max(sums["pairs"], 1.0)
  return {"eval_loss": sums["loss"] / n,
          "eval_reward_chosen": sums["chosen"] / n,
          "eval_reward_rejected": sums["rejected"] / n,
          "eval_reward_margin": sums["margin"] / n,
          "eval_reward_accuracy": sums["correct"] / n,
          **{f"eval_{k}": float(v) for k, v in kl_per_token(
              sums["kl_chosen"], sums["kl_rejected"],
              max(sums["targets_chosen"], 1.0),
              max(sums["targets_rejected"], 1.0)).items()},
          "eval_pairs": int(sums["pairs"])}


def _token_record(sums_3) -> dict:
  nats, tokens, nbytes = (float(v) for v in sums_3)
  loss = nats / max(tokens, 1.0)
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
          "eval_bits_per_byte": nats / max(nbytes, 1.0) / math.log(2),
          "eval_tokens": int(tokens)}


def _stacked(sums: dict):
  """One array [nats, target tokens, target bytes]: one transfer."""
  return jnp.stack([sums["nats"], sums["tokens"], sums["bytes"]])


def tokens_per_row(objective: str, seq_len: int) -> int:
  """Input tokens a batch row feeds the model (padding included)."""
  return OBJECTIVES[objective].sequences_per_row * seq_len


# ---------------------------------------------------------------- the table

@dataclasses.dataclass(frozen=True)
class Objective:
  """An objective as the one train step and eval step use it.

  loss(model, params, batch, *, rng, dropout, ref_params, beta,
       denominator) -> (loss, metrics)
  eval(model, params, batch, mask_B, token_bytes_V, *, ref_params, beta)
       -> sums over the rows of mask_B, which `record` turns into the eval
       record
  """
  loss: Callable
  eval: Callable
  record: Callable
  # batch -> the target counts of the whole global batch, which each
  # microbatch's sums are divided by (None: the loss is a plain mean).
  denominator: Callable | None = None
  # batch -> metrics of the whole batch, beside the loss's.
  batch_metrics: Callable | None = None
  uses_reference: bool = False  # the steps take frozen reference params
  sequences_per_row: int = 1


OBJECTIVES = {
    "next-token": Objective(
        loss=lambda model, params, batch, *, rng, dropout, **_:
            next_token_loss(model, params, batch, rng, dropout),
        eval=lambda model, params, batch, mask_B, token_bytes_V, **_:
            _stacked(next_token_eval(model, params, batch, mask_B,
                                     token_bytes_V)),
        record=_token_record),
    "sft": Objective(
        loss=lambda model, params, batch, *, rng, dropout, denominator, **_:
            sft_loss(model, params, batch, rng, denominator, dropout),
        eval=lambda model, params, batch, mask_B, token_bytes_V, **_:
            _stacked(sft_eval(model, params, batch, mask_B, token_bytes_V)),
        record=_token_record,
        denominator=sft_denominator,
        batch_metrics=lambda batch: {
            "target_tokens": jnp.sum(sft_targets(batch)[1])}),
    "dpo": Objective(
        loss=lambda model, params, batch, *, ref_params, beta, denominator,
                    **_:
            dpo_loss(model, params, batch, ref_params, beta, denominator),
        eval=lambda model, params, batch, mask_B, token_bytes_V, *,
                    ref_params, beta:
            dpo_eval(model, params, batch, mask_B, ref_params, beta),
        record=_dpo_record,
        denominator=response_targets,
        uses_reference=True,
        sequences_per_row=2),
}
