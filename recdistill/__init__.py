"""recdistill: staged distillation of recommender ranking models."""

__version__ = "0.1.0"
