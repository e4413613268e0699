"""Training: the manifest of training pairs, its preparation into a latent cache, and the trainer."""
