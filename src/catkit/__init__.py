"""catkit: tested, fast implementations of the LongCat efficient-LLM techniques."""

__version__ = "0.1.0"
