"""PPO math against hand-computed cases."""
import math

import pytest
import torch

from align.ppo import losses
from align.ppo.kl import AdaptiveKL


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3], [0.5, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0], [1.5, 2.0, 0.0]]))


def test_gae_discount():
    adv, ret = losses.gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.9, 1.0]]))


def test_token_rewards_put_score_on_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = losses.token_rewards(torch.tensor([1.0, 2.0]), kl, mask, beta=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.01, -0.02, 1.0 - 0.03], [-0.05, 2.0 - 0.05, 0.0]]))


def test_kl_sign_conventions():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-2.0, -1.0])
    k1 = losses.kl_per_token(logp, ref, "k1")
    torch.testing.assert_close(k1, torch.tensor([1.0, -1.0]))  # policy likes its sample more -> positive
    k3 = losses.kl_per_token(logp, ref, "k3")
    assert (k3 >= 0).all()
    assert k3[0] == pytest.approx(math.exp(-1) - 1 + 1)
    assert float(losses.kl_per_token(ref, ref, "k3").abs().max()) == 0.0
    torch.testing.assert_close(losses.kl_per_token(logp, ref, "k2"), torch.tensor([0.5, 0.5]))


def test_kl_loss_token_mean_and_its_gradient():
    """kl_penalty=loss: token mean over real tokens; k2's gradient w.r.t. log pi is the
    log-ratio itself (KL's gradient on-policy), spread over the real tokens; k1 is refused."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0, -1.0], [-1.0, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss = losses.kl_loss(logp, ref, mask, "k2")
    assert float(loss) == pytest.approx((0.5 * (1 + 0 + 4) + 0.5 * (0.25 + 0.25)) / 5)
    loss.backward()
    torch.testing.assert_close(logp.grad, (logp.detach() - ref) * mask / 5)
    k3 = losses.kl_loss(logp.detach(), ref, mask, "k3")
    assert float(k3) == pytest.approx(float(((torch.expm1(ref - logp.detach()) - (ref - logp.detach())) * mask).sum() / 5))
    with pytest.raises(ValueError, match="k2 or k3"):
        losses.kl_loss(logp, ref, mask, "k1")


@pytest.mark.parametrize("adv, ratio, clipped", [
    (1.0, 1.5, True),    # good action already pushed up past 1+eps: no more push
    (1.0, 0.5, False),   # good action below: full gradient
    (-1.0, 0.5, True),   # bad action already pushed down past 1-eps
    (-1.0, 1.5, False),  # bad action above: full gradient (pessimistic bound)
])
def test_policy_loss_clipping(adv, ratio, clipped):
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, info = losses.policy_loss(logp, old, torch.tensor([[adv]]), torch.ones(1, 1), clip=0.2)
    loss.backward()
    expected = -min(ratio * adv, max(min(ratio, 1.2), 0.8) * adv)
    assert float(loss.detach()) == pytest.approx(expected)
    assert float(info["clipfrac"]) == (1.0 if clipped else 0.0)
    assert (float(logp.grad.abs().sum()) == 0.0) == clipped


def test_policy_loss_masks_padding_and_approx_kl():
    logp = torch.tensor([[0.0, 5.0]])
    loss, info = losses.policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]))
    assert float(loss) == -1.0 and float(info["approx_kl"]) == 0.0


def test_value_loss_clipped():
    v = torch.tensor([[2.0]])
    loss, info = losses.value_loss(v, torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), clip=0.2)
    # clipped value 1.2 is further from the return 3.0 -> the larger (clipped) error counts
    assert float(loss) == pytest.approx(0.5 * (3.0 - 1.2) ** 2)
    assert float(info["value_clipfrac"]) == 1.0


def test_whiten_and_group_advantages():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = losses.masked_whiten(x, m)
    assert float(losses.masked_mean(w, m)) == pytest.approx(0.0, abs=1e-6)
    assert float(w[0, 3]) == 0.0
    s = torch.tensor([1.0, 3.0, 0.0, 0.0])
    g = losses.group_advantages(s, 2, "grpo")
    assert g[0] < 0 < g[1] and g[2] == 0 and g[3] == 0
    torch.testing.assert_close(losses.group_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, "rloo"),
                               torch.tensor([1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5]))


def test_adaptive_kl_controller_moves_toward_target():
    ctl = AdaptiveKL(0.1, target=1.0, horizon=100)
    assert ctl.update(current_kl=2.0, n_steps=10) > 0.1
    ctl = AdaptiveKL(0.1, target=1.0, horizon=100)
    assert ctl.update(current_kl=0.5, n_steps=10) < 0.1


def test_group_advantages_keep_their_sign_with_unequal_lengths():
    """Regression: a group of 4 where one long answer is worse than its group. Broadcast to
    tokens and whitened over tokens, the long answer's many tokens drag the token mean below
    zero and a *better* answer's advantage turned negative; the group estimators now only rescale."""
    from align.ppo.advantages import ESTIMATORS

    scores = torch.tensor([1.0, 2.0, 0.0, 1.5])  # one prompt, 4 samples
    lengths = [2, 2, 12, 2]                      # the worst answer is the long one
    mask = torch.zeros(4, 12)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    seq = losses.group_advantages(scores, 4, "rloo")  # hand: s - mean(others) = [-0.17, 1.17, -1.5, 0.5]
    torch.testing.assert_close(seq, torch.tensor([1 - 3.5 / 3, 2 - 2.5 / 3, 0 - 4.5 / 3, 1.5 - 3 / 3]))
    tok = seq[:, None] * mask
    old = losses.masked_whiten(tok, mask)
    assert old[0, 0] > 0 > seq[0]  # the defect: sample 0 was worse than its group, yet pushed up
    new = ESTIMATORS["rloo"].normalize(tok, mask)
    for i in range(4):
        assert torch.all(torch.sign(new[i, :lengths[i]]) == torch.sign(seq[i]))
    # hand: RMS over the 18 real tokens
    rms = (sum(n * float(seq[i]) ** 2 for i, n in enumerate(lengths)) / 18) ** 0.5
    torch.testing.assert_close(new[1, 0], seq[1] / rms)
    assert ESTIMATORS["gae"].normalize is losses.masked_whiten  # the critic's advantages are centred as before
