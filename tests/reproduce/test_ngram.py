"""``catkit reproduce ngram --quick`` end to end on the CPU: points, matched pairs, report and plot."""

import json
import os

from catkit.reproduce import run_reproduction


def test_reproduce_ngram_quick(tmp_path):
    out = str(tmp_path / "ngram")
    summary = run_reproduction("ngram", out, quick=True)
    curves = [p["curve"] for p in summary["points"]]
    assert curves.count("base") == 1 and curves.count("experts") >= 1 and curves.count("ngram") >= 2
    active = {p["curve"]: p["active"] for p in summary["points"]}
    totals = {p["label"]: p["total"] for p in summary["points"]}
    # same activated parameters along the expert curve, more total parameters
    experts = [p for p in summary["points"] if p["curve"] in ("base", "experts")]
    assert len({p["active"] for p in experts}) == 1 or max(p["active"] for p in experts) < 1.1 * active["base"]
    assert max(totals.values()) > min(totals.values())
    for pair in summary["pairs"]:  # each N-gram point is sized to its expert point's total
        assert abs(pair["total_ngram"] - pair["total_experts"]) < 0.05 * pair["total_experts"]
        assert all(v == v and v < 10 for v in (pair["loss_experts"], pair["loss_ngram"]))
    for name in ("report.md", "results.json", "ngram_pareto.png", "points.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    report = open(os.path.join(out, "report.md")).read()
    assert "What the measurement says" in report and summary["verdict"] in report
    assert json.load(open(os.path.join(out, "results.json")))["verdict"] == summary["verdict"]
