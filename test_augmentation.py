"""Tests of the advanced augmentation policy (--aug advanced) against Albumentations, the library the original
notebook ran it with: each operation with the same parameters on both sides, on real CIFAR-100 images where
../shared is beside the clone (else on random ones) and on random images.

Run: python -m pytest -q test_augmentation.py   (needs the test extra: pip install -e ".[test]")
"""

import numpy as np
import pytest
import torch

import cifar100_resnet as cr
from conftest import SHARED, assert_same_tensors, synthetic_data

A = pytest.importorskip("albumentations", reason="Albumentations is the reference: pip install -e '.[test]'")
cv2 = pytest.importorskip("cv2")
from albumentations.augmentations.dropout import functional as fdropout  # noqa: E402
from albumentations.augmentations.geometric import functional as fgeometric  # noqa: E402
from albumentations.augmentations.pixel import functional as fpixel  # noqa: E402


@pytest.fixture(scope="module")
def images(request) -> torch.Tensor:
    """300 uint8 (3, 32, 32) images: 100 random ones, and 200 real CIFAR-100 test images where ../shared is
    beside the clone (200 more random ones elsewhere)."""
    g = torch.Generator().manual_seed(0)
    random = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=g)
    if not (SHARED / "tools" / "cifar100_to_official_layout.py").exists():
        return torch.cat([random, torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=g)])
    folder = request.getfixturevalue("real_cifar100_subset")
    return torch.cat([random, cr.read_cifar(str(folder / "cifar-100-python")).test_images[:200]])


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy() if t.dim() == 4 else t.numpy()


def each(function, images: torch.Tensor, *args) -> np.ndarray:
    return np.stack([function(x, *args) for x in hwc(images)])


def difference(ours: torch.Tensor, theirs: np.ndarray) -> int:
    return int(np.abs(hwc(ours).astype(int) - np.asarray(theirs).astype(int)).max())


def test_to_gray_and_coarse_dropout_are_exactly_albumentations(images):
    gray = A.ToGray(p=1.0)
    assert difference(cr.to_gray(images), np.stack([gray(image=x)["image"] for x in hwc(images)])) == 0
    g = torch.Generator().manual_seed(1)
    boxes = cr.dropout_boxes(len(images), 32, 32, g)
    theirs = [fdropout.cutout(x, b[b[:, 2] > b[:, 0]][:, [1, 0, 3, 2]].numpy(), 0, np.random.default_rng(0))
              for x, b in zip(hwc(images), boxes)]
    assert difference(cr.coarse_dropout(images, boxes), np.stack(theirs)) == 0
    sides = (boxes[..., 2:] - boxes[..., :2])[boxes[..., 2] > 0]
    assert sides.min() >= 3 and sides.max() <= 8 and (boxes[..., :2] >= 0).all() and (boxes[..., 2:] <= 32).all()


@pytest.mark.parametrize("factor", [0.8, 0.93, 1.0, 1.17, 1.2])
def test_colour_jitters_four_parts_are_albumentations_within_one_grey_level(images, factor):
    f = torch.full((len(images),), factor)
    assert difference(cr.adjust_brightness(images, f), each(fpixel.adjust_brightness_torchvision, images, factor)) <= 1
    assert difference(cr.adjust_contrast(images, f), each(fpixel.adjust_contrast_torchvision, images, factor)) <= 1
    assert difference(cr.adjust_saturation(images, f), each(fpixel.adjust_saturation_torchvision, images, factor)) <= 1
    hue = factor - 1  # -0.2 .. 0.2; compared on floating-point images, where OpenCV keeps hue in degrees
    theirs = np.stack([fpixel.adjust_hue_torchvision(x.astype(np.float32) / 255, hue) for x in hwc(images)]) * 255
    assert np.abs(hwc(cr.adjust_hue(images, torch.full((len(images),), hue))).astype(float) - theirs).max() <= 1


