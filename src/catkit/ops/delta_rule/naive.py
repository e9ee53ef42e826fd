"""Ground truth for the delta-rule family: token-by-token recurrences in float32 (or float64).

Every variant is one recurrence on a state ``S`` of shape ``[K, V]`` per head::

    S_t = Diag(exp(g_t)) S_{t-1} + a_t (v_t - (Diag(exp(g_t)) S_{t-1})^T b_t)^T
        = (I - a_t b_t^T) Diag(exp(g_t)) S_{t-1} + a_t v_t^T
    o_t = scale * S_t^T q_t

with an "erase/write" vector ``a_t`` and a "read" key ``b_t``:

=================  =====================  ==================  =================
variant            a_t                    b_t                 value
=================  =====================  ==================  =================
GDN / KDA          beta_t * k_t           k_t                 v_t
FG2-GDN(+)         sqrt(bk_t) * k_t       sqrt(bk_t) * k_t    sqrt(bv_t) * v_t
one-sided (abl.)   bk_t * k_t             k_t                 v_t
=================  =====================  ==================  =================

GDN has a scalar log-decay ``g`` ``[B, T, H]``; KDA and FG2 a per-key-channel one ``[B, T, H, K]``
(either shape is accepted everywhere). FG2-GDN (``bv=None``) uses ``bv = bk`` and needs K == V.

``chunked_reference_fg2`` is the same FG2 recurrence written in the chunked (WY/UT) form in plain
PyTorch: a debugging aid and the fp32 reference for GPU-sized checks, where a token loop is slow.
"""

from __future__ import annotations

import torch


def _split(cu_seqlens, B, T):
    """(batch index, start, end) of each sequence: packed varlen or the plain batch."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _broadcast_g(g, K):
    return g.unsqueeze(-1).expand(*g.shape, K) if g.dim() == 3 else g


def naive_delta_rule_general(q, a, b, v, g, *, scale=None, initial_state=None,
                             output_final_state=False, cu_seqlens=None):
    """The general recurrence above; ``q, a, b: [B,T,H,K]``, ``v: [B,T,H,V]``, ``g: [B,T,H(,K)]``.

    Returns ``(o [B,T,H,V] in float32/64, final_state [N,H,K,V] or None)`` where N is B, or the
    number of sequences when ``cu_seqlens`` packs them into B = 1.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else scale
    q, a, b, v = (x.to(dt) for x in (q, a, b, v))
    g = _broadcast_g(g.to(dt), K)
    outs, finals = [], []
    for n, (bi, s, e) in enumerate(_split(cu_seqlens, B, T)):
        S = (initial_state[n].to(dt) if initial_state is not None
             else torch.zeros(H, K, V, dtype=dt, device=q.device))
        seq_o = []
        for t in range(s, e):
            S = S * torch.exp(g[bi, t])[..., None]
            u = v[bi, t] - torch.einsum("hkv,hk->hv", S, b[bi, t])
            S = S + a[bi, t][..., None] * u[:, None, :]
            seq_o.append(torch.einsum("hkv,hk->hv", S, q[bi, t]) * scale)
        outs.append(torch.stack(seq_o, 0) if seq_o else q.new_zeros(0, H, V, dtype=dt))
        finals.append(S)
    if cu_seqlens is None:
        o = torch.stack(outs, 0)
    else:
        o = torch.cat(outs, 0)[None]
    final = torch.stack(finals, 0) if output_final_state else None
    return o, final


def _beta_vec(beta, K):
    return beta.unsqueeze(-1).expand(*beta.shape, K)


def naive_fg2_delta_rule(q, k, v, g, bk, bv=None, *, scale=None, initial_state=None,
                         output_final_state=False, cu_seqlens=None):
    """FG2-GDN (``bv=None``, K == V) or FG2-GDN+: k~ = sqrt(bk) k, v~ = sqrt(bv) v, beta = 1."""
    bv = bk if bv is None else bv
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kt = k.to(dt) * bk.to(dt).sqrt()
    vt = v.to(dt) * bv.to(dt).sqrt()
    return naive_delta_rule_general(q, kt, kt, vt, g, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def naive_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                           output_final_state=False, cu_seqlens=None):
    """GDN: scalar log-decay ``g [B,T,H]`` (a per-channel one is also accepted), scalar beta."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    a = k.to(dt) * beta.to(dt)[..., None]
    return naive_delta_rule_general(q, a, k, v, g, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)


naive_kda = naive_gated_delta_rule  # KDA is GDN with g [B,T,H,K]; the loop handles both shapes


def naive_one_sided_delta_rule(q, k, v, g, bk, *, scale=None, initial_state=None,
                               output_final_state=False, cu_seqlens=None):
    """Ablation only: per-channel rate on one side, (I - (bk*k) k^T); not symmetric, may expand S."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    a = k.to(dt) * bk.to(dt)
    return naive_delta_rule_general(q, a, k, v, g, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def chunked_reference_fg2(q, k, v, g, bk, bv=None, *, scale=None, initial_state=None,
                          output_final_state=False, chunk_size=64):
    """FG2 in the chunked WY/UT form, plain PyTorch, fp32, no varlen; differentiable.

    Per chunk with cumulative log-decay G: A = strict_lower(sum_c k_ic k_jc exp(G_ic - G_jc)),
    T = (I + A)^-1, W = T (K exp G), U = T V, Vn = U - W S, O = (Q exp G) S + P Vn with
    P = lower(sum_c q_ic k_jc exp(G_ic - G_jc)), S <- exp(G_C) S + (K exp(G_C - G))^T Vn.
    The decay ratios are formed elementwise ([C, C, K] per chunk, exponent <= 0), so strong decay
    cannot overflow; memory is O(B H C^2 K) per chunk.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    bv = bk if bv is None else bv
    scale = K ** -0.5 if scale is None else scale
    f = torch.float32
    q, g = q.to(f), _broadcast_g(g.to(f), K)
    kt = k.to(f) * bk.to(f).sqrt()
    vt = v.to(f) * bv.to(f).sqrt()
    S = (initial_state.to(f) if initial_state is not None
         else torch.zeros(B, H, K, V, dtype=f, device=q.device))
    C = chunk_size
    outs = []
    for s in range(0, T, C):
        e = min(s + C, T)
        n = e - s
        qc, kc, vc = (x[:, s:e].transpose(1, 2) for x in (q, kt, vt))  # [B,H,n,D]
        G = g[:, s:e].transpose(1, 2).cumsum(2)
        idx = torch.arange(n, device=q.device)
        lower = idx[:, None] >= idx[None, :]
        diff = (G[:, :, :, None, :] - G[:, :, None, :, :]).masked_fill(~lower[..., None], float("-inf"))
        E = diff.exp()  # [B,H,i,j,K], zero above the diagonal
        A = torch.einsum("bhic,bhjc,bhijc->bhij", kc, kc, E).tril(-1)
        P = torch.einsum("bhic,bhjc,bhijc->bhij", qc, kc, E)
        eye = torch.eye(n, device=q.device, dtype=f)
        Tm = torch.linalg.solve_triangular(eye + A, eye.expand(B, H, n, n), upper=False, unitriangular=True)
        W = Tm @ (kc * G.exp())
        Vn = Tm @ vc - W @ S
        o = (qc * G.exp()) @ S + P @ Vn
        outs.append(o * scale)
        Gl = G[:, :, -1:, :]
        S = S * Gl.transpose(-1, -2).exp() + (kc * (Gl - G).exp()).transpose(-1, -2) @ Vn
    o = torch.cat(outs, 2).transpose(1, 2)
    return o, (S if output_final_state else None)
