"""Static-shape decode, verify and speculative loops for dense-attention ``CatModel`` s (CUDA graphs).

A small model's decode step is a few hundred tiny kernels, so eager PyTorch spends more time in
Python and launches than on the GPU. Everything here keeps tensor shapes fixed per call shape and
the cache length in a DEVICE scalar, so one step can be captured once as a CUDA graph and replayed
(:class:`StepGraph`; ``use_graph=False`` runs the same function eagerly, the plain path):

* :class:`StaticKV`: per layer a contiguous ``[B, max_len, H_kv, D]`` key/value buffer viewed as
  pages of ``page`` tokens (identity block table), ``pos`` = cached tokens per row (a device
  ``[B]`` tensor, so rows of a speculative batch keep their own accepted lengths), and per anchor
  layer fp32 block key sums for sparse selection.
* :func:`fast_forward`: the model's forward over ``T`` new tokens at positions ``pos..pos+T-1``.
  ``prefill=True`` (eager, empty cache): SDPA causal. Otherwise attention is split in two parts
  merged by their log-sum-exp: the cached prefix through ``paged_decode_attention`` (split-KV
  Triton kernel; the ``T`` queries ride in the GQA group dimension so each KV block is read once
  for all of them; dense, or only the blocks picked by sparse selection) and the ``T x T`` causal
  part among the new tokens in PyTorch.
* Sparse selection (:class:`SparseSpec`): the query of the first new position scores each prefix
  block by its mean key (summed over the KV group's query heads), the sink and last blocks are
  forced, the top ``keep_blocks`` blocks are read; computed at anchor layers, reused by the layers
  after. Block sums are kept in ``StaticKV`` and only the last two prefix blocks are re-summed per
  call (a verify call advances the prefix by at most ``gamma + 1 <= block`` tokens, so every block
  is re-summed once it is complete). ``keep_blocks`` is fixed per capture (from the prefix length
  at capture time); ``keep_blocks >= blocks`` keeps everything (then equal to dense).
* :func:`greedy_decode` / :func:`greedy_speculative` / :func:`teacher_forced_nll`: the loops.

The per-layer elementwise work (norms, RoPE, the causal chunk part and merge, residuals, SwiGLU,
selection scoring) can run through ``torch.compile`` (``StepGraph(compile=True)``: fewer, fused
kernels inside the graph); the plain path (``compile=False``) runs the same functions eagerly.

Scope: dense attention (letter ``A``), SwiGLU FFNs, no N-gram embedding; equal-length prompts.
Greedy only (the lossless sampling rule lives in :mod:`catkit.serve.speculative`). Attention
sparsity only (FFN/MoE skipping is in the eager :mod:`catkit.serve.sparse_verify`: its data-
dependent shapes do not fit a static graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from catkit.layers.rope import apply_rope, rope_cos_sin


def check_fast_model(model, name: str = "model") -> None:
    """Raise ``ValueError`` unless ``model`` is a dense-attention, SwiGLU, plain-embedding CatModel."""
    from catkit.layers.mlp import SwiGLU

    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        raise ValueError(f"{name}: expected a catkit CatModel, got {type(model).__name__}")
    if set(cfg.pattern) != {"A"} or {b.mixer.mode for b in model.blocks} != {"dense"}:
        raise ValueError(f"{name}: the fast decode path supports dense attention layers only, pattern {cfg.pattern!r}")
    if cfg.ngram:
        raise ValueError(f"{name}: the fast decode path does not support the N-gram embedding")
    if not all(isinstance(b.ffn, SwiGLU) for b in model.blocks):
        raise ValueError(f"{name}: the fast decode path supports SwiGLU FFNs only (no MoE)")
    if cfg.dim_head not in (16, 32, 64, 128):
        raise ValueError(f"{name}: head dim {cfg.dim_head} not supported by the decode kernel (16/32/64/128)")


@dataclass
class SparseSpec:
    """Sparse attention for the verify pass (see the module doc).

    block_size: tokens per selection block (64 or 128); dense_below: L0, prefixes of at most this
    many tokens are read densely; rho: share of the tokens beyond L0 kept; anchor_layers: layers
    that select (layer 0 always does); ``None`` = every layer.
    """

    block_size: int = 128
    dense_below: int = 2048
    rho: float = 0.1
    anchor_layers: tuple | None = None

    def __post_init__(self):
        if self.block_size not in (64, 128):
            raise ValueError(f"block_size: expected 64 or 128, got {self.block_size!r}")
        if not isinstance(self.dense_below, int) or self.dense_below < 0:
            raise ValueError(f"dense_below: expected an int >= 0, got {self.dense_below!r}")
        if not 0 <= self.rho <= 1:
            raise ValueError(f"rho: expected in [0, 1], got {self.rho}")

    def is_anchor(self, layer: int) -> bool:
        return layer == 0 or self.anchor_layers is None or layer in self.anchor_layers

    def keep_blocks(self, prefix: int) -> int | None:
        """Blocks read for a prefix of ``prefix`` tokens; ``None`` = all (dense)."""
        nb = -(-prefix // self.block_size)
        if prefix <= self.dense_below:
            return None
        keep = max(2, math.ceil((self.dense_below + self.rho * (prefix - self.dense_below)) / self.block_size))
        return None if keep >= nb else keep


class StaticKV:
    """Fixed KV buffers for one model and batch; ``pos`` (device int64 ``[B]``) = cached tokens per row."""

    def __init__(self, model, batch: int, max_len: int, *, page: int = 128, anchors: tuple = (), device=None,
                 dtype=None):
        cfg = model.cfg
        device = device or model.embed.weight.device
        dtype = dtype or model.embed.weight.dtype
        self.page = page
        self.max_len = -(-max_len // page) * page
        self.hk, self.d = cfg.kv_heads, cfg.dim_head
        shape = (batch, self.max_len, self.hk, self.d)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = torch.zeros(batch, dtype=torch.int64, device=device)
        n_pages = self.max_len // page
        self.table = (torch.arange(batch, device=device)[:, None] * n_pages
                      + torch.arange(n_pages, device=device)[None, :]).to(torch.int32)
        self.batch = batch
        self.sums: dict[int, torch.Tensor] = {}  # anchor layer -> fp32 [B, max_len / sel_block, Hk, D]
        self.sel_block = None

    def pages(self, layer: int):
        return (self.k[layer].view(-1, self.page, self.hk, self.d), self.v[layer].view(-1, self.page, self.hk, self.d))

    def set_length(self, n) -> None:
        """Every row's length to ``n`` (an int), or per row (a device tensor [B]; not checked)."""
        if isinstance(n, torch.Tensor):
            self.pos.copy_(n)
            return
        if not 0 <= n <= self.max_len:
            raise ValueError(f"n: expected a length in [0, {self.max_len}], got {n}")
        self.pos.fill_(n)

    def copy_from(self, other: "StaticKV", length: int) -> None:
        """Copy ``other``'s first ``length`` cached tokens (and its block sums) into this cache."""
        for dst, src in zip(self.k + self.v, other.k + other.v):
            dst[:, :length].copy_(src[:, :length])
        for i, s in other.sums.items():
            if i not in self.sums or self.sums[i].shape != s.shape:
                self.sums[i] = torch.zeros_like(s)
            self.sums[i].copy_(s)
        self.sel_block = other.sel_block
        self.pos.fill_(length)

    def init_sums(self, spec: SparseSpec, n_layers: int, length: int) -> None:
        """Block key sums of the first ``length`` tokens at every anchor layer (once, after prefill)."""
        bs = spec.block_size
        nb = self.max_len // bs
        self.sel_block = bs
        for i in range(n_layers):
            if not spec.is_anchor(i):
                continue
            s = torch.zeros(self.batch, nb, self.hk, self.d, dtype=torch.float32, device=self.pos.device)
            full = -(-length // bs)
            kk = F.pad(self.k[i][:, :length].float(), (0, 0, 0, 0, 0, full * bs - length))
            s[:, :full] = kk.view(self.batch, full, bs, self.hk, self.d).sum(2)
            self.sums[i] = s


def _rms(x, w, eps: float):
    """RMSNorm with the module's arithmetic (fp32 inside), as a plain function for fusion."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def _pre(x, norm_w, eps: float, qkv_w, cos, sin, hq: int, hk: int, d: int):
    """Norm + QKV projection + RoPE; also the queries packed for the kernel ([B, Hk * T * G, D])."""
    b, t, _ = x.shape
    q, k, v = F.linear(_rms(x, norm_w, eps), qkv_w).view(b, t, hq + 2 * hk, d).split([hq, hk, hk], dim=2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # the t queries join the GQA group: head (j, t, g) -> j * t * g + t * g + g, kernel group = t * g
    qp = q.reshape(b, t, hk, hq // hk, d).permute(0, 2, 1, 3, 4).reshape(b, hk * t * (hq // hk), d)
    return q, k, v, qp


def _merge(o_p, lse_p, q, k, v):
    """Prefix part (kernel output, lse) + causal part among the new tokens, merged by log-sum-exp."""
    b, t, hq, d = q.shape
    hk = k.shape[2]
    g = hq // hk
    o_p = o_p.float().view(b, hk, t, g, d).transpose(2, 3)  # [b, hk, g, t, d]
    lse_p = lse_p.view(b, hk, t, g).transpose(2, 3)
    qc = q.float().view(b, t, hk, g, d).permute(0, 2, 3, 1, 4)  # [b, hk, g, t, d]
    kc = k.float().permute(0, 2, 1, 3)[:, :, None]  # [b, hk, 1, t, d]
    vc = v.float().permute(0, 2, 1, 3)[:, :, None]
    # t <= gamma + 1 is tiny: broadcast-and-sum instead of batched matmuls lets the compiler fuse
    # the whole causal part into a couple of kernels
    s = (qc[..., :, None, :] * kc[..., None, :, :]).sum(-1) * (1.0 / math.sqrt(d))  # [b, hk, g, t, t]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    lse_c = s.logsumexp(-1)
    o_c = (torch.softmax(s, -1)[..., None] * vc[..., None, :, :]).sum(-2)
    m = torch.maximum(lse_p, lse_c)
    w_p, w_c = torch.exp(lse_p - m), torch.exp(lse_c - m)
    o = (o_p * w_p[..., None] + o_c * w_c[..., None]) / (w_p + w_c)[..., None]
    return o.permute(0, 3, 1, 2, 4).reshape(b, t, hq * d).to(q.dtype)


def _post(x, o, out_w, norm_w, eps: float, gu_w, down_w):
    """Output projection + residual + FFN norm + SwiGLU + residual."""
    x = x + F.linear(o, out_w)
    gate, up = F.linear(_rms(x, norm_w, eps), gu_w).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down_w)


def _head(x, norm_w, eps: float, w):
    return F.linear(_rms(x, norm_w, eps), w)


def _prologue(pos, t: int, d: int, theta: float, dtype: torch.dtype):
    """Per-step index math: positions [B, T], row ids, RoPE tables, kernel lengths (prefix, prefix + 1)."""
    b = pos.shape[0]
    positions = pos[:, None] + torch.arange(t, device=pos.device)
    rows = torch.arange(b, device=pos.device)[:, None].expand(b, t)
    cos, sin = rope_cos_sin(positions, d, theta, dtype=dtype)
    return positions, rows, cos, sin, pos.to(torch.int32), (pos + 1).to(torch.int32)


def _score(q0, k_cache, sums, past, keep: int, bs: int):
    """Block selection from ``sums`` with the last two prefix blocks re-summed (functional).

    Returns (block ids int32 [B, Hk, keep] sorted, fresh sums of those two blocks, their ids).
    """
    b, hq, d = q0.shape
    hk = k_cache.shape[2]
    dev = q0.device
    nb_all = sums.shape[1]
    rows = torch.arange(b, device=dev)[:, None]
    nb = (past + bs - 1) // bs  # [B]
    blocks = (nb[:, None] - 2 + torch.arange(2, device=dev)).clamp_min(0)  # [B, 2]
    pos = (blocks[..., None] * bs + torch.arange(bs, device=dev)).view(b, 2 * bs)
    valid = (pos < past[:, None]).view(b, 2, bs, 1, 1)
    fresh = (k_cache[rows, pos].view(b, 2, bs, hk, d).float() * valid).sum(2)  # [B, 2, Hk, D]
    sums = sums.index_put((rows.expand(b, 2), blocks), fresh)
    cnt = (past[:, None] - torch.arange(nb_all, device=dev) * bs).clamp(0, bs).float()  # [B, nb_all]
    mean = sums / cnt.clamp_min(1.0)[:, :, None, None]
    score = torch.einsum("bhgd,bnhd->bhn", q0.float().view(b, hk, hq // hk, d), mean)
    score = score.masked_fill((cnt == 0)[:, None], float("-inf"))
    idx = torch.arange(nb_all, device=dev)
    # the sink block and the last prefix block are always read
    force = (idx == 0) | (idx == (nb - 1).clamp_min(0)[:, None])
    score = score.masked_fill(force[:, None], float("inf"))
    return score.topk(keep, dim=-1).indices.sort(-1).values.to(torch.int32), fresh, blocks


class _Fns:
    """The step's pieces, eager or compiled (``torch.compile``, static shapes, eager fallback)."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.failed: dict = {}
        for name in ("pre", "merge", "post", "head", "score", "prologue"):
            fn = globals()["_" + name]
            setattr(self, name, self._wrap(name, fn) if compiled else fn)

    def _wrap(self, name, fn):
        # automatic dynamic shapes: a second batch/length recompiles once with symbolic sizes
        cfn = torch.compile(fn, fullgraph=True)

        def call(*args):
            if name not in self.failed:
                try:
                    return cfn(*args)
                except Exception as e:  # keep the run alive: eager is the same arithmetic
                    self.failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(f"[fast_decode] torch.compile of {name} failed, running it eagerly: {self.failed[name]}")
            return fn(*args)

        return call


_EAGER = _Fns(False)
_COMPILED: list = []


def compiled_fns() -> _Fns:
    """The shared compiled pieces (made once; raises the recompile limit: one entry per shape)."""
    if not _COMPILED:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 1024)
        _COMPILED.append(_Fns(True))
    return _COMPILED[0]


