import re

import pytest
import torch

from catkit.data import (
    IGNORE,
    ByteTokenizer,
    arithmetic,
    copy_task,
    evaluate_answers,
    mqar,
    passkey,
    passkey_accuracy,
    passkey_min_len,
)

TOK = ByteTokenizer()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check_common(x, y, B, T):
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    scored = y != IGNORE
    assert not bool(scored[:, -1].any())
    # at every scored position the target is the next input (teacher forcing)
    nxt = torch.roll(x, -1, dims=1)
    assert torch.equal(y[scored], nxt[scored])
    return scored


def test_mqar_values_are_bound_to_keys(seed):
    B, N, Q, T, V = 16, 6, 4, 40, 50
    x, y = mqar(B, num_kv_pairs=N, seq_len=T, vocab_size=V, num_queries=Q, generator=_gen(seed))
    scored = _check_common(x, y, B, T)
    assert scored.sum(dim=1).tolist() == [Q] * B
    assert not bool(scored[:, : 2 * N].any())  # only queries after the context are scored
    n_keys = (V - 1) // 2
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0 : 2 * N : 2], row_x[1 : 2 * N : 2]
        assert len(set(keys)) == N and all(1 <= k <= n_keys for k in keys)
        assert all(n_keys < v < V for v in values)  # disjoint ranges
        binding = dict(zip(keys, values))
        queried = []
        for t in range(2 * N, T):
            if row_y[t] != IGNORE:
                assert row_y[t] == binding[row_x[t]]  # the target is the value bound to this key
                queried.append(row_x[t])
            elif row_x[t] in binding and (t - 2 * N) % 2 == 0:
                pytest.fail("unscored key in the query region")
        assert len(set(queried)) == Q
    x2, y2 = mqar(B, num_kv_pairs=N, seq_len=T, vocab_size=V, num_queries=Q, generator=_gen(seed))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_mqar_large_is_fast_and_default_queries():
    x, y = mqar(64, num_kv_pairs=64, seq_len=2048, vocab_size=8192, generator=_gen(0))
    assert ((y != IGNORE).sum(dim=1) == 64).all()


def test_mqar_errors():
    with pytest.raises(ValueError, match="seq_len"):
        mqar(2, num_kv_pairs=8, seq_len=31, vocab_size=100, generator=_gen(0))
    mqar(2, num_kv_pairs=8, seq_len=32, vocab_size=100, generator=_gen(0))
    with pytest.raises(ValueError, match="vocab_size"):
        mqar(2, num_kv_pairs=8, seq_len=64, vocab_size=16, generator=_gen(0))
    mqar(2, num_kv_pairs=8, seq_len=64, vocab_size=17, generator=_gen(0))
    with pytest.raises(ValueError, match="num_queries"):
        mqar(2, num_kv_pairs=4, seq_len=64, vocab_size=64, num_queries=5, generator=_gen(0))


@pytest.mark.parametrize("context_len", [passkey_min_len(), 300, 1000])
def test_passkey(seed, context_len):
    B = 8
    batch = passkey(B, context_len=context_len, generator=_gen(seed))
    x, y = batch
    scored = _check_common(x, y, B, context_len)
    assert scored.sum(dim=1).tolist() == [5] * B
    assert bool(scored[:, -6:-1].all())
    for i in range(B):
        text = TOK.decode(x[i])
        key = str(int(batch.answers[i]))
        assert len(key) == 5 and batch.answer_digits[i].tolist() == [int(c) for c in key]
        assert text.endswith("What is the pass key? The pass key is " + key)
        assert f"The pass key is {key}. Remember it." in text
        assert TOK.decode(y[i][scored[i]]) == key
    depths = {TOK.decode(x[i]).index("The pass key is") for i in range(B)}
    if context_len == 1000:
        assert len(depths) > 1  # the needle moves


def test_passkey_custom_filler_and_errors():
    filler = list(b"def f(x):\n    return x\n")
    x, _ = passkey(2, context_len=400, generator=_gen(1), filler=filler)
    assert "return x" in TOK.decode(x[0]) and x.shape == (2, 400)
    with pytest.raises(ValueError, match="context_len"):
        passkey(2, context_len=passkey_min_len() - 1, generator=_gen(0))
    with pytest.raises(ValueError, match="filler"):
        passkey(2, context_len=400, generator=_gen(0), filler=[300])


