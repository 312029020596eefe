"""What a GPT is: the Flax modules and sampling, pure functions of params."""

from model.config import GPTConfig, REMAT_POLICIES
from model.gpt import GPT, resize_vocab
from model.kv_cache import KVCache
from model.sampling import generate, generate_uncached, window_start
