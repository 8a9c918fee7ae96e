"""MCCL terms against hand computations."""

import math

import pytest
import torch

from trainer.methods.synseg.losses import LossConfig, MCCLoss, synergy

LO, HI = 0.005, 0.995


def batch():
    # image 0: two categories; image 1: one; image 2: none (all padding)
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [9.0, 9.0]], [[1.0, 2.0], [3.0, 4.0]]])
    fbar = torch.tensor(
        [[[1.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [9.0, 9.0]], [[1.0, 2.0], [3.0, 4.0]]]
    )
    text = torch.tensor(
        [[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [9.0, 9.0]], [[1.0, 2.0], [3.0, 4.0]]]
    )
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    return f, fbar, text, mask


def test_each_term_by_hand():
    terms = MCCLoss(LossConfig())(*batch())
    r = 1 / math.sqrt(2)
    # image 0: sim(f1,t1)=1->0.995, sim(f2,t2)=r; image 1: sim(f,t)=0->0.005
    align0 = -(math.log(HI) + math.log(r)) / 2
    align1 = -math.log(LO)
    assert terms["align"].item() == pytest.approx((align0 + align1) / 2, rel=1e-5)
    # cont: image 0 sims r and 0->0.005; image 1 sim(f, fbar)=1->0.995
    cont0 = -(math.log(1 - r) + math.log(1 - LO)) / 2
    cont1 = -math.log(1 - HI)
    assert terms["cont"].item() == pytest.approx((cont0 + cont1) / 2, rel=1e-5)
    # back: image 0 has pairs (1,2),(2,1) with sim r, over N^2 = 4; image 1 has no pair
    back0 = -2 * math.log(r) / 4
    assert terms["back"].item() == pytest.approx((back0 + 0) / 2, rel=1e-5)
    # sep: sim(f1, f2) = 0 -> 0.005
    sep0 = -2 * math.log(1 - LO) / 4
    assert terms["sep"].item() == pytest.approx((sep0 + 0) / 2, rel=1e-5)
    total = terms["align"] + terms["cont"] + 10 * terms["back"] + terms["sep"]
    assert terms["total"].item() == pytest.approx(total.item(), rel=1e-6)


def test_weights_switch_terms_off():
    full = MCCLoss(LossConfig())(*batch())
    no_sep = MCCLoss(LossConfig(sep=0.0, back=1.0))(*batch())
    want = full["align"] + full["cont"] + full["back"]
    assert no_sep["total"].item() == pytest.approx(want.item(), rel=1e-6)


def test_padding_does_not_change_the_loss():
    f, fbar, text, mask = batch()
    a = MCCLoss(LossConfig())(f, fbar, text, mask)
    f2, fbar2, text2 = f.clone(), fbar.clone(), text.clone()
    f2[~mask] = torch.randn_like(f2[~mask])
    fbar2[~mask] = torch.randn_like(fbar2[~mask])
    b = MCCLoss(LossConfig())(f2, fbar2, text2, mask)
    for k in ("align", "cont", "back", "sep", "total"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6)


def test_straight_through_gives_cont_a_gradient_at_a_random_start():
    # foreground and background features nearly equal: sim > 0.995, clamped
    f = torch.tensor([[[1.0, 0.01]]], requires_grad=True)
    fbar = torch.tensor([[[1.0, 0.0]]])
    text = torch.tensor([[[0.0, 1.0]]])
    mask = torch.tensor([[True]])
    hard = MCCLoss(LossConfig(align=0, back=0, sep=0))(f, fbar, text, mask)["total"]
    (g_hard,) = torch.autograd.grad(hard, f)
    st = MCCLoss(LossConfig(align=0, back=0, sep=0, straight_through=True))(f, fbar, text, mask)[
        "total"
    ]
    (g_st,) = torch.autograd.grad(st, f)
    assert hard.item() == pytest.approx(st.item())  # same value forward
    assert g_hard.abs().sum() == 0 and g_st.abs().sum() > 0


def test_synergy_is_a_mass_normalised_mean():
    maps = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])  # (B=1, N=1, HW=4)
    feats = torch.arange(8.0).view(1, 4, 2)  # (B, HW, d)
    f, fbar = synergy(maps, feats)
    assert torch.allclose(f, torch.tensor([[[0.0, 1.0]]]), atol=1e-5)
    assert torch.allclose(fbar, feats[0, 1:].mean(0).view(1, 1, 2), atol=1e-5)
    per_slot = feats[:, None].expand(1, 1, 4, 2)  # (B, N, HW, d) gives the same
    f2, fbar2 = synergy(maps, per_slot)
    assert torch.allclose(f, f2) and torch.allclose(fbar, fbar2)


def test_absent_term_pushes_maps_dark():
    f, fbar, text, mask = batch()
    dark = torch.zeros(3, 2, 4)
    bright = torch.full((3, 2, 4), 0.5)
    loss = MCCLoss(LossConfig(neg=1.0))
    assert loss(f, fbar, text, mask, dark)["neg"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss(f, fbar, text, mask, bright)["neg"].item() == pytest.approx(
        -math.log(0.5), rel=1e-5
    )
