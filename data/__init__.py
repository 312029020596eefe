"""Text -> tokens -> Grain batches: corpora, tokenizers, preparation, loaders."""