def test_clahe_is_albumentations_on_grey_planes_exactly_and_on_colour_images_within_two_grey_levels(images):
    g = torch.Generator().manual_seed(2)
    grey = torch.cat([cr.to_gray_uint8(images), torch.randint(0, 256, (50, 32, 32), dtype=torch.uint8, generator=g)])
    for clip in (1.0, 2.5, 4.0):
        assert difference(cr.clahe_luminance(grey, torch.full((len(grey),), clip)),
                          each(fpixel.clahe, grey, clip, (2, 2))) == 0
    # colour: CLAHE on the L of OpenCV's 8-bit Lab, rebuilt here bit for bit except where OpenCV's own rounding
    # of a or b differs by one (about 1 pixel in 10,000); the conversion back is exact
    lab = hwc(cr.rgb_to_lab(images))
    opencv = each(cv2.cvtColor, images, cv2.COLOR_RGB2LAB)
    same = (lab == opencv).all(-1)
    assert same.mean() > 0.999 and (lab[..., 0] == opencv[..., 0]).all()
    assert difference(cr.lab_to_rgb(torch.from_numpy(opencv).permute(0, 3, 1, 2)), each(cv2.cvtColor, torch.from_numpy(
        opencv).permute(0, 3, 1, 2), cv2.COLOR_LAB2RGB)) == 0
    for clip in (1.0, 4.0):
        ours = hwc(cr.clahe(images, torch.full((len(images),), clip))).astype(int)
        theirs = each(fpixel.clahe, images, clip, (2, 2)).astype(int)
        assert np.abs(ours - theirs).max(-1)[same].max() <= 2


def test_grid_distortion_and_elastic_sample_albumentations_fields_within_interpolation_error(images):
    # OpenCV 4's remap rounds each source coordinate to 1/32 pixel first (up to 5 grey levels apart on random
    # images); OpenCV 5's, like cr.remap, interpolates at the coordinate itself
    opencv = (lambda m: torch.round(m * 32) / 32) if int(cv2.__version__.split(".")[0]) < 5 else (lambda m: m)
    rng = np.random.default_rng(3)
    steps = 1 + rng.uniform(-0.3, 0.3, (len(images), 2, cr.GRID_STEPS + 1))
    map_x, map_y = cr.grid_distortion_maps(torch.tensor(steps[:, 0]), torch.tensor(steps[:, 1]), 32, 32)
    theirs, their_maps = [], []
    for i, x in enumerate(hwc(images)):
        normal = fgeometric.normalize_grid_distortion_steps((32, 32), cr.GRID_STEPS, list(steps[i, 0]),
                                                              list(steps[i, 1]))
        ax, ay = fgeometric.generate_grid((32, 32), normal["steps_x"], normal["steps_y"], cr.GRID_STEPS)
        assert np.abs(map_x[i].numpy() - ax).max() < 1e-4 and np.abs(map_y[i].numpy() - ay).max() < 1e-4
        theirs.append(fgeometric.remap(x, ax, ay, cv2.INTER_LINEAR, cv2.BORDER_CONSTANT, 0))
        their_maps.append(np.stack([ax, ay]).astype(np.float32))
    # each remap at the same coordinates: a map 1e-6 apart can round to the other 1/32 pixel in OpenCV 4
    their_x, their_y = torch.from_numpy(np.stack(their_maps)).unbind(1)
    assert difference(cr.remap(images, opencv(their_x), opencv(their_y)), np.stack(theirs)) <= 1

    dx, dy = fgeometric.generate_displacement_fields((32, 32), cr.ELASTIC_ALPHA, cr.ELASTIC_SIGMA, False, (0, 0),
                                                     np.random.default_rng(4), "gaussian")
    grid_x, grid_y = np.meshgrid(np.arange(32), np.arange(32))
    theirs = each(fgeometric.remap, images, (grid_x + dx).astype(np.float32), (grid_y + dy).astype(np.float32),
                  cv2.INTER_LINEAR, cv2.BORDER_CONSTANT, 0)
    n = len(images)
    ours = cr.remap(images, *(opencv(m.float()) for m in cr.displacement_maps(torch.from_numpy(dx).expand(n, 32, 32),
                                                                              torch.from_numpy(dy).expand(n, 32, 32))))
    assert difference(ours, theirs) <= 1
    zero = torch.zeros(n, 32, 32)
    assert torch.equal(cr.remap(images, *cr.displacement_maps(zero, zero)), images)
    # our own fields: Gaussian noise scaled to at most 1, blurred, times alpha: about a pixel
    map_x, map_y = cr.elastic_maps(200, 32, 32, torch.Generator().manual_seed(5))
    shift = (map_x - torch.arange(32.0)).abs().amax((1, 2))
    assert 0.1 < float(shift.median()) < 2.0


