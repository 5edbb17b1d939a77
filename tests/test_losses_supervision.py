"""Supervision losses: soft Dice on one-hot labels, landmark TRE, end-point error."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from medreg.losses.supervision import EPE, TRE, Dice
from medreg.losses import functional as L

D64 = torch.float64


def _boxes(shape, boxes):
    lab = torch.zeros(shape, dtype=torch.long)
    for value, sl in boxes:
        lab[(0, 0) + sl] = value
    return lab


def test_one_hot():
    lab = torch.tensor([[[[0, 2], [1, 2]]]])
    oh = L.one_hot(lab)
    assert oh.shape == (1, 3, 2, 2) and oh.dtype == torch.float32
    assert torch.equal(oh.argmax(1, keepdim=True), lab)
    assert L.one_hot(lab, 5).shape == (1, 5, 2, 2)
    with pytest.raises(ValueError, match="0..1"):
        L.one_hot(lab, 2)
    with pytest.raises(ValueError, match="integer"):
        L.one_hot(lab.float())


def test_soft_dice_values():
    shape = (1, 1, 10, 12, 14)
    a = _boxes(shape, [(1, (slice(0, 5), slice(0, 6), slice(0, 7))), (2, (slice(5, 10),) * 1)])
    b = _boxes(shape, [(1, (slice(1, 5), slice(0, 6), slice(0, 7))), (2, (slice(6, 10),) * 1)])
    fa, fb = L.one_hot(a, 3, dtype=D64), L.one_hot(b, 3, dtype=D64)
    assert L.soft_dice(fa, fa).item() == pytest.approx(0.0, abs=1e-12)
    dice = []
    for k in range(3):
        inter = ((a == k) & (b == k)).sum().item()
        dice.append(2 * inter / ((a == k).sum().item() + (b == k).sum().item()))
    assert L.soft_dice(fa, fb, eps=0).item() == pytest.approx(1 - sum(dice) / 3, rel=1e-12)
    assert L.soft_dice(fa, fb, labels=[1, 2], eps=0).item() == pytest.approx(1 - (dice[1] + dice[2]) / 2, rel=1e-12)
    assert Dice(labels=range(1, 3), eps=0)(fa, fb).item() == pytest.approx(1 - (dice[1] + dice[2]) / 2, rel=1e-12)
    disjoint = L.soft_dice(fa[:, 1:2], fa[:, 2:3], eps=0)
    assert disjoint.item() == pytest.approx(1.0)
    # the mask restricts the voxels: inside the slab z < 5 only label 1 and 0 exist
    mask = torch.zeros(1, 1, 10, 12, 14, dtype=D64)
    mask[..., :5, :, :] = 1
    crop = (slice(None), slice(None), slice(0, 5))
    assert L.soft_dice(fa, fb, [1], mask).item() == pytest.approx(L.soft_dice(fa[crop], fb[crop], [1]).item(), rel=1e-12)
    with pytest.raises(ValueError, match="channel indices"):
        L.soft_dice(fa, fb, labels=[3])


def test_soft_dice_gradcheck():
    g = torch.Generator().manual_seed(0)
    fixed = torch.softmax(torch.randn(2, 3, 4, 5, 6, generator=g, dtype=D64), 1)
    warped = torch.softmax(torch.randn(2, 3, 4, 5, 6, generator=g, dtype=D64), 1).requires_grad_()
    assert gradcheck(lambda w: L.soft_dice(fixed, w, labels=[1, 2]), (warped,))


def test_tre():
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.0, 5.0]], dtype=D64)
    b = a + torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [100.0, 0.0, 0.0]], dtype=D64)
    d = L.tre(a, b, reduction="none")
    assert torch.allclose(d, torch.tensor([5.0, 2.0, 100.0], dtype=D64))
    assert L.tre(a, b).item() == pytest.approx(107 / 3)
    assert TRE()(a, b, torch.tensor([1, 1, 0])).item() == pytest.approx(3.5)
    assert L.tre(a[None].expand(4, 3, 3), b[None].expand(4, 3, 3)).item() == pytest.approx(107 / 3)
    pts = a.clone().requires_grad_()
    assert gradcheck(lambda p: L.tre(p, b), (pts,))
    (g0,) = torch.autograd.grad(L.tre(pts, a.clone()), (pts,))  # zero distance: finite
    assert torch.isfinite(g0).all()
    with pytest.raises(ValueError, match="equal shapes"):
        L.tre(a, b[:2])


def test_epe():
    g = torch.Generator().manual_seed(1)
    gt = torch.randn(2, 3, 4, 5, 6, generator=g, dtype=D64)
    off = torch.tensor([3.0, 0.0, 4.0], dtype=D64).view(1, 3, 1, 1, 1)
    assert L.epe(gt + off, gt).item() == pytest.approx(5.0)
    mask = torch.zeros(1, 1, 4, 5, 6, dtype=D64)
    mask[..., 0, 0, 0] = 1
    pred = gt.clone()
    pred[:, :, 0, 0, 0] += off[:, :, 0, 0, 0]
    assert EPE()(pred, gt, mask).item() == pytest.approx(5.0)
    u = gt.clone().requires_grad_()
    (g0,) = torch.autograd.grad(L.epe(u, gt), (u,))
    assert torch.isfinite(g0).all()
    assert gradcheck(lambda x: L.epe(x, gt), ((gt + 0.5).requires_grad_(),))
    with pytest.raises(ValueError, match="differ in shape"):
        L.epe(gt, gt[..., :-1])
