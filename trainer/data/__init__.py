"""What training reads: tokenizers, prepared datasets (memory-mapped .bin files), the sampler, mixtures."""
