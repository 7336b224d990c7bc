"""Tests of bench/notebook_mixing.py: its mixing against the notebook's own code, given the same random draws."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cifar100_resnet as cr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import notebook_mixing as nm  # noqa: E402


def notebook_training_step_mixing(x, y, use_mixup, use_cutmix, alpha, beta, randperm, randint):
    """The notebook's mixup_data, cutmix_data and the mixing lines of its train_epoch, copied as its README
    prints them, with np.random.beta, torch.randperm and np.random.randint passed in (to give both sides
    the same draws)."""
    def mixup_data(x, y, alpha):
        lam = beta(alpha, alpha)
        idx = randperm(x.size(0))
        x2, y2 = x[idx], y[idx]
        mixed_x = lam * x + (1 - lam) * x2
        return mixed_x, y, y2, lam

    def cutmix_data(x, y, alpha):
        lam = beta(alpha, alpha)
        b, _, h, w = x.size()
        idx = randperm(b)
        x2, y2 = x[idx], y[idx]
        cx, cy = randint(w), randint(h)
        rw, rh = int(w * np.sqrt(1 - lam)), int(h * np.sqrt(1 - lam))
        x[:, :, cy:cy + rh, cx:cx + rw] = x2[:, :, cy:cy + rh, cx:cx + rw]
        lam = 1 - (rw * rh) / (w * h)
        return x, y, y2, lam

    x = x.clone()  # the notebook's loader hands it a fresh batch each step
    y1, y2, lam = y, y, 1.0
    if use_mixup:
        x, y1, y2, lam = mixup_data(x, y, alpha)
    if use_cutmix:
        x, y1, y2, lam = cutmix_data(x, y, alpha)
    return x, y1, y2, lam


def draws(seed):
    """The draws of the generator the run mixes with, in the notebook's order of calls."""
    g = torch.Generator().manual_seed(seed)
    return (lambda a, b: cr.sample_beta(a, g), lambda n: torch.randperm(n, generator=g),
            lambda high: int(torch.randint(0, high, (), generator=g)))


@pytest.mark.parametrize("mixup,cutmix", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("seed", range(6))
def test_the_notebooks_mixing_is_what_its_code_computes(mixup, cutmix, seed):
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(100 + seed))
    labels = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(200 + seed))
    config = cr.TrainConfig(mixup=mixup, cutmix=cutmix)
    before = images.clone()
    mine = nm.notebook_mix_batch(images, labels, config, torch.Generator().manual_seed(seed))
    reference = notebook_training_step_mixing(images, labels, mixup, cutmix, 1.0, *draws(seed))
    assert torch.equal(images, before)  # the caller's batch is left as it was
    torch.testing.assert_close(mine[0], reference[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(mine[1], reference[1]) and torch.equal(mine[2], reference[2])
    assert mine[3] == pytest.approx(reference[3], rel=1e-12)


def test_the_bugs_it_keeps_are_there():
    # images that are their own index, constant over pixels: a pixel's value says which images it blends
    n = 8
    images = torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    labels = torch.arange(n)
    clipped = 0
    for seed in range(40):
        x, a, b, lam = nm.notebook_mix_batch(images, labels, cr.TrainConfig(), torch.Generator().manual_seed(seed))
        assert torch.equal(a, labels)  # CutMix's labels: MixUp's partners are named nowhere...
        # ...yet they are in the pixels: away from the box each image is its MixUp blend, not itself
        outside = ~(x != x[:, :, :1, :1]).any(1)  # pixels equal to the top-left one (CutMix pastes elsewhere)
        assert any(x[i][:, outside[i]].ne(i).all() for i in range(n))
        area = (~outside[0]).sum().item() / (32 * 32)
        clipped += area > 0 and not math.isclose(lam, 1 - area, abs_tol=1e-9)
    assert clipped > 5  # lam counts the asked-for area where the box ran off the image
