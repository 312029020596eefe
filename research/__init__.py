"""Research tools, a top layer beside train.py, launch/ and benchmarks/:
scaling-law fits, plots and a compute-optimal planner (scaling.py), muP's
coordinate check and learning-rate transfer (mup.py), n-gram baselines
(ngram.py) and the balanced-parentheses study (parens.py). They may import
the trainer, data and model, never a benchmark. scaling.py imports model/,
trainer/ and launch/ only inside the functions that use them, so that
importing it loads no jax."""