def test_passkey_accuracy():
    batch = passkey(4, context_len=256, generator=_gen(3))
    x, y = batch
    pred = torch.roll(x, -1, dims=1)  # a perfect model
    assert passkey_accuracy(pred, y) == 1.0
    logits = torch.nn.functional.one_hot(pred, ByteTokenizer.vocab_size).float()
    assert passkey_accuracy(logits, y) == 1.0
    pred[0, -2] = (pred[0, -2] - ord("0") + 1) % 10 + ord("0")  # one wrong digit in row 0
    assert passkey_accuracy(pred, y) == 0.75


def test_copy_task(seed):
    B, T = 8, 21
    x, y = copy_task(B, seq_len=T, vocab_size=10, generator=_gen(seed))
    scored = _check_common(x, y, B, T)
    L = (T - 1) // 2
    assert bool(scored[:, L : 2 * L].all()) and int(scored.sum()) == B * L
    assert torch.equal(x[:, :L], x[:, L + 1 : 2 * L + 1])
    assert bool((x[:, L] == 1).all()) and bool((x[:, :L] >= 2).all()) and bool((x[:, :L] < 10).all())
    x, y = copy_task(2, seq_len=20, vocab_size=10, generator=_gen(seed), segment_len=5)
    assert x[0, 11:].eq(0).all() and int((y != IGNORE).sum()) == 10
    with pytest.raises(ValueError, match="segment_len"):
        copy_task(2, seq_len=10, vocab_size=10, segment_len=5)


@pytest.mark.parametrize("max_digits", [1, 3, 25])
def test_arithmetic_answers_are_exact(seed, max_digits):
    B, T = 64, 4 * max_digits + 5
    x, y = arithmetic(B, max_digits=max_digits, seq_len=T, generator=_gen(seed))
    scored = _check_common(x, y, B, T)
    ops_seen = set()
    for i in range(B):
        row = x[i].tolist()
        body = [t for t in row if t != ByteTokenizer.PAD]
        assert row[: len(body)] == body  # padding only at the end
        text = bytes(body).decode()
        m = re.fullmatch(r"(\d+)([-+*])(\d+)=(-?\d+)", text)
        assert m, text
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert len(m[1]) <= max_digits and len(m[3]) <= max_digits
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
        ops_seen.add(op)
        assert TOK.decode(y[i][scored[i]]) == m[4]  # exactly the answer is scored
        assert int(scored[i].nonzero()[0]) == text.index("=")
        assert (y[i][torch.tensor(row) == ByteTokenizer.PAD] == IGNORE).all()
    assert ops_seen == {"+", "-", "*"}
    x2, _ = arithmetic(B, max_digits=max_digits, seq_len=T, generator=_gen(seed))
    assert torch.equal(x, x2)


def test_arithmetic_errors():
    with pytest.raises(ValueError, match="seq_len"):
        arithmetic(2, max_digits=3, seq_len=13, generator=_gen(0))
    arithmetic(2, max_digits=3, seq_len=14, generator=_gen(0))
    with pytest.raises(ValueError, match="max_digits"):
        arithmetic(2, max_digits=0, seq_len=14)
    with pytest.raises(ValueError, match="ops"):
        arithmetic(2, max_digits=2, seq_len=14, ops="/")


def test_evaluate_answers():
    y = torch.full((3, 6), IGNORE)
    y[0, 1:3] = torch.tensor([5, 6])
    y[1, 4] = 7
    pred = torch.zeros(3, 6, dtype=torch.int64)
    assert evaluate_answers(pred, y) == 0.0
    pred[0, 1:3] = torch.tensor([5, 6])
    assert evaluate_answers(pred, y) == 0.5  # row 2 has nothing scored and is left out
    pred[1, 4] = 7
    assert evaluate_answers(pred, y) == 1.0
    pred[0, 2] = 0
    assert evaluate_answers(pred, y) == 0.5  # partial answers do not count
    with pytest.raises(ValueError, match="pred_ids"):
        evaluate_answers(pred[:, :5], y)
    with pytest.raises(ValueError, match="targets"):
        evaluate_answers(pred, torch.full((3, 6), IGNORE))
