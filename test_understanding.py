"""Tests of the pictures for understanding a run: report (per-class metrics, superclasses, confusion,
calibration, report.html), preview-aug (the training step's own augmentation) and conv-demo (output sizes).
Each number is checked against a slow count written here or against torch itself.

Run: python -m pytest -q test_understanding.py
"""

import csv
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cifar100_resnet as cr
from conftest import SHARED
from test_cifar100_resnet import synthetic_data, tiny_args, write_official_layout


@pytest.fixture(scope="module")
def tiny_cifar100(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_official_layout(root, n_train=256, n_test=128)
    return root


@pytest.fixture(scope="module")
def tiny_val_run(tiny_cifar100, tmp_path_factory) -> Path:
    """A 2-epoch tiny CIFAR-100 run that holds out 64 training images."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert cr.main(tiny_args(tiny_cifar100, out, "--val-split", "64")) == 0
    return out


def read_csv(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------
# The numbers


def test_the_reader_keeps_each_classs_superclass(tiny_cifar100):
    data = cr.read_cifar(str(tiny_cifar100 / "cifar-100-python"))
    assert data.superclass_of.tolist() == [c // 5 for c in range(100)]  # what the writer above gave them
    assert data.superclasses == [f"super_{i}" for i in range(20)]
    c10 = write_official_layout(tiny_cifar100.parent / "ten", n_train=50, n_test=10, dataset="cifar10")
    assert cr.read_cifar(str(c10), "cifar10").superclass_of is None


@pytest.mark.skipif(not (SHARED / "data" / "cifar100" / "fine_to_coarse.npy").exists(),
                    reason="the real CIFAR-100 (../shared) is not beside this clone")
def test_the_real_superclasses_are_the_official_ones(real_cifar100_subset):
    data = cr.read_cifar(str(real_cifar100_subset / "cifar-100-python"))
    official = np.load(SHARED / "data" / "cifar100" / "fine_to_coarse.npy")
    assert data.superclass_of.tolist() == official.tolist()
    names = (SHARED / "data" / "cifar100" / "coarse_classes.txt").read_text().split()
    assert data.superclasses == names


def test_per_class_metrics_and_confusion_equal_a_slow_count():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (500,), generator=g)
    predictions = torch.where(torch.rand(500, generator=g) < 0.6, labels, torch.randint(0, 7, (500,), generator=g))
    predictions[predictions == 6] = 5  # class 6 is never predicted: its precision is 0 by definition
    confusion = cr.confusion_matrix(predictions, labels, 7)
    for t in range(7):
        for p in range(7):
            assert confusion[t, p] == sum(1 for a, b in zip(labels.tolist(), predictions.tolist()) if (a, b) == (t, p))
    for row in cr.per_class_metrics(confusion):
        c = row["class"]
        mine = [(a, b) for a, b in zip(labels.tolist(), predictions.tolist()) if a == c]
        predicted_as = [(a, b) for a, b in zip(labels.tolist(), predictions.tolist()) if b == c]
        assert row["support"] == len(mine)
        assert row["recall"] == row["accuracy"] == pytest.approx(sum(a == b for a, b in mine) / len(mine))
        assert row["precision"] == pytest.approx(sum(a == b for a, b in predicted_as) / len(predicted_as)
                                                 if predicted_as else 0.0)
    pairs = cr.most_confused_pairs(confusion, k=5)
    off = [(int(confusion[t, p]), t, p) for t in range(7) for p in range(7) if t != p]
    assert [c for _, _, c in pairs] == sorted((c for c, _, _ in off), reverse=True)[:5]
    assert all(confusion[t, p] == c for t, p, c in pairs)


def test_calibration_error_is_near_zero_when_calibrated_and_the_gap_when_overconfident():
    g = torch.Generator().manual_seed(1)
    n, k = 200_000, 10
    confidence = 0.1 + 0.9 * torch.rand(n, generator=g)  # the top probability, drawn
    labels = torch.zeros(n, dtype=torch.long)
    correct = torch.rand(n, generator=g) < confidence  # right exactly that often: calibrated
    probabilities = torch.zeros(n, k)
    probabilities[:, 0] = confidence
    probabilities[:, 1:] = ((1 - confidence) / (k - 1))[:, None]
    labels[~correct] = 1 + torch.randint(0, k - 1, (int((~correct).sum()),), generator=g)
    assert cr.calibration(probabilities, labels)["ece"] < 0.01

    # over-confident: every image at confidence 0.9, right 60 % of the time: ECE = |0.6 - 0.9| = 0.3
    probabilities = torch.full((1000, k), 0.1 / (k - 1))
    probabilities[:, 0] = 0.9
    labels = torch.tensor([0] * 600 + [1] * 400)
    result = cr.calibration(probabilities, labels, bins=15)
    assert result["ece"] == pytest.approx(0.3, abs=1e-6)
    filled = [b for b in result["bins"] if b["count"]]
    assert len(filled) == 1 and filled[0]["low"] < 0.9 <= filled[0]["high"] and filled[0]["count"] == 1000


def test_superclass_accuracy_and_the_share_of_errors_inside_the_right_superclass():
    data = synthetic_data(n_train=10, n_test=10, dataset="cifar100")
    data.superclass_of, data.superclasses = torch.arange(100) // 5, [f"s{i}" for i in range(20)]
    labels = torch.tensor([0, 1, 2, 3, 10, 11, 50, 99])
    predicted = torch.tensor([0, 2, 4, 7, 10, 30, 51, 99])  # wrong: 1->2, 2->4 (same), 3->7, 11->30, 50->51 (same)
    logits = F.one_hot(predicted, 100).float() * 5
    result = cr.analyse_predictions(logits, labels, data)
    assert result["top1"] == pytest.approx(3 / 8)
    assert result["superclass_top1"] == pytest.approx(6 / 8)  # the 3 right, and 1->2, 2->4, 50->51
    assert result["errors_in_right_superclass"] == pytest.approx(3 / 5)
    per_super = {s["superclass"]: s for s in result["per_superclass"]}
    assert per_super[0]["support"] == 4 and per_super[0]["top1"] == pytest.approx(1 / 4)
    assert per_super[0]["superclass_top1"] == pytest.approx(3 / 4)


def test_the_analysis_adds_up_per_class_confusion_blocks_and_superclasses_agree():
    data = synthetic_data(n_train=10, n_test=10, dataset="cifar100")
    g = torch.Generator().manual_seed(2)
    data.superclass_of = torch.randperm(100, generator=g) % 20  # any mapping of 5 classes to each superclass
    data.superclasses = [f"s{i}" for i in range(20)]
    labels = torch.randint(0, 100, (3000,), generator=g)
    logits = torch.randn(3000, 100, generator=g) + 4 * F.one_hot(labels, 100) * (torch.rand(3000, 1, generator=g) < 0.5)
    a = cr.analyse_predictions(logits, labels, data)
    confusion = a["confusion"]
    assert int(confusion.sum()) == 3000 and int(confusion.diag().sum()) == round(a["top1"] * 3000)
    assert sum(r["accuracy"] * r["support"] for r in a["per_class"]) / 3000 == pytest.approx(a["top1"])
    # superclass top-1 again: the confusion matrix's counts summed over superclass blocks
    blocks = torch.zeros(20, 20, dtype=torch.long)
    for t in range(100):
        for p in range(100):
            blocks[data.superclass_of[t], data.superclass_of[p]] += confusion[t, p]
    assert a["superclass_top1"] == pytest.approx(float(blocks.diag().sum()) / 3000)
    wrong = 3000 - int(confusion.diag().sum())
    assert a["errors_in_right_superclass"] == pytest.approx((float(blocks.diag().sum()) - confusion.diag().sum().item())
                                                            / wrong)


# ----------------------------------------------------------------------------------------------------------
# report


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])


def test_report_writes_what_the_run_measured_and_a_self_contained_page(tiny_val_run, capsys):
    plt = pytest.importorskip("matplotlib.pyplot")
    assert cr.main(["report", str(tiny_val_run), "--device", "cpu"]) == 0
    folder = tiny_val_run / "report"
    printed = capsys.readouterr().out
    assert "superclass top-1" in printed and "report.html" in printed
    summary = json.loads((folder / "summary.json").read_text())
    measured = cr.evaluate_checkpoint(str(tiny_val_run), device="cpu")
    for split in ("test", "val"):
        assert summary[split]["top1"] == pytest.approx(measured[split]["top1"])
        assert summary[split]["top5"] == pytest.approx(measured[split]["top5"])
    # per_class.csv against a slow count from the model's own predictions
    run = cr.load_run(str(tiny_val_run), device="cpu")
    images, labels = run.splits["test"]
    predicted = cr.predict(run.model, images, run.normalize)[""].argmax(1)
    rows = read_csv(folder / "per_class.csv")
    assert len(rows) == 100 and rows[7]["name"] == "class_7" and rows[7]["superclass"] == "super_1"
    for row in rows[:20]:
        c = int(row["class"])
        support = int((labels == c).sum())
        assert int(row["support"]) == support
        if support:
            assert float(row["accuracy"]) == pytest.approx(float((predicted[labels == c] == c).float().mean()))
    assert len(read_csv(folder / "val_per_class.csv")) == 100
    pairs = read_csv(folder / "confused_pairs.csv")
    assert 0 < len(pairs) <= 20 and all(p["true"] != p["predicted"] for p in pairs)
    assert int(pairs[0]["count"]) >= int(pairs[-1]["count"])
    # every figure decodes at the size it was drawn
    sizes = {"per_class.png": (572, 1925), "confusion.png": (1100, 1210), "mistakes.png": (1210, 1320),
             "calibration.png": (792, 704), "curves.png": (533, 1760), "val_confusion.png": (1100, 1210)}
    for name, size in sizes.items():
        assert plt.imread(folder / name).shape[:2] == size, name
    # the page: parses, and every image is embedded
    page = _Images()
    page.feed((folder / "report.html").read_text())
    assert len(page.sources) >= 11 and all(s.startswith("data:image/png;base64,") for s in page.sources)
    assert page.links == []


# ----------------------------------------------------------------------------------------------------------
# preview-aug


@pytest.mark.parametrize("aug", ["basic", "advanced"])
def test_the_preview_shows_exactly_what_the_trainer_feeds_the_model(monkeypatch, aug):
    data = synthetic_data(n_train=256, n_test=32, dataset="cifar100")
    config = cr.TrainConfig(dataset="cifar100", arch="resnet18", width=4, batch_size=32, device="cpu", seed=3,
                            quiet=True, epochs=1, aug=aug)
    shown = cr.preview_augmentation(config, data, batches=2, per_batch=8)
    assert {b["method"] for b in shown} == {"mixup", "cutmix"}  # both on: one batch of each is shown

    fed = []
    monkeypatch.setattr(cr.Trainer, "_step", lambda self, x, a, b, lam, weight=1.0:
                        fed.append((x, a, b, float(lam))) or torch.zeros(()))
    trainer = cr.Trainer(config, data, log=lambda m: None)
    trainer.train_epoch()
    for batch in shown:
        x, labels_a, labels_b, lam = fed[batch["step"] - 1]
        assert torch.equal(batch["inputs"], x)
        assert torch.equal(batch["labels_a"], labels_a[:8]) and torch.equal(batch["labels_b"], labels_b[:8])
        assert batch["lam"] == pytest.approx(lam)
        # the displayed mixed images are those inputs, un-normalised
        assert torch.allclose(batch["mixed"], cr._denormalize(x[:8], data), atol=1e-4)
    # the crop offsets and flips shown are the ones that made the images (and with the advanced policy, an
    # image is changed further exactly when an operation is named under it)
    named = 0
    for batch in shown:
        for i in range(8):
            dy, dx = int(batch["dy"][i]) + cr.CROP_PADDING, int(batch["dx"][i]) + cr.CROP_PADDING
            window = F.pad(batch["original"][i], (cr.CROP_PADDING,) * 4)[:, dy:dy + 32, dx:dx + 32]
            if batch["flipped"][i]:
                window = window.flip(2)
            ran = batch["operations"][i]
            assert set(ran) <= set(cr.ADVANCED_OPERATIONS) and (aug == "advanced" or not ran)
            named += bool(ran)
            if not ran:
                assert torch.equal(window, batch["augmented"][i])
    assert (named > 0) == (aug == "advanced")


def test_preview_command_draws_the_grid(tiny_cifar100, tmp_path, capsys):
    plt = pytest.importorskip("matplotlib.pyplot")
    out = tmp_path / "aug.png"
    assert cr.main(["preview-aug", "--data-dir", str(tiny_cifar100), "--no-download", "--batch-size", "32",
                    "--out", str(out), "--images", "6"]) == 0
    assert "step 1:" in capsys.readouterr().out
    assert plt.imread(out).shape[:2] == (1287, 1155)  # 6 columns x 1.75 in, 6 rows x 1.95 in, at 110 dpi


# ----------------------------------------------------------------------------------------------------------
# conv-demo


def test_the_output_size_formula_is_what_conv2d_produces_for_every_size_kernel_stride_and_padding():
    for n in (32, 31, 17, 8, 7):
        x = torch.zeros(1, 1, n, n)
        for k in (1, 3, 5, 7):
            for s in (1, 2, 3):
                for p in (0, 1, 2):
                    if n + 2 * p < k:
                        continue
                    actual = F.conv2d(x, torch.zeros(1, 1, k, k), stride=s, padding=p).shape[-1]
                    assert cr.conv_output_size(n, k, s, p) == actual, (n, k, s, p)
    demo = cr.conv_demo(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert len(demo["rows"]) == 4 * 3 * 4
    for row in demo["rows"]:
        if row["p"] == "same" and row["s"] > 1:
            assert row["actual"] is None and "same" in row["refused"]  # torch refuses it
        else:
            assert row["formula"] == row["actual"] == row["output"].shape[-1], row
    table = cr.conv_table(demo)
    assert "   32   3   2  1                      16                16" in table


def test_the_named_filters_do_what_they_say():
    flat = torch.full((1, 1, 9, 9), 0.7)
    for k in (3, 5, 7):
        assert torch.allclose(F.conv2d(flat, cr.conv_filter("edge", k).view(1, 1, k, k)), torch.zeros(1), atol=1e-5)
        assert torch.allclose(F.conv2d(flat, cr.conv_filter("blur", k).view(1, 1, k, k)), torch.tensor(0.7))
        assert torch.allclose(F.conv2d(flat, cr.conv_filter("sharpen", k).view(1, 1, k, k)), torch.tensor(0.7))
        relief = cr.conv_filter("emboss", k) - cr.conv_filter("emboss", k)[k // 2, k // 2] * (
            torch.arange(k * k).view(k, k) == (k * k) // 2)  # without its centre: -1 above, +1 below the diagonal
        assert torch.equal(relief, -relief.flip(0, 1)) and relief.sum() == 0 and relief[-1, -1] == 1
        assert F.conv2d(flat, cr.conv_filter("emboss", k).view(1, 1, k, k)).allclose(torch.tensor(0.7))


def test_conv_demo_command_prints_the_table_and_draws_the_figures(tiny_cifar100, tiny_val_run, tmp_path, capsys):
    plt = pytest.importorskip("matplotlib.pyplot")
    out = tmp_path / "conv" / "conv_demo.png"
    assert cr.main(["conv-demo", "--index", "5", "--filter", "blur", "--out", str(out), "--checkpoint",
                    str(tiny_val_run), "--device", "cpu", "--data-dir", str(tiny_cifar100), "--no-download"]) == 0
    printed = capsys.readouterr().out
    assert "test image 5 (class_" in printed and "floor((n + 2p - k) / s) + 1" in printed
    assert plt.imread(out).shape[:2] == (957, 1430)
    # a row of its 4 first-layer filters and one per stage (5), 1.6 inches each; 9 columns of 1.45 inches
    assert plt.imread(tmp_path / "conv" / "network.png").shape[:2] == (1056, 1435)
    # your own kernel, and an image file
    image = tmp_path / "photo.png"
    plt.imsave(image, np.random.default_rng(0).random((40, 60, 3)))
    assert cr.main(["conv-demo", "--image", str(image), "--kernel=-1,0,1,-2,0,2,-1,0,1", "--out",
                    str(tmp_path / "own.png")]) == 0
    printed = capsys.readouterr().out
    assert "40x40 pixels" in printed and "given 3x3" in printed
    for bad, words in [(["--kernel", "1,2,3"], "square number"), (["--kernel", "a"], "numbers"),
                       (["--image", str(tmp_path / "none.png")], "cannot read the image"),
                       (["--index", "999", "--data-dir", str(tiny_cifar100)], "--index must be in 0..127")]:
        assert cr.main(["conv-demo", "--out", str(tmp_path / "x.png"), "--no-download", *bad]) == 2
        assert words in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Without matplotlib


def test_each_picture_command_without_matplotlib_exits_2_with_the_hint_and_still_writes_the_numbers(
        tiny_cifar100, tiny_val_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert cr.main(["report", str(tiny_val_run), "--device", "cpu", "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "wrote" in err
    assert (tmp_path / "r" / "per_class.csv").exists() and (tmp_path / "r" / "summary.json").exists()
    assert not (tmp_path / "r" / "report.html").exists()
    for command in (["preview-aug", "--data-dir", str(tiny_cifar100)], ["conv-demo", "--data-dir", str(tiny_cifar100)]):
        assert cr.main([*command, "--no-download"]) == 2
        assert "pip install" in capsys.readouterr().err
