import pytest
import torch

from catkit.data import ByteTokenizer, DocumentDataset, PackedDataset, load_corpus, varlen_batch

EOS = ByteTokenizer.EOS


def _random_docs(gen, n, lo, hi, vocab=200):
    lens = torch.randint(lo, hi, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (L,), generator=gen).tolist() for L in lens]


def test_packed_tokens_layout():
    ds = PackedDataset([b"ab", b"c"], seq_len=2)
    assert ds.tokens.dtype == torch.int64
    assert ds.tokens.tolist() == [97, 98, EOS, 99, EOS]
    ds = PackedDataset([[5, 6], [7]], seq_len=1, eos_id=0)
    assert ds.tokens.tolist() == [5, 6, 0, 7, 0]


def test_packed_sample_shapes_shift_determinism(seed):
    gen = torch.Generator().manual_seed(seed)
    docs = _random_docs(gen, 20, 1, 60)
    ds = PackedDataset(docs, seq_len=17)
    x, y = ds.sample(8, torch.Generator().manual_seed(seed))
    assert x.shape == y.shape == (8, 17) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # every row is a real window of the stream
    stream = ds.tokens.tolist()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        w = row_x + row_y[-1:]
        assert any(stream[s : s + 18] == w for s in range(len(stream) - 17))
    x2, y2 = ds.sample(8, torch.Generator().manual_seed(seed))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = ds.sample(8, torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(x, x3)


def test_packed_iter_eval():
    ds = PackedDataset([list(range(100))], seq_len=10)  # 101 tokens with EOS
    batches = list(ds.iter_eval(4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2] and ds.num_eval_windows() == 10
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    assert torch.equal(xs.flatten(), ds.tokens[:100])  # non-overlapping, in order
    assert torch.equal(ys.flatten(), ds.tokens[1:101])
    assert len(list(ds.iter_eval(4, max_batches=2))) == 2
    again = [b[0] for b in ds.iter_eval(4)]
    assert all(torch.equal(a, b[0]) for a, b in zip(again, batches))


def test_packed_on_corpus():
    ds = PackedDataset(load_corpus("val", max_bytes=100_000), seq_len=64)
    x, y = ds.sample(4, torch.Generator().manual_seed(0))
    assert int(x.max()) <= EOS and int(x.min()) >= 0


def test_packed_errors():
    with pytest.raises(ValueError, match="docs"):
        PackedDataset([], seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset([b"abc"], seq_len=0)
    with pytest.raises(ValueError, match="larger than the corpus"):
        PackedDataset([b"abc"], seq_len=4)  # 4 tokens with EOS; a window needs 5
    PackedDataset([b"abc"], seq_len=3)


def test_varlen_batch_invariants(seed):
    gen = torch.Generator().manual_seed(seed)
    docs = _random_docs(gen, 30, 1, 40)
    for max_tokens in (1, 17, 100, 10_000):
        tokens, cu = varlen_batch(docs, max_tokens)
        assert tokens.dtype == torch.int64 and cu.dtype == torch.int32
        assert tokens.ndim == 2 and tokens.shape[0] == 1
        n = cu.numel() - 1
        assert n >= 1 and cu[0] == 0 and cu[-1] == tokens.shape[1] <= max_tokens
        assert bool((cu[1:] > cu[:-1]).all())
        for i in range(n):  # each document lands whole (the first may be truncated), in order
            piece = tokens[0, cu[i] : cu[i + 1]].tolist()
            assert piece == (docs[i][: max_tokens] if i == 0 else docs[i])
        if n < len(docs) and n > 0:
            assert cu[-1] + len(docs[n]) > max_tokens  # stopped only because the next doc did not fit
    tokens, cu = varlen_batch(docs, 10_000)
    assert cu.numel() == 31 and tokens.shape[1] == sum(map(len, docs))


def test_varlen_batch_errors():
    with pytest.raises(ValueError, match="max_tokens"):
        varlen_batch([[1]], 0)
    with pytest.raises(ValueError, match="docs"):
        varlen_batch([], 4)
    with pytest.raises(ValueError, match="docs"):
        varlen_batch([[1], []], 4)


def test_document_dataset_stays_inside_documents(seed):
    gen = torch.Generator().manual_seed(seed)
    # distinct token ranges per document make a boundary crossing detectable
    docs = [list(range(100 * i, 100 * i + L)) for i, L in enumerate([5, 40, 12, 70, 3])]
    ds = DocumentDataset(docs, seq_len=12)
    x, y = ds.sample(256, torch.Generator().manual_seed(seed))
    assert x.shape == y.shape == (256, 12)
    assert torch.equal(x[:, 1:], y[:, :-1])
    w = torch.cat([x, y[:, -1:]], dim=1)
    body = w[:, :-1]
    assert not bool((body == EOS).any())  # EOS can only be the last target
    assert bool(((body // 100) == (body[:, :1] // 100)).all())
    docs_hit = set((x[:, 0] // 100).tolist())
    assert docs_hit <= {1, 2, 3} and {1, 3} <= docs_hit  # too-short docs 0 and 4 never sampled
    x2, _ = ds.sample(256, torch.Generator().manual_seed(seed))
    assert torch.equal(x, x2)
    ev = list(ds.iter_eval(3))
    assert sum(b[0].shape[0] for b in ev) == 40 // 12 + 12 // 12 + 70 // 12
    for bx, by in ev:
        assert bool(((bx // 100) == (bx[:, :1] // 100)).all())


def test_document_dataset_error():
    with pytest.raises(ValueError, match=r"sequence length 50 is larger than any document \(longest 40\)"):
        DocumentDataset([[1] * 10, [2] * 40], seq_len=50)
    DocumentDataset([[1] * 10, [2] * 40], seq_len=40)
