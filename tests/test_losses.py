"""The DPO loss against hand-computed values and the paper's gradient."""

import math

import torch

from dpokit.losses import dpo_loss


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_dpo_loss_hand_computed():
    # policy (chosen, rejected) = (-10, -12), reference = (-11, -11): log-ratios +1 and -1, h = 2
    losses, rc, rr = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1
    )
    assert math.isclose(losses.item(), -log_sigmoid(0.2), rel_tol=1e-6)
    assert math.isclose(rc.item(), 0.1, rel_tol=1e-6) and math.isclose(rr.item(), -0.1, rel_tol=1e-6)


def test_conservative_dpo_hand_computed():
    losses, _, _ = dpo_loss(
        torch.tensor([-10.0, -5.0]),
        torch.tensor([-12.0, -4.0]),
        torch.tensor([-11.0, -5.0]),
        torch.tensor([-11.0, -5.0]),
        beta=0.5,
        label_smoothing=0.2,
    )
    for got, h in zip(losses.tolist(), [2.0, -1.0]):
        expected = -0.8 * log_sigmoid(0.5 * h) - 0.2 * log_sigmoid(-0.5 * h)
        assert math.isclose(got, expected, rel_tol=1e-6)


def test_zero_margin_is_log2():
    x = torch.tensor([-3.0, -7.0])
    losses, _, _ = dpo_loss(x, x, x, x, beta=0.3)
    assert torch.allclose(losses, torch.full((2,), math.log(2.0)))


def test_gradient_is_the_papers():
    """dL/dlogpi(y_w) = -beta sigmoid(r_hat(y_l) - r_hat(y_w)) = -dL/dlogpi(y_l) (paper, section 4)."""
    torch.manual_seed(0)
    pc, pr = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    rc, rr, beta = torch.randn(6), torch.randn(6), 0.7
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    weight = torch.sigmoid(rejected_rewards - chosen_rewards)
    assert torch.allclose(pc.grad, -beta * weight, atol=1e-6)
    assert torch.allclose(pr.grad, beta * weight, atol=1e-6)
