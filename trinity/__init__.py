"""trinity: declarative experiment graphs for training Trinity-style sparse MoE language models."""

__version__ = "0.1.0"
