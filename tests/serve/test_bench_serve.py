"""CPU smoke run of the ``serve`` benchmark at toy sizes (the GPU run must not die on a Python error)."""

from catkit.bench.serve import run


def test_serve_bench_quick_cpu():
    rows = run(quick=True, device="cpu", log=lambda s: None, contexts=(130,), batches=(2,), new_tokens=6,
               train_seconds=1.0)
    modes = [r["mode"] for r in rows]
    assert modes == ["eager_plain", "plain", "spec_dense", "spec_sparse", "spec_sparse_a4", "spec_dense_g4"]
    assert all(r["correct"] for r in rows), [r.get("check") for r in rows]
    sparse = rows[3]
    assert sparse["keep_blocks"] == 2 and 0 < sparse["kv_read_frac"] < 1  # blocks really dropped at 130 > L0
    assert sparse["nll_verifier"] > 0 and sparse["nll_dense_target"] > 0
    assert 1 <= rows[2]["mean_accept_len"] <= 4
    assert rows[5]["gamma"] == 4 and 1 <= rows[5]["mean_accept_len"] <= 5  # the longer-draft sweep row
