import torch
import torch.nn.functional as F

from catkit.layers.moe import MoE
from catkit.utils.testing import assert_close


def per_token_loop(moe: MoE, x, weights, experts):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(moe.top_k):
            e = int(experts[n, j])
            gate, up = (x[n] @ moe.w_gate_up[e]).chunk(2)
            out[n] += weights[n, j] * ((F.silu(gate) * up) @ moe.w_down[e])
    return out


def test_routing_conserves_tokens(seed):
    moe = MoE(32, n_experts=6, top_k=2, hidden=48)
    x = torch.randn(57, 32)
    w, e, aux = moe.route(x)
    assert e.shape == (57, 2) and w.shape == (57, 2)
    assert (e[:, 0] != e[:, 1]).all()  # k distinct experts per token
    assert torch.bincount(e.flatten(), minlength=6).sum() == 57 * 2
    assert torch.allclose(w.sum(-1), torch.ones(57))
    assert aux > 0


def test_grouped_compute_equals_per_token_loop(seed):
    moe = MoE(32, n_experts=5, top_k=3, hidden=40, shared_expert=False)
    x = torch.randn(41, 32, dtype=torch.float64)
    moe = moe.double()
    w, e, _ = moe.route(x)
    assert_close(moe.expert_forward(x, w.double(), e), per_token_loop(moe, x, w.double(), e), 1e-12, "moe")


def test_grouped_compute_gradients(seed):
    moe = MoE(16, n_experts=4, top_k=2, hidden=24, shared_expert=True).double()
    x = torch.randn(2, 13, 16, dtype=torch.float64, requires_grad=True)
    y, aux = moe(x)
    (y.pow(2).sum() + aux).backward()
    g_fast = [p.grad.clone() for p in (x, moe.w_gate_up, moe.w_down, moe.router.weight)]
    for p in (x, moe.w_gate_up, moe.w_down, moe.router.weight):
        p.grad = None
    x2 = x.reshape(-1, 16)
    w, e, aux2 = moe.route(x2)
    y2 = per_token_loop(moe, x2, w, e) + moe.shared(x2)
    (y2.pow(2).sum() + aux2).backward()
    for a, b in zip(g_fast, (x.grad, moe.w_gate_up.grad, moe.w_down.grad, moe.router.weight.grad)):
        assert_close(a, b, 1e-10, "moe grad")


def test_balance_loss_is_one_when_uniform():
    moe = MoE(8, n_experts=4, top_k=1, hidden=8)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[torch.arange(4), torch.arange(4)] = 10.0
    x = torch.eye(8)[:4].repeat(5, 1)  # token i strongly prefers expert i % 4
    _, e, aux = moe.route(x)
    assert torch.bincount(e.flatten(), minlength=4).tolist() == [5, 5, 5, 5]
    assert abs(float(aux.detach()) - 1.0) < 1e-3
