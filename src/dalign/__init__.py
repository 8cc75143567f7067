"""dalign: deliberative alignment of small language models and a latent-space Best-of-N safety guard."""

__version__ = "0.1.0"
