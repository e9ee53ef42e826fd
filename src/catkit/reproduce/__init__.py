"""Small-scale reproductions of each paper's claim, behind ``catkit reproduce <name>``."""

from catkit.reproduce.registry import REPRODUCTIONS, register, run_reproduction

__all__ = ["REPRODUCTIONS", "register", "run_reproduction"]
