"""vqtool: a command-line toolkit for two-stage VQ image generation (VQGAN + transformer priors)."""

__version__ = "0.1.0"
