"""Put the winners a kernel sweep printed first in this checkout's option lists.

Usage: python3 scripts/apply_sweep_best.py LOG [LOG ...]

Reads the ``BEST_FWD_OPTION=`` / ``BEST_BWD_OPTION=`` lines of scripts/sweep_delta_fwd_variants.py
and scripts/sweep_delta_bwd_variants.py logs (python literal dicts: kernel, option, ms,
default_ms, and for the forward sweep the hook's name) and sets each winning hook, a module-level
``NAME = None`` in src/catkit/ops/delta_rule/*.py, to the option. A winner must beat the default
by more than MARGIN (timing noise); a hook already set is left alone. Meant for a device copy
inside one GPU call (sweep -> apply -> tests -> bench); commit what it printed by hand.
"""

import ast
import pathlib
import re
import sys

MARGIN = 0.03
ROOT = pathlib.Path(__file__).resolve().parent.parent / "src" / "catkit" / "ops" / "delta_rule"
BWD_HOOKS = {"chunk_bwd_dqkg_inter_kernel": "DQKG_INTER_BEST", "chunk_bwd_dqkg_intra_kernel": "DQKG_INTRA_BEST",
             "chunk_bwd_dap_kernel": "DAP_BEST"}


def winners(paths):
    for path in paths:
        for line in pathlib.Path(path).read_text().splitlines():
            m = re.match(r"BEST_(FWD|BWD)_OPTION=(.*)$", line.strip())
            if not m:
                continue
            text = m.group(2).split("  #")[0].strip()
            if text == "None":
                continue
            best = ast.literal_eval(text)
            hook = best.get("hook") or BWD_HOOKS.get(best.get("kernel"))
            if hook and best.get("option") and best["ms"] < (1 - MARGIN) * best["default_ms"]:
                yield hook, best


def apply(hook: str, option: dict) -> str:
    for f in sorted(ROOT.glob("*.py")):
        src = f.read_text()
        pat = re.compile(rf"^{re.escape(hook)} = None$", re.M)
        if pat.search(src):
            f.write_text(pat.sub(f"{hook} = {option!r}", src, count=1))
            return f"{f.name}: {hook} = {option!r}"
    return f"{hook}: no '{hook} = None' line found (already set?), left alone"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    applied = 0
    for hook, best in winners(sys.argv[1:]):
        print(f"apply_sweep_best: {apply(hook, best['option'])}  ({best['ms']:.4f} vs {best['default_ms']:.4f} ms)")
        applied += 1
    print(f"apply_sweep_best: {applied} winner(s) applied")


if __name__ == "__main__":
    main()
