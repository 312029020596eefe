"""Text -> tokens -> Grain batches: corpora, tokenizers, shards, loaders."""
