"""Delta-rule token mixers: GDN, KDA, FG2-GDN and FG2-GDN+ as one layer (mixer letters G, K, F, P).

Per layer, with x the (normed) input [B, T, d_model], H heads and head dim K = V::

    q, k, v   = SiLU(causal_depthwise_conv4(W_qkv x))          # conv never crosses a sequence
    q, k      = l2norm(q), l2norm(k)                             # per head, in fp32
    g         = -exp(A_log) * softplus(W_a x + dt_bias)          # log-decay, always <= 0
                  GDN: scalar per head  [B,T,H],   W_a: d_model -> H
                  KDA/FG2/FG2+: per key channel [B,T,H,K], W_a low rank d_model -> r -> H*K
                  (A_log per head, dt_bias per output channel; Mamba-2 style init)
    rates       GDN/KDA: beta = sigmoid(W_b x), a scalar per head             [B,T,H]
                FG2:     sqrt(b) = exp(0.5 * logsigmoid(W_b x)) per channel  [B,T,H,K]
                FG2+:    separate sqrt(bk) [B,T,H,K] and sqrt(bv) [B,T,H,V]
                (FG2 rate projections are low rank d_model -> r_b -> ..., r_b = head_dim by
                 default, so the four variants have nearly equal parameter counts)
    o         = delta rule (see catkit.ops.delta_rule) with output scale K^-0.5
    y         = W_o( RMSNorm_V(o) * w_norm * sigmoid(W_gate x) )  # gated RMSNorm per head

FG2's square root is taken by the layer as exp(0.5 * logsigmoid(z)) in fp32: finite value and
gradient for every z, even where sigmoid(z) underflows to 0 (sqrt'(0) is infinite). The scaled
keys/values k~ = sqrt(bk) k, v~ = sqrt(bv) v are then handed to the op with unit rates, which
is exactly the FG2 update (the op's own sqrt of 1 is 1).

Which implementation runs (``impl``):
  * ``"auto"`` (default): the Triton chunk kernels (training / prefill) and the fused recurrent
    kernel (decode, T <= 16 without grad) when ``kernel_device_ok`` says Triton can run on the
    tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``); otherwise plain PyTorch: the chunked
    (WY) reference, or the token loop for ``cu_seqlens`` batches. So a CPU user without the
    interpreter still works, slowly (fine for tiny models, not for real training).
  * ``"triton"``, ``"torch"`` (chunked PyTorch reference), ``"naive"`` (token loop, ground truth):
    forced, for tests and debugging.

Options: ``ModelConfig.mixer_options["delta"]`` (all four letters), then ``mixer_options[variant]``
(``"gdn"``, ``"kda"``, ``"fg2"``, ``"fg2+"``) on top. Keys:
  ``n_heads`` (default cfg.n_heads), ``head_dim`` (default cfg.dim_head; K = V = head_dim),
  ``conv_size`` (4), ``gate_rank`` (rank of the channel-decay projection, default head_dim),
  ``rate_rank`` (rank of the FG2 rate projection, default head_dim; 0 = full rank),
  ``neg_eigval`` (FG2/FG2+ only: b = 2 sigmoid(z), eigenvalues of I - k~k~^T in [-1, 1]),
  ``impl`` ("auto" | "triton" | "torch" | "naive").
Example: ``ModelConfig(pattern="FFFA", mixer_options={"delta": {"n_heads": 2, "head_dim": 64}})``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from catkit.ops.delta_rule import (chunk_fg2_delta_rule, chunk_gated_delta_rule, chunk_kda,
                                   fused_recurrent_fg2_delta_rule, fused_recurrent_gated_delta_rule)
from catkit.ops.delta_rule.naive import (chunked_reference_fg2, naive_fg2_delta_rule,
                                         naive_gated_delta_rule)
from catkit.utils.triton_utils import kernel_device_ok

VARIANTS = ("gdn", "kda", "fg2", "fg2+")
IMPLS = ("auto", "triton", "torch", "naive")
OPTION_KEYS = ("n_heads", "head_dim", "conv_size", "gate_rank", "rate_rank", "neg_eigval", "impl")
RECURRENT_MAX_T = 16  # decode / short continuations go through the fused recurrent kernel
TORCH_CHUNK = 16  # the PyTorch fallback's chunk: its [B, H, C, C, K] decay tensor favours small C


class DeltaNetCache:
    """Decode state of one delta-rule layer.

    ``conv`` [B, conv_size - 1, C]: the last pre-convolution q/k/v inputs (zeros before the
    first token); ``state`` [B, H, K, V] fp32 (None until the first call); ``length``: cached
    tokens (the model reads ``caches[0].length`` for RoPE positions).
    """

    def __init__(self, batch_size: int, max_len: int, conv_channels: int, conv_size: int, device, dtype):
        self.conv = torch.zeros(batch_size, conv_size - 1, conv_channels, device=device, dtype=dtype)
        self.state: torch.Tensor | None = None
        self.length = 0
        self.max_len = max_len


def causal_conv(x: torch.Tensor, weight: torch.Tensor, prefix: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv. x [B, T, C], weight [C, W], prefix [B, W-1, C] (cached inputs).

    Returns (y [B, T, C], the last W-1 inputs [B, W-1, C] for the next call). With
    ``cu_seqlens`` (B == 1, packed) taps reaching before a sequence's first token are dropped.
    """
    B, T, C = x.shape
    W = weight.shape[1]
    if prefix is None:
        prefix = x.new_zeros(B, W - 1, C)
    xp = torch.cat([prefix.to(x.dtype), x], dim=1)  # [B, T + W - 1, C]
    if cu_seqlens is None:
        y = F.conv1d(xp.transpose(1, 2), weight.to(x.dtype)[:, None, :], groups=C).transpose(1, 2)
    else:
        idx = torch.arange(T, device=x.device)
        cu = cu_seqlens.long()
        pos = idx - cu[torch.searchsorted(cu[1:], idx, right=True)]  # position within its sequence
        w = weight.to(x.dtype)
        y = x * w[:, W - 1]
        for lag in range(1, W):  # tap `lag` reads x[t - lag], valid only inside the same sequence
            tap = xp[:, W - 1 - lag: W - 1 - lag + T] * (pos >= lag).to(x.dtype)[None, :, None]
            y = y + tap * w[:, W - 1 - lag]
    return y, xp[:, xp.shape[1] - (W - 1):]


