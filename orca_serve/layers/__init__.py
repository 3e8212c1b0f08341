"""Building blocks of the models: parallel linears, embeddings, norms, RoPE, paged attention, sampler."""
