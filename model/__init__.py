"""What a GPT is: the Flax modules and sampling, pure functions of params."""

from model.gpt import GPT, GPTConfig, KVCache, REMAT_POLICIES, resize_vocab
from model.sampling import generate, generate_uncached, window_start
