"""``NgramEmbedding``: token embedding averaged with hashed N-gram embeddings (LongCat-Flash-Lite).

e_i = amplify * norm?( (E_0[x_i] + sum_t P_t E_t[h_t(i)]) / (1 + n_tables) )

with tables t = (n-2)K + j for orders n = 2..N and K splits per order (spec:
``papers/ngram_embedding.md``; hash and boundary rule: ``catkit.ops.ngram.naive``). The per-table
projections P_t: R^{d_e} -> R^d are one ``[n_tables, d_e, d]`` parameter applied as one matmul of
the gathered ``[.., n_tables * d_e]`` rows against the stacked ``[n_tables * d_e, d]`` weight, which
is exactly sum_t P_t E_t[h_t] (a batched matmul summed over tables, done by the GEMM's reduction).

Decoding: ``NgramState`` keeps the last N-1 ids of every sequence on the tokens' device (0 where
the boundary rule cut them), so each step's ids are computed on the device from the state and the
new token, with no host round trip; the state update is pure tensor ops (CUDA-graph capturable).

Tables that do not fit one device (the paper puts 30B+ parameters in them). Everything that
touches the tables goes through two calls, ``rows = gather(tokens...)`` ([.., n_tables, d_e]) and
its backward (row gradients), so the storage can change without touching the model:

* Sharded across ranks (by table): rank r owns tables S_r and their projections. Each rank
  all-gathers the token ids of the step (T integers, cheap), hashes and gathers only its tables
  for all tokens, applies its slice of the stacked projection, and a reduce-scatter over tokens
  sums the partial outputs ``sum_{t in S_r} P_t E_t[h_t]`` -- the same pattern as a row-parallel
  linear. Backward is the reverse (all-gather of d-dim output gradients); row gradients and the
  optimizer state of a table never leave its rank, so no sparse gradient is communicated.
  ``table_offsets``/``NgramSpec`` already address tables independently, so a shard is a
  contiguous range of tables in the concatenated weight.
* Host memory: the concatenated weight lives in pinned CPU memory. Per step: ids on the GPU
  (``ngram_hash_ids``), ``unique`` rows (with inverse), copy the unique row numbers to the host,
  ``index_select`` them into a pinned staging buffer, copy it to the device asynchronously (the
  next batch's ids can be hashed a step ahead to overlap), then run the same fused gather on the
  compact buffer with the inverse indices. Backward accumulates into a compact
  ``[n_unique, d_e]`` fp32 buffer (the atomic kernel) that is copied back and applied by a
  row-sparse optimizer (row-wise Adam state kept next to the rows on the host).
This module implements the single-device case; the two above are the planned extensions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from catkit.layers.rmsnorm import RMSNorm
from catkit.ops.ngram import NgramSpec, next_context, ngram_embedding
from catkit.ops.ngram import naive as ngram_naive

# Keys of ``ModelConfig.ngram`` and their defaults.
NGRAM_DEFAULTS = {
    "max_n": 4,  # highest order N (orders 2..N)
    "n_splits": 4,  # K tables per order, differing only in modulus
    "table_ratio": 78.0,  # rows per table / vocab_size (table_base = even round-up of ratio * V)
    "table_base": None,  # explicit even base m (overrides table_ratio); table t has m + 2t + 1 rows
    "table_dim": None,  # d_e; None = d_model // (K (N-1)), at least 1
    "amplify": 1.0,  # scale of the averaged embedding (deep models need > 1)
    "norm": False,  # RMSNorm the averaged embedding before the scale
    "eos_id": None,  # end-of-document id: context before it is cut
    "use_kernel": None,  # None = fused Triton kernel wherever it can run; False = plain PyTorch
}


def ngram_options(opts: dict, vocab_size: int, d_model: int) -> dict:
    """Validate ``ModelConfig.ngram`` and return it with defaults filled and ``table_base`` set.

    Raises ``ValueError`` naming ``ngram.<key>``.
    """
    if not isinstance(opts, dict):
        raise ValueError(f"ngram: expected a dict of options or None, got {type(opts).__name__}")
    unknown = sorted(set(opts) - set(NGRAM_DEFAULTS))
    if unknown:
        raise ValueError(f"ngram: unknown key(s) {unknown}; known: {sorted(NGRAM_DEFAULTS)}")
    o = {**NGRAM_DEFAULTS, **opts}

    def pos_int(k, lo):
        v = o[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"ngram.{k}: expected an int >= {lo}, got {v!r}")

    pos_int("max_n", 2)
    pos_int("n_splits", 1)
    n_tables = o["n_splits"] * (o["max_n"] - 1)
    if o["table_dim"] is None:
        o["table_dim"] = max(1, d_model // n_tables)
    pos_int("table_dim", 1)
    if o["table_base"] is None:
        r = o["table_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 1:
            raise ValueError(f"ngram.table_ratio: expected a number >= 1 (rows per table / vocab), got {r!r}")
        base = math.ceil(r * vocab_size)
        o["table_base"] = base + base % 2  # even, so every table size m + 2t + 1 is odd
    elif "table_ratio" in opts:
        raise ValueError("ngram.table_base: give table_base or table_ratio, not both")
    b = o["table_base"]
    if isinstance(b, bool) or not isinstance(b, int) or b % 2 or b < vocab_size:
        raise ValueError(f"ngram.table_base: expected an even int >= vocab_size={vocab_size}, got {b!r}")
    a = o["amplify"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
        raise ValueError(f"ngram.amplify: expected a number > 0, got {a!r}")
    if not isinstance(o["norm"], bool):
        raise ValueError(f"ngram.norm: expected a bool, got {o['norm']!r}")
    e = o["eos_id"]
    if e is not None and (isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab_size):
        raise ValueError(f"ngram.eos_id: expected None or an int in [0, {vocab_size}), got {e!r}")
    if o["use_kernel"] not in (None, True, False):
        raise ValueError(f"ngram.use_kernel: expected None, True or False, got {o['use_kernel']!r}")
    return o


class NgramState:
    """Decode state: the last ``max_n - 1`` ids of each of ``B`` sequences (oldest first), on device."""

    def __init__(self, batch_size: int, max_n: int, device):
        self.context = torch.zeros(batch_size, max_n - 1, dtype=torch.int64, device=device)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.context.numel() * self.context.element_size()


class NgramEmbedding(nn.Module):
    """Input embedding of ``CatModel`` when ``ModelConfig.ngram`` is set.

    Args:
        vocab_size, d_model: as the model.
        max_n, n_splits, table_base, table_dim, amplify, norm, eos_id, use_kernel: see
            ``NGRAM_DEFAULTS`` (``table_base`` must be given here; ``ngram_options`` derives it).
        init_std: normal init of the token embedding and the tables; projections use 1/sqrt(d_e)
            so that each P_t E_t[h] starts at the token embedding's scale.

    ``weight`` ([V, d]) is the token embedding E_0, so a tied LM head keeps working.

    Example::

        emb = NgramEmbedding(259, 128, max_n=3, n_splits=2, table_base=2 * 259)
        x = emb(torch.randint(0, 259, (2, 10)))       # [2, 10, 128]
        state = emb.new_cache(2, "cpu")
        y = torch.cat([emb(ids[:, t:t+1], cache=state) for t in range(10)], 1)  # == x for ids
    """

    def __init__(self, vocab_size: int, d_model: int, *, max_n: int = 4, n_splits: int = 4, table_base: int,
                 table_dim: int | None = None, amplify: float = 1.0, norm: bool = False, eos_id: int | None = None,
                 use_kernel: bool | None = None, init_std: float = 0.02):
        super().__init__()
        opts = ngram_options(dict(max_n=max_n, n_splits=n_splits, table_base=table_base, table_dim=table_dim,
                                  amplify=amplify, norm=norm, eos_id=eos_id, use_kernel=use_kernel),
                             vocab_size, d_model)
        self.vocab_size, self.d_model = vocab_size, d_model
        self.max_n, self.n_splits, self.table_base = max_n, n_splits, opts["table_base"]
        self.d_e, self.amplify, self.eos_id, self.use_kernel = opts["table_dim"], float(amplify), eos_id, use_kernel
        self.spec = NgramSpec(vocab_size, max_n, n_splits, self.table_base)
        self.n_tables = self.spec.n_tables
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * init_std)
        self.tables = nn.Parameter(torch.randn(self.spec.num_rows, self.d_e) * init_std)
        self.proj = nn.Parameter(torch.randn(self.n_tables, self.d_e, d_model) / math.sqrt(self.d_e))
        self.norm = RMSNorm(d_model) if norm else None

    @classmethod
    def from_config(cls, cfg) -> "NgramEmbedding":
        o = ngram_options(cfg.ngram, cfg.vocab_size, cfg.d_model)
        return cls(cfg.vocab_size, cfg.d_model, max_n=o["max_n"], n_splits=o["n_splits"], table_base=o["table_base"],
                   table_dim=o["table_dim"], amplify=o["amplify"], norm=o["norm"], eos_id=o["eos_id"],
                   use_kernel=o["use_kernel"], init_std=cfg.init_std)

    def new_cache(self, batch_size: int, device=None) -> NgramState:
        return NgramState(batch_size, self.max_n, device or self.weight.device)

    def num_table_params(self) -> int:
        return self.tables.numel()

    def gather(self, tokens, *, cu_seqlens=None, context=None) -> torch.Tensor:
        """Rows of every table, ``[*tokens.shape, n_tables, d_e]`` (the storage seam; see module doc)."""
        kw = dict(self.spec.kwargs(), cu_seqlens=cu_seqlens, eos_id=self.eos_id, context=context)
        if self.use_kernel is False:
            return ngram_naive.ngram_embedding(tokens, self.tables, **kw)
        # arguments were checked when the layer was built and by the model (ids); skip the syncs
        return ngram_embedding(tokens, self.tables, spec=self.spec, **kw)

    def forward(self, input_ids: torch.Tensor, *, cache: NgramState | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: ``[B, L]`` int64 -> ``[B, L, d_model]``.

        ``cache`` continues each row after the ids seen so far (and records these); ``cu_seqlens``
        (``B == 1``) splits the row into packed sequences whose n-grams do not cross boundaries.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected [B, L], got shape {tuple(input_ids.shape)}")
        if cu_seqlens is not None:
            if cache is not None or input_ids.shape[0] != 1:
                raise ValueError("cu_seqlens: packed sequences need B == 1 and no decode cache")
            rows = self.gather(input_ids[0], cu_seqlens=cu_seqlens)[None]
        else:
            rows = self.gather(input_ids, context=cache.context if cache is not None else None)
        # sum_t P_t E_t[h_t]: one GEMM over the concatenated table dimension
        y = rows.flatten(-2) @ self.proj.flatten(0, 1).to(rows.dtype)
        e = (F.embedding(input_ids, self.weight) + y) / (1 + self.n_tables)
        if self.norm is not None:
            e = self.norm(e)
        if cache is not None:
            cache.context.copy_(next_context(input_ids, cache.context, max_n=self.max_n, eos_id=self.eos_id))
            cache.length += input_ids.shape[1]
        return e * self.amplify if self.amplify != 1.0 else e
