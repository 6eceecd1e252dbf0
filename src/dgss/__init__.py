"""dgss: domain-generalized semantic segmentation with Vision Foundation Models.

``dgss.load(path)`` opens a trained model (see :mod:`dgss.predict`); it is imported on first use so
that ``import dgss`` stays cheap (no torch import).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # PEP 562: heavy entry points are imported the first time they are asked for
    if name == "load":
        from .predict import load

        return load
    raise AttributeError(f"module 'dgss' has no attribute {name!r}")