def _inv_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class DeltaNet(nn.Module):
    """One delta-rule mixer; ``variant`` in {"gdn", "kda", "fg2", "fg2+"} (see the module docstring).

    forward(x [B, T, d_model], *, rope (ignored), cache=None, cu_seqlens=None) -> [B, T, d_model].
    """

    VARIANT: str | None = None  # set by the per-letter subclasses below

    def __init__(self, d_model: int, n_heads: int, head_dim: int, variant: str, *, conv_size: int = 4,
                 gate_rank: int | None = None, rate_rank: int | None = None, neg_eigval: bool = False,
                 impl: str = "auto", norm_eps: float = 1e-6):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
        for name, val in (("n_heads", n_heads), ("head_dim", head_dim), ("conv_size", conv_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive integer, got {val!r}")
        if head_dim > 128:
            raise ValueError(f"head_dim: the delta-rule kernels take at most 128, got {head_dim}")
        if neg_eigval and variant in ("gdn", "kda"):
            raise ValueError("neg_eigval: only the FG2 variants (rates folded by the layer) support it")
        self.variant, self.impl, self.neg_eigval, self.eps = variant, impl, bool(neg_eigval), norm_eps
        self.chunk_size = 64  # the kernels' chunk; CPU tests set 16 to keep the interpreter fast
        self.n_heads, self.head_dim, self.conv_size = n_heads, head_dim, conv_size
        H, K = n_heads, head_dim
        self.channel_decay = variant != "gdn"
        gate_rank = K if gate_rank is None else gate_rank
        rate_rank = K if rate_rank is None else rate_rank

        self.qkv = nn.Linear(d_model, 3 * H * K, bias=False)
        # depthwise conv weight [C, W]; nn.Conv1d's default init (uniform +-1/sqrt(W))
        self.conv_weight = nn.Parameter(torch.empty(3 * H * K, conv_size).uniform_(-1, 1) / math.sqrt(conv_size))
        if self.channel_decay:
            self.a_proj = nn.Sequential(nn.Linear(d_model, gate_rank, bias=False), nn.Linear(gate_rank, H * K, bias=False))
        else:
            self.a_proj = nn.Linear(d_model, H, bias=False)
        n_dt = H * K if self.channel_decay else H
        # Mamba-2 style: A in [1, 16], softplus(dt_bias) = dt in [1e-3, 1e-1] log-uniform
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(n_dt).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(_inv_softplus(dt))
        n_rate = {"gdn": H, "kda": H, "fg2": H * K, "fg2+": 2 * H * K}[variant]
        if variant in ("fg2", "fg2+") and rate_rank:
            self.b_proj = nn.Sequential(nn.Linear(d_model, rate_rank, bias=False), nn.Linear(rate_rank, n_rate, bias=False))
        else:
            self.b_proj = nn.Linear(d_model, n_rate, bias=False)
        self.gate = nn.Linear(d_model, H * K, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(K))
        self.out = nn.Linear(H * K, d_model, bias=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg, variant: str | None = None) -> "DeltaNet":
        variant = variant or cls.VARIANT
        opts = dict(cfg.mixer_options.get("delta", {}))
        opts.update(cfg.mixer_options.get(variant, {}))
        unknown = sorted(set(opts) - set(OPTION_KEYS))
        if unknown:
            raise ValueError(f"mixer_options: unknown delta-rule option(s) {unknown}; known: {list(OPTION_KEYS)}")
        n_heads = opts.pop("n_heads", cfg.n_heads)
        head_dim = opts.pop("head_dim", cfg.dim_head)
        return cls(cfg.d_model, n_heads, head_dim, variant, norm_eps=cfg.norm_eps, **opts)

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> DeltaNetCache:
        return DeltaNetCache(batch_size, max_len, 3 * self.n_heads * self.head_dim, self.conv_size, device, dtype)

    # ------------------------------------------------------------------ pieces
    def gates(self, x: torch.Tensor):
        """(g, rate_k, rate_v) in fp32 from x [B, T, d_model].

        g: [B,T,H] (gdn) or [B,T,H,K]. GDN/KDA: rate_k = beta [B,T,H], rate_v None.
        FG2/FG2+: rate_k = sqrt(bk) [B,T,H,K], rate_v = sqrt(bv) [B,T,H,V] (= rate_k for FG2).
        """
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        a = self.a_proj(x).float()
        if self.channel_decay:
            g = -self.A_log.float().exp()[:, None] * F.softplus(a.view(B, T, H, K) + self.dt_bias.float().view(H, K))
        else:
            g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        z = self.b_proj(x).float()
        if self.variant in ("gdn", "kda"):
            return g, torch.sigmoid(z), None
        sq = torch.exp(0.5 * F.logsigmoid(z))  # sqrt(sigmoid(z)), finite gradient everywhere
        if self.neg_eigval:
            sq = sq * math.sqrt(2.0)
        if self.variant == "fg2":
            sk = sq.view(B, T, H, K)
            return g, sk, sk
        sk, sv = sq.view(B, T, 2, H, K).unbind(2)
        return g, sk, sv

    def delta_op(self, q, k, v, g, rate_k, rate_v, *, initial_state=None, output_final_state=False,
                 cu_seqlens=None, mode: str = "chunk"):
        """The recurrence on prepared inputs; ``mode`` in {"chunk", "recurrent", "torch", "naive"}.

        q, k (L2-normalised), v: [B,T,H,K]; g, rate_k, rate_v from :meth:`gates`.
        Returns (o [B,T,H,V] in q's dtype, final state [N,H,K,V] fp32 or None).
        """
        kw = dict(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        if self.variant in ("gdn", "kda"):
            beta = rate_k
            if mode == "chunk":
                fn = chunk_gated_delta_rule if self.variant == "gdn" else chunk_kda
                o, s = fn(q, k, v, g, beta, chunk_size=self.chunk_size, **kw)
            elif mode == "recurrent":
                o, s = fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
            elif mode == "torch":
                bk = beta[..., None].expand(*beta.shape, q.shape[-1])
                bv = beta[..., None].expand(*beta.shape, v.shape[-1])
                o, s = chunked_reference_fg2(q, k, v, g, bk, bv, initial_state=initial_state,
                                             output_final_state=output_final_state, chunk_size=TORCH_CHUNK)
            else:
                o, s = naive_gated_delta_rule(q, k, v, g, beta, **kw)
            return o.to(q.dtype), s
        # FG2 / FG2+: fold the square-rooted rates in fp32, run with unit rates.
        kt = (k.float() * rate_k).to(k.dtype)
        vt = (v.float() * rate_v).to(v.dtype)
        unit = torch.ones((), device=q.device, dtype=torch.float32).expand(kt.shape)
        if mode == "chunk":
            o, s = chunk_fg2_delta_rule(q, kt, vt, g, unit, chunk_size=self.chunk_size, **kw)
        elif mode == "recurrent":
            o, s = fused_recurrent_fg2_delta_rule(q, kt, vt, g, unit, **kw)
        elif mode == "torch":
            o, s = chunked_reference_fg2(q, kt, vt, g, unit, initial_state=initial_state,
                                         output_final_state=output_final_state, chunk_size=TORCH_CHUNK)
        else:
            o, s = naive_fg2_delta_rule(q, kt, vt, g, unit, **kw)
        return o.to(q.dtype), s

    def _mode(self, q, T: int, cache, cu_seqlens) -> str:
        fast = self.impl == "triton" or (self.impl == "auto" and kernel_device_ok(q))
        if self.impl in ("torch", "naive") or not fast:
            plain = "torch" if self.impl in ("auto", "torch") else "naive"
            return "naive" if cu_seqlens is not None else plain
        if cache is not None and T <= RECURRENT_MAX_T and not torch.is_grad_enabled():
            return "recurrent"
        return "chunk"

    # ------------------------------------------------------------------ forward
    def forward(self, x, *, rope=None, cache: DeltaNetCache | None = None, cu_seqlens: torch.Tensor | None = None):
        """x: [B, T, d_model] -> [B, T, d_model]; ``rope`` is ignored (no positional encoding here)."""
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        if cu_seqlens is not None and cache is not None:
            raise ValueError("cu_seqlens: variable-length batches are for training/prefill, not with a cache")
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"cu_seqlens: packed sequences need B == 1, got x with B={B}")
        if cache is not None and cache.length + T > cache.max_len:
            raise ValueError(f"cache: {cache.length} + {T} tokens exceed the cache's max_len={cache.max_len}")
        qkv, conv_tail = causal_conv(self.qkv(x), self.conv_weight,
                                     cache.conv if cache is not None else None, cu_seqlens)
        qkv = F.silu(qkv)
        q, k, v = qkv.view(B, T, 3, H, K).unbind(2)
        dtype = q.dtype
        q = F.normalize(q.float(), dim=-1, eps=1e-6).to(dtype)
        k = F.normalize(k.float(), dim=-1, eps=1e-6).to(dtype)
        v = v.contiguous()
        g, rk, rv = self.gates(x)
        h0 = cache.state if cache is not None else None
        mode = self._mode(q, T, cache, cu_seqlens)
        # The kernels take bf16/fp16/fp32 as given; autocast must not re-cast inside host code.
        with torch.autocast(device_type=x.device.type, enabled=False):
            o, state = self.delta_op(q, k, v, g, rk, rv, initial_state=h0, output_final_state=cache is not None,
                                     cu_seqlens=cu_seqlens, mode=mode)
        if cache is not None:
            cache.conv = conv_tail.detach()
            cache.state = state.detach().float()
            cache.length += T
        # gated RMSNorm per head (fp32), then the output projection
        of = o.float()
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        of = of * torch.sigmoid(self.gate(x).float()).view(B, T, H, K)
        return self.out(of.reshape(B, T, H * K).to(x.dtype))


class GatedDeltaNet(DeltaNet):
    """Mixer letter G: Gated DeltaNet (scalar decay, scalar beta)."""

    VARIANT = "gdn"


class KimiDeltaAttention(DeltaNet):
    """Mixer letter K: KDA (per-channel decay, scalar beta)."""

    VARIANT = "kda"


class FG2GatedDeltaNet(DeltaNet):
    """Mixer letter F: FG2-GDN (per-channel decay, coupled per-channel rate, k and v scaled by sqrt(b))."""

    VARIANT = "fg2"


class FG2PlusGatedDeltaNet(DeltaNet):
    """Mixer letter P: FG2-GDN+ (per-channel decay, separate key and value rates)."""

    VARIANT = "fg2+"
