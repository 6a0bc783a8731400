"""vqtool: a command-line toolkit for two-stage VQ image generation (VQGAN + transformer priors).

For notebooks: `vqtool.load_vq(path)` and `vqtool.load_prior(path)` (docs/python.md). They are loaded
on first use, so the command line does not pay for importing them.
"""

__version__ = "0.1.0"

__all__ = ["load_prior", "load_vq", "__version__"]


def __getattr__(name: str):
    if name in ("load_vq", "load_prior"):
        from vqtool import api

        return getattr(api, name)
    raise AttributeError(f"module 'vqtool' has no attribute {name!r}")
