"""Decoding over the latent cache: the engine and its attention kernels."""
