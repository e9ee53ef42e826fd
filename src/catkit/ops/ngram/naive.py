"""Ground truth for hashed N-gram embeddings (spec: ``papers/ngram_embedding.md``).

Tables: for order n in 2..max_n and split j in 0..n_splits-1, table t = (n-2)*n_splits + j has
M_t = table_base + 2t + 1 rows (odd when ``table_base`` is even). Table t hashes the n-gram ending
at position i as the base-V number it spells, reduced modulo M_t:

    h_t(i) = (sum_{r=0}^{n-1} x_{i-r} * V^r) mod M_t

Boundary rule (the same everywhere in catkit): the context position p = i - r (r >= 1) contributes
nothing (is read as id 0) when p is before the start of its sequence, or when an end-of-document
token sits strictly between p and i (positions p+1 .. i-1). So the token after an EOS sees the EOS
itself as its only context (a start-of-document marker) and an EOS's own n-grams still read the
document it ends. ``context`` ([n_seq, max_n-1], oldest first) holds ids that precede each
sequence (e.g. a decode state); its entries are used as-is, so a decode state stores 0 where the
rule already cut the context.

Three references, from most literal to most useful:
- ``ngram_hash_ids_bigint``: plain Python lists and big integers (no modular shortcut at all).
- ``ngram_hash_ids``: vectorized int64 torch, coefficients V^r mod M_t (what the kernel computes).
- ``ngram_embedding``: ids + gather rows of the concatenated tables, differentiable.
"""

from __future__ import annotations

import torch


def table_sizes(vocab_size: int, max_n: int, n_splits: int, table_base: int) -> list[int]:
    """M_t = table_base + 2t + 1 for t in 0 .. n_splits*(max_n-1) - 1."""
    return [table_base + 2 * t + 1 for t in range(n_splits * (max_n - 1))]


