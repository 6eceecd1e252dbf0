"""dgss: domain-generalized semantic segmentation with Vision Foundation Models."""

__version__ = "0.1.0"
