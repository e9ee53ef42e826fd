"""Registry of reproductions: ``fn(out_dir: str, quick: bool) -> dict`` registered by name.

A reproduction trains or measures what its paper claims at a scale one GPU (or a CPU, with
``quick``) can do, writes ``report.md``, plots and ``results.json`` into ``out_dir``, and returns
the summary dict. It reports whatever the outcome is.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Callable

_MODULES = ["catkit.reproduce.fg2", "catkit.reproduce.loza", "catkit.reproduce.ngram"]


@dataclass
class Reproduction:
    name: str
    fn: Callable[[str, bool], dict]
    help: str


REPRODUCTIONS: dict[str, Reproduction] = {}


def register(name: str, help: str):
    def deco(fn):
        if name in REPRODUCTIONS:
            raise ValueError(f"reproduction {name!r} registered twice")
        REPRODUCTIONS[name] = Reproduction(name, fn, help)
        return fn

    return deco


def load_reproductions() -> dict[str, Reproduction]:
    for mod in _MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a missing dependency of an existing module is a real error
                raise
    return REPRODUCTIONS


def run_reproduction(name: str, out_dir: str, quick: bool = False) -> dict:
    repros = load_reproductions()
    if name not in repros:
        raise ValueError(f"name: unknown reproduction {name!r}; choose from {sorted(repros)}")
    os.makedirs(out_dir, exist_ok=True)
    summary = repros[name].fn(out_dir, quick)
    with open(os.path.join(out_dir, "results.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(out_dir, "results.json.tmp"), os.path.join(out_dir, "results.json"))
    return summary
