"""Every field of a config, each at its usual value (GPT-2's architecture,
AdamW); every other config starts from it. By itself it is the
character-level run that was the default until 2026-12-07: a 3 x 96 GPT on
Shakespeare's characters, 3,600 steps.

Command:  python train.py --config=configs/base.py
Expect:   ~11 minutes of training on a 2-core CPU at ~22,000 tokens/s;
          validation loss 1.57 nats per character (2.27 bits per byte) on
          the held-out works (Hamlet, The Tempest), level with a counted
          6-gram Kneser-Ney model.

Why this size: chosen by the scaling study (python -m research.scaling
study; docs/scaling.md). Its fitted law, at each size's
measured speed here, ranks 3 x 96 first for 11 minutes of training
(predicted 1.592; the compute-optimal N for that budget is 0.35M, ~50
tokens per parameter), ahead of the 4 x 128 default before it (1.622 in the
same time: configs/shakespeare_4x128.py). A wsd schedule as in the study,
whose learning rate rule 4e-3 * sqrt(128 / d_model) gives 4.6e-3.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0,        # 0: the tokenizer's vocabulary size
      vocab_multiple=128,  # pad the vocabulary to a multiple of this; 1: none
      num_layers=3,
      d_model=96,
      num_heads=3,
      d_ff=0,              # 0: 4 * d_model
      seq_len=128,
      position="learned",  # or "sinusoidal", "rope" (rotary, half-split)
      rope_base=10000.0,   # position="rope": base of the rotary frequencies
      tie_embeddings=True,
      use_bias=True,
      dropout=0.0,
      scan_layers=False,   # nn.scan over layers: faster compiles, ~15% slower on CPU
      remat="none",        # "none" | "dots" | "full"
      dtype="float32",     # compute dtype: float32 | bfloat16 (float16: no loss scaling)
      param_dtype="float32",  # float32 to train (Adam's moments follow it)
      attention="einsum",  # "einsum" | "xla" | "cudnn" (GPU, bf16)
      attention_chunks=2,  # einsum attention in query blocks that skip masked keys
      attention_pattern="dense",  # "dense" | "local" layers, comma-separated,
                                  # cycled over the layers; GPT-3: "dense,local"
      local_window=256,    # a local layer's query sees its key and 255 before
      parametrization="standard",  # or "mup" (docs/mup.md)
      mup_base_width=96,   # muP: the d_model where it equals "standard"
      mup_base_heads=0,    # muP: the base model's heads, kept at every width; 0: num_heads
      # The modern recipe (docs/model.md); each default is GPT-2's.
      norm="layernorm",    # or "rmsnorm" (a gain, no bias): every norm of the model
      qk_norm=False,       # RMSNorm of each head's queries and keys
      activation="gelu",   # the MLP's: "gelu" (tanh) | "relu2" (ReLU squared)
      zero_init_proj=False,  # attention and MLP outputs, untied head: start at 0
      logit_softcap=0.0,   # c > 0: logits = c * tanh(logits / c); 0: off
      value_embeds=0,      # N tables added to the values of the first and last N layers
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="shakespeare",  # or raw text (a directory, file or glob of .txt/.jsonl[.gz]),
                             # or a directory from `python -m data.prepare` (its tokenizer and split apply)
      tokenizer="char",      # raw sources: "char" | "byte" | "bpe"
      bpe_vocab_size=8192,   # tokenizer="bpe": its ids, the 256 bytes and EOT included
      holdout=("hamlet", "tempest"),  # raw sources: documents (file names) held out; () = by hash
      val_fraction=0.01,     # raw sources with holdout=(): fraction held out by a hash of the text
      cache_dir="",          # "": $GPT_JAX_CACHE or ~/.cache/gpt_jax
      num_workers=0,         # grain worker processes
      fingerprint=True,      # log a hash of each step's batch: data_order.jsonl
      pack=True,             # sft: pack several examples into a window (False: one each)
      order_version=2,       # epoch shuffles: 2 seeds each by a hash of (seed, epoch);
                             # 1 (runs before it) by seed + epoch, shared across seeds
  ))

  c.train = ml_collections.ConfigDict(dict(
      objective="next-token",  # "next-token" (text) | "sft" | "dpo" (JSONL examples:
                               # data.source: their file, directory or glob; docs/posttrain.md)
      sft_loss_on="response",  # sft: "response" tokens (and their EOT) | "all" tokens
      dpo_beta=0.1,            # dpo: the strength of the tie to the reference
      steps=3600,
      batch_size=32,         # global, in sequences
      grad_accum_steps=1,
      learning_rate=4.6e-3,  # peak
      warmup_steps=50,       # capped to steps // 5 in a run too short for it
      schedule="wsd",        # "wsd" (warmup-stable-decay) | "cosine" | "constant"
      cosine_steps=0,        # cosine: its decay ends here (or at train.steps
                             # if sooner), then the rate holds (GPT-3: 260B
                             # of 300B tokens); 0: train.steps
      decay_fraction=0.2,    # wsd: the decay takes this fraction of the steps
      decay_shape="1-sqrt",  # wsd and cooldowns: "linear" | "cosine" | "1-sqrt"
      min_lr_ratio=0.1,      # the decay ends at this fraction of the peak
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1,      # matrices only
      optimizer="adamw",     # "adamw" | "muon": Muon for the attention and MLP
                             # kernels, AdamW for the rest (docs/optimizer.md)
      muon_learning_rate=2e-2,  # muon: the kernels' peak, on learning_rate's schedule
      muon_momentum=0.95,    # muon: its Nesterov momentum
      grad_clip=1.0,
      skip_nonfinite_updates=0,  # 0: stop at a non-finite loss; N: skip up to N in a row
      seed=0,
      log_every_steps=50,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      every_steps=400,
      batch_size=64,
      max_batches=0,         # 0: every eval reads the whole split; N: every eval
                             # reads the same N batches, spread over it
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=400,
      keep=3,              # the newest K checkpoints are kept...
      keep_best=True,      # ...plus the one with the lowest eval loss
      init_from="",        # a run's workdir: start from its newest params
      keep_steps=(),       # also save at these steps and keep them (cooldown branch points)
  ))

  # --mode=cooldown: a branch of a wsd / constant run (docs/sweeps.md).
  c.cooldown = ml_collections.ConfigDict(dict(
      from_step=0,         # the run's checkpoint to start from, in its stable phase
      steps=0,             # decay steps; the branch ends at from_step + steps
      shape="",            # "": the run's train.decay_shape
      workdir="",          # "": <run workdir>/cooldowns/<from_step>+<steps>
      parent="",           # set by --mode=cooldown: the run it branches from
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1,  # -1: all remaining devices
      # logical axis -> mesh axes, first free match wins
      rules=(("batch", ("data", "fsdp")), ("vocab", "tensor"),
             ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor")),
  ))

  c.sample = ml_collections.ConfigDict(dict(
      prompt="\n",
      prompt_file="",      # if set, its text (UTF-8) is the prompt
      num_samples=1,       # --mode=sample
      temperature=0.8,
      top_k=0,
      top_p=1.0,
      max_new_tokens=500,
      seed=0,
      top=5,               # --mode=next: how many next tokens to list
  ))

  c.perf = ml_collections.ConfigDict(dict(
      peak_flops=0.0,  # per device, for MFU; 0: look up or measure
  ))
  return c