def table_orders(max_n: int, n_splits: int) -> list[int]:
    """Order n of each table: n = 2 + t // n_splits."""
    return [2 + t // n_splits for t in range(n_splits * (max_n - 1))]


def table_offsets(sizes: list[int]) -> list[int]:
    """First row of each table in the concatenated ``[sum M_t, d_e]`` weight."""
    out, acc = [], 0
    for m in sizes:
        out.append(acc)
        acc += m
    return out


def hash_coefficients(vocab_size: int, max_n: int, n_splits: int, table_base: int) -> torch.Tensor:
    """``[n_tables, max_n]`` int64: V^r mod M_t for r < n_t, 0 for r >= n_t (unused orders)."""
    sizes = table_sizes(vocab_size, max_n, n_splits, table_base)
    orders = table_orders(max_n, n_splits)
    rows = [[pow(vocab_size, r, m) if r < n else 0 for r in range(max_n)] for m, n in zip(sizes, orders)]
    return torch.tensor(rows, dtype=torch.int64)


def _sequences(tokens: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[list[int]]:
    if tokens.ndim == 2:
        return [row.tolist() for row in tokens]
    flat = tokens.tolist()
    if cu_seqlens is None:
        return [flat]
    cu = cu_seqlens.tolist()
    return [flat[cu[s]:cu[s + 1]] for s in range(len(cu) - 1)]


def ngram_hash_ids_bigint(tokens, *, vocab_size, max_n, n_splits, table_base, cu_seqlens=None, eos_id=None,
                          context=None) -> torch.Tensor:
    """The spec read literally, one token at a time with Python big integers.

    tokens: ``[T]`` (with optional ``cu_seqlens``) or ``[B, L]`` (each row one sequence).
    Returns ``[T, n_tables]`` (or ``[B, L, n_tables]``) int64.
    """
    sizes = table_sizes(vocab_size, max_n, n_splits, table_base)
    orders = table_orders(max_n, n_splits)
    seqs = _sequences(tokens, cu_seqlens)
    ctx = context.tolist() if context is not None else [[0] * (max_n - 1) for _ in seqs]
    out = []
    for seq, pre in zip(seqs, ctx):
        full = list(pre) + list(seq)  # context first, so index c + i is token i
        c = len(pre)
        for i in range(len(seq)):
            window = [full[c + i]]  # window[r] = x_{i-r}, zeroed per the boundary rule
            cut = False
            for r in range(1, max_n):
                p = c + i - r
                if r >= 2 and eos_id is not None and full[p + 1] == eos_id:
                    cut = True
                window.append(0 if cut or p < 0 else full[p])
            row = []
            for m, n in zip(sizes, orders):
                number = sum(window[r] * vocab_size**r for r in range(n))  # exact big integer
                row.append(number % m)
            out.append(row)
    ids = torch.tensor(out, dtype=torch.int64).reshape(-1, len(sizes))
    return ids.reshape(*tokens.shape, len(sizes))


def context_windows(tokens: torch.Tensor, *, max_n: int, cu_seqlens=None, eos_id=None, context=None) -> torch.Tensor:
    """``[T, max_n]`` int64: column r is x_{i-r} with the boundary rule applied (0 where cut).

    tokens: ``[T]`` (+ ``cu_seqlens``) or ``[B, L]``; a 2-D input returns ``[B, L, max_n]``.
    """
    shape = tokens.shape
    tok = tokens.reshape(-1).long()
    T = tok.numel()
    dev = tok.device
    if tokens.ndim == 2:
        B, L = shape
        cu = torch.arange(B + 1, device=dev) * L
    elif cu_seqlens is None:
        cu = torch.tensor([0, T], device=dev)
    else:
        cu = cu_seqlens.to(dev).long()
    idx = torch.arange(T, device=dev)
    seq = torch.searchsorted(cu[1:], idx, right=True)
    start = cu[seq]
    n_seq = cu.numel() - 1
    ctx = context.to(dev).long() if context is not None else torch.zeros(n_seq, max_n - 1, dtype=torch.long, device=dev)
    cols = [tok]
    alive = torch.ones(T, dtype=torch.bool, device=dev)
    prev = tok
    for r in range(1, max_n):
        p = idx - r
        inside = p >= start
        from_tok = tok[p.clamp_min(0)]
        k = (max_n - 1 - (start - p)).clamp(0, max_n - 2)
        from_ctx = ctx[seq, k] if max_n > 1 else torch.zeros_like(tok)
        x = torch.where(inside, from_tok, from_ctx)
        if r >= 2 and eos_id is not None:
            alive = alive & (prev != eos_id)
        cols.append(torch.where(alive, x, torch.zeros_like(x)))
        prev = x
    return torch.stack(cols, 1).reshape(*shape, max_n)


def ngram_hash_ids(tokens, *, vocab_size, max_n, n_splits, table_base, cu_seqlens=None, eos_id=None,
                   context=None) -> torch.Tensor:
    """Vectorized int64 hash: ``[T, n_tables]`` (or ``[B, L, n_tables]``); same arguments as the kernel."""
    win = context_windows(tokens, max_n=max_n, cu_seqlens=cu_seqlens, eos_id=eos_id, context=context)
    coef = hash_coefficients(vocab_size, max_n, n_splits, table_base).to(win.device)  # [n_tables, N]
    mods = torch.tensor(table_sizes(vocab_size, max_n, n_splits, table_base), device=win.device)
    acc = torch.zeros(*win.shape[:-1], coef.shape[0], dtype=torch.int64, device=win.device)
    for r in range(max_n):  # reduce after every term, as the kernel does, so nothing overflows
        acc = (acc + win[..., r, None] * coef[:, r]) % mods
    return acc


def ngram_embedding(tokens, weight, *, vocab_size, max_n, n_splits, table_base, cu_seqlens=None, eos_id=None,
                    context=None) -> torch.Tensor:
    """Rows of every table: ``[T, n_tables, d_e]`` (or ``[B, L, n_tables, d_e]``), differentiable in weight.

    weight: ``[sum_t M_t, d_e]``, the tables concatenated in table order.
    """
    ids = ngram_hash_ids(tokens, vocab_size=vocab_size, max_n=max_n, n_splits=n_splits, table_base=table_base,
                         cu_seqlens=cu_seqlens, eos_id=eos_id, context=context)
    offs = torch.tensor(table_offsets(table_sizes(vocab_size, max_n, n_splits, table_base)), device=ids.device)
    return weight[ids + offs]


def next_context(tokens: torch.Tensor, context: torch.Tensor | None, *, max_n: int, eos_id=None) -> torch.Tensor:
    """The ``[B, max_n-1]`` context for the token after ``tokens`` ([B, L]): the last max_n-1 ids of
    ``context ++ tokens`` with the boundary rule applied for that next position. Pure tensor ops, so
    it runs on the device and inside CUDA graphs.
    """
    B = tokens.shape[0]
    if context is None:
        context = torch.zeros(B, max_n - 1, dtype=torch.long, device=tokens.device)
    w = torch.cat([context.long(), tokens.long()], 1)[:, -(max_n - 1):]
    if eos_id is None:
        return w
    is_eos = (w == eos_id).long()
    # entry j is cut when an EOS sits at a later entry j' > j (strictly between it and the next token)
    later = is_eos.flip(1).cumsum(1).flip(1) - is_eos
    return torch.where(later > 0, torch.zeros_like(w), w)
