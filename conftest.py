"""What the test files share: a small CIFAR in the official "python version" layout with a learnable signal,
the tiny run most tests start from, and helpers to run and compare runs. (This file also makes the repository
root importable for the tests in bench/: pytest puts its folder on sys.path.)

Only torch, numpy and pytest are needed here: test_cifar100_resnet.py runs with nothing else installed."""

import csv
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cifar100_resnet as cr

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
MODULE = str(HERE / "cifar100_resnet.py")
LAB = str(HERE / "cifar100_lab.py")
DETERMINISTIC_COLUMNS = ["epoch", "lr", "train_loss", "test_loss", "test_top1", "test_top5"]  # all but times


def make_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 3072) rows: noise plus a class-specific colour and a class-specific bright square."""
    n = len(labels)
    images = rng.integers(0, 96, (n, 3, 32, 32)).astype(np.int64)
    palette = np.random.default_rng(1234).integers(0, 160, (num_classes, 3))
    images += palette[labels][:, :, None, None]
    for i, y in enumerate(labels):
        r, c = (y * 7) % 24, (y * 13) % 24
        images[i, :, r:r + 8, c:c + 8] = 255
    return images.clip(0, 255).astype(np.uint8).reshape(n, 3072)


def write_official_layout(root: Path, n_train: int = 200, n_test: int = 100, dataset: str = "cifar100",
                          seed: int = 0, protocol: int = 2) -> Path:
    """Write root/<official folder>/ the way the official release is laid out; returns that folder."""
    info = cr.DATASETS[dataset]
    folder = root / info.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = {"train": np.array_split(np.arange(n_train), len(info.train_files)),
                "test": [np.arange(n_test)]}
    for split, files in (("train", info.train_files), ("test", info.test_files)):
        n = n_train if split == "train" else n_test
        labels = np.arange(n) % info.num_classes
        rng.shuffle(labels)
        images = make_images(labels, info.num_classes, rng)
        for name, idx in zip(files, per_file[split]):
            batch = {"data": images[idx], info.label_key: labels[idx].astype(int).tolist(),
                     "filenames": [f"{split}_{i}.png" for i in idx], "batch_label": split}
            if dataset == "cifar100":
                batch["coarse_labels"] = (labels[idx] // 5).astype(int).tolist()
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=protocol)
    meta = {info.names_key: [f"class_{i}" for i in range(info.num_classes)]}
    if dataset == "cifar100":
        meta["coarse_label_names"] = [f"super_{i}" for i in range(20)]
    with open(folder / info.meta_file, "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return folder


def synthetic_data(n_train=512, n_test=256, dataset="cifar10", seed=0) -> "cr.CifarData":
    """The same kind of images as write_official_layout's, as a CifarData in memory."""
    info = cr.DATASETS[dataset]
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_train, n_test):
        labels = rng.integers(0, info.num_classes, n)
        images = make_images(labels, info.num_classes, rng).reshape(n, 3, 32, 32)
        out += [torch.from_numpy(images), torch.from_numpy(labels)]
    return cr.CifarData(*out, [str(i) for i in range(info.num_classes)], info)


def tiny_args(data_dir, out_dir, *extra):
    """CLI flags for a run of seconds: resnet18 of width 4, batches of 32, 2 epochs."""
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--arch", "resnet18", "--width", "4",
            "--batch-size", "32", "--epochs", "2", "--device", "cpu", "--quiet", "--no-download", *extra]


def run_cli(*args, timeout=300, program=MODULE):
    return subprocess.run([sys.executable, program, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


def model_tensors(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def read_csv(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metric_rows(run_dir) -> list:
    return read_csv(Path(run_dir) / "metrics.csv")


def stop_on_call(n: int):
    """A should_stop that says stop on its n-th call. train() asks after every step but an epoch's last,
    and once after each epoch."""
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) == n

    return should_stop


def official_layout(tmp_path_factory, n_train: int, n_test: int) -> Path:
    """A fresh folder holding a synthetic CIFAR-100 in the official layout."""
    root = tmp_path_factory.mktemp("data")
    write_official_layout(root, n_train=n_train, n_test=n_test)
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return official_layout(tmp_path_factory, 192, 64)


@pytest.fixture(scope="session")
def tiny_run(tiny_data_dir, tmp_path_factory) -> Path:
    """The default tiny run (tiny_args: 2 epochs), trained once for the tests that only read it or compare
    with it."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    assert cr.main(tiny_args(tiny_data_dir, out)) == 0
    return out


@pytest.fixture(scope="session")
def real_cifar100_subset(tmp_path_factory) -> Path:
    """The first 5,000 training and 1,000 test images of the real CIFAR-100, written in the official layout
    by the shared tool (read exactly as a user's download is); skipped where ../shared is absent."""
    tool = SHARED / "tools" / "cifar100_to_official_layout.py"
    if not tool.exists():
        pytest.skip("the real CIFAR-100 (../shared) is not beside this clone")
    pytest.importorskip("PIL", reason="the tool that writes the real CIFAR-100 decodes it with Pillow")
    root = tmp_path_factory.mktemp("real_cifar100")
    r = subprocess.run([sys.executable, str(tool), str(root), "--limit-train", "5000", "--limit-test", "1000"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return root