def test_the_policy_keeps_shape_dtype_and_range_is_the_identity_at_p_0_and_repeats_with_its_generator(images):
    out, chosen = cr.advanced_augment(images, torch.Generator().manual_seed(6))
    assert out.shape == images.shape and out.dtype == torch.uint8 and chosen.shape == (len(images), 2)
    assert (chosen[chosen >= 0] < len(cr.ADVANCED_OPERATIONS)).all()
    assert torch.equal(out[(chosen < 0).all(1)], images[(chosen < 0).all(1)])  # images no operation chose
    again, chosen_again = cr.advanced_augment(images, torch.Generator().manual_seed(6))
    assert torch.equal(out, again) and torch.equal(chosen, chosen_again)
    never = tuple((0.0, members) for _, members in cr.ADVANCED_POLICY)
    same, none = cr.advanced_augment(images, torch.Generator().manual_seed(6), never)
    assert torch.equal(same, images) and (none == -1).all()
    # one image repeated: each copy draws its own parameters
    copies = images[:1].expand(64, -1, -1, -1).contiguous()
    jittered = cr.color_jitter(copies, torch.Generator().manual_seed(7))
    assert len({bytes(x.numpy()) for x in jittered}) == 64
    boxes = cr.dropout_boxes(64, 32, 32, torch.Generator().manual_seed(8))
    assert len({bytes(b.numpy()) for b in boxes}) > 50


def test_one_of_picks_each_member_as_often_as_albumentations_would():
    n = 6000
    blank = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    _, chosen = cr.advanced_augment(blank, torch.Generator().manual_seed(9))
    for group, (p, members) in enumerate(cr.ADVANCED_POLICY):
        picked = chosen[:, group]
        total = sum(q for _, q in members)
        for m, (_, q) in enumerate(members):
            expected = n * p * q / total  # the group's probability, then the member's share of the p's
            sd = (n * (p * q / total) * (1 - p * q / total)) ** 0.5
            assert abs(int((picked == m + 3 * group).sum()) - expected) < 5 * sd  # fixed seed: never flakes
        assert abs(int((picked < 0).sum()) - n * (1 - p)) < 5 * (n * p * (1 - p)) ** 0.5


def test_an_advanced_run_trains_and_resumes_bit_identically_on_the_cpu(tmp_path):
    data = synthetic_data(n_train=128, n_test=64, dataset="cifar100")
    config = cr.TrainConfig(dataset="cifar100", arch="resnet18", width=4, batch_size=32, epochs=2, device="cpu",
                            aug="advanced", quiet=True)
    straight = cr.train(config, data)
    assert len(straight.history) == 2 and np.isfinite(straight.history[-1]["train_loss"])
    in_folder = cr.TrainConfig(**{**config.saved(), "out_dir": str(tmp_path / "run"), "quiet": True})
    stop = iter([False, False, True])  # stop after the 3rd step of epoch 1: inside the epoch
    assert cr.train(in_folder, data, should_stop=lambda: next(stop, False)).interrupted
    resumed = cr.train(in_folder, data, resume=str(tmp_path / "run"))
    assert not resumed.interrupted
    assert_same_tensors(resumed.model.state_dict(), straight.model.state_dict())
