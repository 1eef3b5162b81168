"""recare: erase a concept from a text-to-image diffusion model, keeping what co-occurs with it."""

__version__ = "0.1.0"
