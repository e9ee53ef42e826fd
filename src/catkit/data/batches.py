"""Turning documents into training batches.

Three ways, for three kinds of model input:

* :class:`PackedDataset`: all documents joined by ``EOS`` into one token stream; random windows
  for training, non-overlapping windows in order for validation. Windows cross documents, which
  is the usual, cheapest choice for pre-training.
* :func:`varlen_batch`: whole documents packed into one row plus ``cu_seqlens``, for kernels that
  keep documents apart (flash-attn / fla variable-length convention).
* :class:`DocumentDataset`: windows that never cross a document boundary, for when a padded
  ``[B, T]`` batch must still hold one document per row.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .tokenizer import ByteTokenizer

Docs = Sequence[Sequence[int]] | Sequence[bytes]


def _doc_tensors(docs, tokenizer, name: str = "docs") -> list[torch.Tensor]:
    """Each document as a 1-D int64 tensor; bytes/str go through ``tokenizer``."""
    if isinstance(docs, (bytes, str, torch.Tensor)) or not hasattr(docs, "__len__"):
        raise ValueError(f"{name}: expected a list of documents, got {type(docs).__name__}")
    if len(docs) == 0:
        raise ValueError(f"{name}: expected at least one document, got an empty list")
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    out = []
    for i, doc in enumerate(docs):
        if isinstance(doc, (bytes, bytearray, memoryview)):
            if isinstance(tok, ByteTokenizer):
                # Byte ids are the bytes themselves: frombuffer skips a Python list of ints,
                # which matters for a 10 MB corpus.
                raw = bytearray(doc)
                t = torch.zeros(0, dtype=torch.int64)
                if raw:
                    t = torch.frombuffer(raw, dtype=torch.uint8).to(torch.int64)
            else:
                t = torch.tensor(tok.encode_bytes(bytes(doc)), dtype=torch.int64)
        elif isinstance(doc, str):
            t = torch.tensor(tok.encode(doc), dtype=torch.int64)
        elif isinstance(doc, torch.Tensor):
            if doc.ndim != 1 or doc.is_floating_point() or doc.is_complex():
                raise ValueError(
                    f"{name}: document {i} must be a 1-D integer tensor, got {doc.dtype} {tuple(doc.shape)}"
                )
            t = doc.to(device="cpu", dtype=torch.int64)
        else:
            try:
                t = torch.as_tensor(list(doc), dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"{name}: document {i} is not bytes, str or a sequence of ints") from None
            if t.ndim != 1:
                raise ValueError(f"{name}: document {i} must be a flat sequence of ints")
        out.append(t)
    return out


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


class PackedDataset:
    """All documents in one int64 token stream, each followed by ``EOS``.

    Args:
        docs: ``list[bytes]`` (tokenised with ``tokenizer``, default :class:`ByteTokenizer`),
            ``list[str]`` or ``list[list[int]]`` of token ids.
        seq_len: window length ``T``.
        tokenizer: used for bytes/str documents.
        eos_id: separator appended after every document (default ``ByteTokenizer.EOS`` = 257).

    Attributes:
        tokens: ``[N]`` int64, ``N = sum(len(doc) + 1)``.

    Example::

        ds = PackedDataset(load_corpus("train", max_bytes=1_000_000), seq_len=256)
        x, y = ds.sample(8, torch.Generator().manual_seed(0))   # [8, 256] each; y[:, :-1] == x[:, 1:]
    """

    def __init__(self, docs: Docs, seq_len: int, *, tokenizer=None, eos_id: int = ByteTokenizer.EOS):
        _check_positive("seq_len", seq_len)
        parts = _doc_tensors(docs, tokenizer)
        sep = torch.tensor([eos_id], dtype=torch.int64)
        pieces = []
        for p in parts:
            pieces.append(p)
            pieces.append(sep)
        self.tokens = torch.cat(pieces)
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.num_docs = len(parts)
        if self.tokens.numel() < seq_len + 1:
            raise ValueError(
                f"seq_len: sequence length {seq_len} is larger than the corpus "
                f"({self.tokens.numel()} tokens; a window needs seq_len + 1 for the shifted targets)"
            )

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, *, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: ``(inputs [B, T], targets [B, T])`` int64, ``targets[:, t] = tokens[s + t + 1]``.

        Start positions are uniform over every valid offset; the same generator state gives the
        same batch.
        """
        _check_positive("batch_size", batch_size)
        T = self.seq_len
        starts = torch.randint(0, self.tokens.numel() - T, (batch_size,), generator=generator)
        window = self.tokens[starts[:, None] + torch.arange(T + 1)]  # [B, T + 1]
        x, y = window[:, :-1], window[:, 1:]
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

    def num_eval_windows(self) -> int:
        """How many non-overlapping windows :meth:`iter_eval` yields in total."""
        return (self.tokens.numel() - 1) // self.seq_len

    def iter_eval(
        self, batch_size: int, max_batches: int | None = None, *, device=None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows in stream order, ``batch_size`` at a time (the last batch may
        be smaller). Window ``k`` predicts tokens ``k*T + 1 .. k*T + T``, so every token after the
        first is scored at most once. Deterministic.
        """
        _check_positive("batch_size", batch_size)
        if max_batches is not None:
            _check_positive("max_batches", max_batches)
        T = self.seq_len
        n = self.num_eval_windows()
        offsets = torch.arange(T + 1)
        for i, first in enumerate(range(0, n, batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            starts = torch.arange(first, min(first + batch_size, n)) * T
            window = self.tokens[starts[:, None] + offsets]
            x, y = window[:, :-1], window[:, 1:]
            if device is not None:
                x, y = x.to(device), y.to(device)
            yield x, y


def varlen_batch(docs: Docs, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack whole documents, in order, into one row for variable-length kernels.

    Documents are taken from the front of ``docs`` while they fit in ``max_tokens``; packing stops
    before the first one that does not fit. If the very first document is longer than
    ``max_tokens`` it is truncated to ``max_tokens`` so the batch is never empty. The number of
    documents used is ``len(cu_seqlens) - 1``, so a caller can continue with ``docs[n:]``.

    Returns:
        tokens: ``[1, total]`` int64.
        cu_seqlens: ``[n + 1]`` int32, ``cu_seqlens[0] == 0``, strictly increasing,
            ``cu_seqlens[-1] == total`` (the flash-attn / fla convention): document ``i`` is
            ``tokens[0, cu_seqlens[i]:cu_seqlens[i + 1]]``.

    Example::

        tokens, cu = varlen_batch([[1, 2, 3], [4, 5], [6, 7, 8, 9]], max_tokens=6)
        # tokens = [[1, 2, 3, 4, 5]], cu = [0, 3, 5]
    """
    _check_positive("max_tokens", max_tokens)
    parts = _doc_tensors(docs, None)
    taken: list[torch.Tensor] = []
    total = 0
    for i, p in enumerate(parts):
        if p.numel() == 0:
            raise ValueError(f"docs: document {i} is empty (cu_seqlens must be strictly increasing)")
        if i == 0 and p.numel() > max_tokens:
            p = p[:max_tokens]
        if total + p.numel() > max_tokens:
            break
        taken.append(p)
        total += p.numel()
    lengths = torch.tensor([p.numel() for p in taken], dtype=torch.int64)
    cu_seqlens = torch.zeros(len(taken) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return torch.cat(taken)[None, :], cu_seqlens


class DocumentDataset:
    """Windows of ``seq_len`` tokens that never cross a document boundary.

    Each document gets an ``EOS`` appended (as in :class:`PackedDataset`), so a document of
    ``L`` tokens holds windows when ``L >= seq_len``; shorter documents are never sampled.
    Windows are uniform over all valid (document, offset) pairs, so long documents are sampled
    in proportion to their length.

    Example::

        ds = DocumentDataset(load_corpus("train", max_bytes=1_000_000), seq_len=512)
        x, y = ds.sample(4, torch.Generator().manual_seed(0))   # [4, 512] each, one document per row
    """

    def __init__(self, docs: Docs, seq_len: int, *, tokenizer=None, eos_id: int = ByteTokenizer.EOS):
        _check_positive("seq_len", seq_len)
        parts = _doc_tensors(docs, tokenizer)
        lengths = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
        longest = int(lengths.max())
        if longest < seq_len:
            raise ValueError(
                f"seq_len: sequence length {seq_len} is larger than any document (longest {longest})"
            )
        sep = torch.tensor([eos_id], dtype=torch.int64)
        self.tokens = torch.cat([t for p in parts for t in (p, sep)])
        self.seq_len = seq_len
        self.eos_id = eos_id
        full = lengths + 1  # with EOS
        self.doc_starts = torch.cumsum(full, 0) - full  # [n_docs]
        self.doc_lengths = full
        # A window reads seq_len + 1 tokens, so a document with EOS of length F has F - seq_len starts.
        counts = (full - seq_len).clamp(min=0)
        self._cum_counts = torch.cumsum(counts, 0)
        self.num_windows = int(self._cum_counts[-1])

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, *, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs [B, T], targets [B, T])`` int64 windows, each inside a single document."""
        _check_positive("batch_size", batch_size)
        T = self.seq_len
        u = torch.randint(0, self.num_windows, (batch_size,), generator=generator)
        doc = torch.searchsorted(self._cum_counts, u, right=True)  # first doc whose cum count > u
        before = self._cum_counts[doc] - (self.doc_lengths[doc] - T).clamp(min=0)
        starts = self.doc_starts[doc] + (u - before)
        window = self.tokens[starts[:, None] + torch.arange(T + 1)]
        x, y = window[:, :-1], window[:, 1:]
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

    def iter_eval(
        self, batch_size: int, max_batches: int | None = None, *, device=None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows inside each document, documents in order. Deterministic."""
        _check_positive("batch_size", batch_size)
        if max_batches is not None:
            _check_positive("max_batches", max_batches)
        T = self.seq_len
        per_doc = (self.doc_lengths - 1) // T  # windows of T + 1 tokens stepping by T
        doc = torch.repeat_interleave(torch.arange(per_doc.numel()), per_doc)
        k = torch.arange(doc.numel()) - (torch.cumsum(per_doc, 0) - per_doc)[doc]
        starts = self.doc_starts[doc] + k * T
        offsets = torch.arange(T + 1)
        for i, first in enumerate(range(0, starts.numel(), batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            window = self.tokens[starts[first:first + batch_size, None] + offsets]
            x, y = window[:, :-1], window[:, 1:]
            if device is not None:
                x, y = x.to(device), y.to(device)
            yield x, y