def _select(q0: torch.Tensor, kv: StaticKV, layer: int, keep: int, bs: int, fns: _Fns = _EAGER) -> torch.Tensor:
    """Selected prefix blocks, int32 ``[B, H_kv, keep]`` sorted; q0: [B, H, D] (RoPE applied).

    Static shapes only (graph safe): the prefix length is read from ``kv.pos``; the re-summed
    last two blocks are written back to ``kv.sums``.
    """
    ids, fresh, blocks = fns.score(q0, kv.k[layer], kv.sums[layer], kv.pos, keep, bs)
    rows = torch.arange(q0.shape[0], device=q0.device)[:, None].expand_as(blocks)
    kv.sums[layer].index_put_((rows, blocks), fresh)
    return ids


def _splits(n_blocks: int) -> int:
    # about 4 blocks per split, at most 32: enough programs to fill the card at batch 1 without
    # making the last-split merge (which reads every split of the whole packed group) the bottleneck
    return max(1, min(32, -(-n_blocks // 4)))


def fast_forward(model, ids: torch.Tensor, kv: StaticKV, *, prefill: bool = False, sparse: SparseSpec | None = None,
                 keep: int | None = None, last_only: bool = False, fns: _Fns | None = None) -> torch.Tensor:
    """Logits ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``) of ``ids`` [B, T] after ``kv``'s prefix.

    Writes the new keys/values at ``kv.pos..kv.pos+T-1`` and advances ``kv.pos`` by ``T``.
    ``prefill``: the cache must be empty (SDPA causal over the ids). ``sparse`` with ``keep``
    blocks: read only the selected prefix blocks (``keep=None``: dense). ``fns``: eager (default)
    or :func:`compiled_fns`.
    """
    from catkit.ops.sparse_attention import paged_decode_attention

    fns = fns or _EAGER
    cfg = model.cfg
    b, t = ids.shape
    hq, hk, d = cfg.n_heads, cfg.kv_heads, cfg.dim_head
    x = model.embed(ids)
    positions, rows, cos, sin, seq_prefix, seq_decode = fns.prologue(kv.pos, t, d, cfg.rope_theta, x.dtype)
    bs = kv.sel_block or 128
    n_blocks = keep if (sparse is not None and keep is not None) else -(-kv.max_len // bs)
    splits = _splits(n_blocks)
    sel = None
    for i, block in enumerate(model.blocks):
        m = block.mixer
        q, k, v, qp = fns.pre(x, block.mixer_norm.weight, block.mixer_norm.eps, m.qkv.weight, cos, sin, hq, hk, d)
        kv.k[i].index_put_((rows, positions), k)
        kv.v[i].index_put_((rows, positions), v)
        if prefill:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=t > 1, enable_gqa=hq != hk).transpose(1, 2)
            o = o.reshape(b, t, hq * d)
        else:
            if sparse is not None and keep is not None and sparse.is_anchor(i):
                sel = _select(q[:, 0], kv, i, keep, sparse.block_size, fns)
            kp, vp = kv.pages(i)
            if t == 1 and sel is None:  # decode: the new token is in the cache, no merge needed
                o = paged_decode_attention(qp, kp, vp, kv.table, seq_decode, block_size=bs, validate=False,
                                           num_splits=splits).view(b, 1, hq * d)
            else:
                o_p, lse_p = paged_decode_attention(qp, kp, vp, kv.table, seq_prefix, block_indices=sel, block_size=bs,
                                                    return_lse=True, validate=False, num_splits=splits)
                o = fns.merge(o_p, lse_p, q, k, v)
        ffn = block.ffn
        x = fns.post(x, o, m.out.weight, block.ffn_norm.weight, block.ffn_norm.eps, ffn.gate_up.weight,
                     ffn.down.weight)
    if last_only:
        x = x[:, -1:]
    weight = model.embed.weight if model.lm_head is None else model.lm_head.weight
    kv.pos.add_(t)
    return fns.head(x, model.norm.weight, model.norm.eps, weight)


class StepGraph:
    """``fast_forward`` for a fixed ``[B, T]`` input, captured as a CUDA graph (or run eagerly).

    ``compile``: the per-layer pieces through ``torch.compile`` (fused elementwise work: fewer,
    larger kernels in the graph); the Triton attention kernel and cache writes stay as they are.

    Capturing runs the step for warm-up, which writes junk past the cache's length and advances
    ``pos``; the cache length is restored afterwards (junk beyond ``pos`` is never read).
    """

    def __init__(self, model, kv: StaticKV, t: int, *, sparse: SparseSpec | None = None, keep: int | None = None,
                 use_graph: bool = True, compile: bool = False):
        self.model, self.kv, self.t, self.sparse, self.keep = model, kv, t, sparse, keep
        self.fns = compiled_fns() if compile else _EAGER
        self.ids = torch.zeros(kv.batch, t, dtype=torch.int64, device=kv.pos.device)
        self.graph = None
        self.out = None
        if use_graph and kv.pos.is_cuda:
            saved = kv.pos.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._run()
                    kv.pos.copy_(saved)
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._run()
            kv.pos.copy_(saved)

    def _run(self):
        return fast_forward(self.model, self.ids, self.kv, sparse=self.sparse, keep=self.keep, fns=self.fns)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.out


def prefill(model, prompt: torch.Tensor, kv: StaticKV) -> None:
    """Cache ``prompt[:, :-1]`` (the last prompt token is the first decode input)."""
    kv.set_length(0)
    if prompt.shape[1] > 1:
        fast_forward(model, prompt[:, :-1], kv, prefill=True, last_only=True)


def greedy_decode(step: StepGraph, first: torch.Tensor, n: int, gaps: torch.Tensor | None = None) -> torch.Tensor:
    """Plain greedy decoding: ``n`` tokens [B, n] after ``first`` [B, 1] (no host sync inside).

    ``gaps`` ([B, n] float32): filled with the top-1 minus top-2 logit at every step (a near-tie
    detector for comparing outputs computed with different kernels).
    """
    out = torch.empty(first.shape[0], n, dtype=torch.int64, device=first.device)
    tok = first
    for s in range(n):
        logits = step(tok)[:, -1]
        nxt = logits.argmax(-1)
        if gaps is not None:
            top = logits.float().topk(2, -1).values
            gaps[:, s] = top[:, 0] - top[:, 1]
        out[:, s] = nxt
        tok = nxt[:, None]
    return out


@dataclass
class SpecResult:
    tokens: torch.Tensor  # [B, n]
    rounds: int  # verify calls
    accepted: int  # accepted draft tokens, summed over the rows still generating
    row_rounds: int  # (round, row) pairs where the row was still generating

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a row emits per verify round (accepted drafts + the target's own token)."""
        return (self.accepted + self.row_rounds) / max(self.row_rounds, 1)


def greedy_speculative(draft_steps: dict, verify: StepGraph, tkv: StaticKV, dkv: StaticKV, first: torch.Tensor,
                       n: int, gamma: int) -> SpecResult:
    """Greedy chain speculative decoding with static shapes; every row == the target's greedy output.

    ``draft_steps[1]`` / ``[2]``: draft ``StepGraph`` s for 1 and 2 new tokens; ``verify``: the
    target's ``StepGraph`` for ``gamma + 1`` tokens. Both caches hold the prompt minus its last
    token ``first`` [B, 1] (equal lengths). Each row accepts its own prefix (per-row cache lengths,
    all bookkeeping on the device; one host sync per round to test for the end). A round drafts
    ``gamma`` tokens: the first draft call feeds the row's last two tokens (re-writing the one the
    draft may already hold, the same token at the same position, so the draft never needs a
    ragged input), then ``gamma - 1`` single-token calls. Rows that already have ``n`` tokens
    recompute their last round (static shapes) without advancing; caches need ``2 * gamma + 2``
    spare slots past the prompt + ``n``.
    """
    from catkit.serve.speculative import greedy_accept

    b, dev = first.shape[0], first.device
    width = n + gamma + 2
    out = torch.zeros(b, width, dtype=torch.int64, device=dev)
    off = torch.zeros(b, dtype=torch.int64, device=dev)  # tokens emitted per row
    row_ids = torch.arange(b, device=dev)
    steps = torch.arange(gamma + 1, device=dev)
    acc_sum = torch.zeros((), dtype=torch.int64, device=dev)
    act_sum = torch.zeros((), dtype=torch.int64, device=dev)
    last, prev = first[:, 0], None
    rounds = 0
    while True:
        base = tkv.pos.clone()  # per row: position of `last`
        if prev is None:  # first round: the draft holds exactly the prompt minus `last`
            logits = draft_steps[1](last[:, None])
        else:
            dkv.set_length(base - 1)
            logits = draft_steps[2](torch.stack([prev, last], 1))
        toks = [logits[:, -1].argmax(-1)]
        for _ in range(gamma - 1):
            toks.append(draft_steps[1](toks[-1][:, None])[:, -1].argmax(-1))
        drafts = torch.stack(toks, 1)
        tl = verify(torch.cat([last[:, None], drafts], 1))
        nacc, nxt = greedy_accept(tl.argmax(-1), drafts)
        active = off < n
        emitted = torch.cat([drafts, nxt[:, None]], 1)
        emitted[row_ids, nacc] = nxt  # positions after nacc are junk, overwritten next round
        # finished rows write past column n (clamped into the spare columns): harmless
        out.scatter_(1, (off[:, None] + steps).clamp_max(width - 1), emitted)
        adv = torch.where(active, nacc + 1, 0)
        off += adv
        acc_sum += torch.where(active, nacc, 0).sum()
        act_sum += active.sum()
        tkv.set_length(base + adv)
        new_prev = torch.where(nacc > 0, drafts.gather(1, (nacc - 1).clamp_min(0)[:, None])[:, 0], last)
        prev = new_prev if prev is None else torch.where(active, new_prev, prev)
        last = torch.where(active, nxt, last)
        rounds += 1
        if int(off.min()) >= n:
            break
    return SpecResult(out[:, :n], rounds, int(acc_sum), int(act_sum))


def teacher_forced_nll(step: StepGraph, tokens: torch.Tensor, n_chunks: int) -> float:
    """Mean next-token NLL over ``n_chunks`` verify-shaped chunks of ``tokens`` [B, >= n_chunks*T + 1].

    ``tokens[:, 0]`` sits at the cache's current length; each chunk of ``T = step.t`` tokens is
    one verify call (the cache grows with the true tokens), scored on the next tokens.
    """
    t = step.t
    tot = torch.zeros((), dtype=torch.float64, device=tokens.device)
    for c in range(n_chunks):
        logits = step(tokens[:, c * t : (c + 1) * t]).float()
        tgt = tokens[:, c * t + 1 : (c + 1) * t + 1]
        tot += F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum").double()
    return float(tot) / (n_chunks * t * tokens.shape[0])


def first_divergence(ref: torch.Tensor, out: torch.Tensor, gaps: torch.Tensor, tol: float):
    """Compare token rows; returns (ok, info). ``ok``: every row equals ``ref`` or first differs at a
    position where the reference's top-2 logit gap (``gaps``) was below ``tol`` (a near-tie that a
    different summation order may flip in bf16)."""
    n = min(ref.shape[1], out.shape[1])
    diff = (ref[:, :n] != out[:, :n])
    info = {"rows_equal": int((~diff.any(1)).sum()), "rows": ref.shape[0], "first_div": [], "gap_at_div": []}
    ok = True
    for r in range(ref.shape[0]):
        idx = diff[r].nonzero()
        if idx.numel():
            i = int(idx[0])
            g = float(gaps[r, i])
            info["first_div"].append(i)
            info["gap_at_div"].append(round(g, 4))
            ok &= g < tol
    info["agreement"] = float((~diff).float().mean())
    return ok, info
