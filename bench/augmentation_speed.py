"""What the advanced augmentation policy costs, per 512-image batch, beside the basic crop + flip and beside one
ResNet-34 training step on the same device; and the original notebook's way, Albumentations per image on the
CPU, in this process and in DataLoader worker processes.

    python bench/augmentation_speed.py [--device cpu|cuda] [--workers 2] [--data-dir DATA]

Prints a Markdown table. The advanced policy is timed as training runs it: on the whole epoch at once (here,
20 batches of 512 in one call), divided by the number of batches.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cifar100_lab as lab  # noqa: E402
import cifar100_resnet as cr  # noqa: E402

BATCH = 512


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, repeats: int, device) -> float:
    """The median seconds of `repeats` calls (after one warm-up call)."""
    function()
    sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def notebook_policy():
    """The notebook's advanced pipeline in Albumentations, up to Normalize (its own parameters, the defaults)."""
    import albumentations as A

    return A.Compose([
        A.PadIfNeeded(40, 40, border_mode=0), A.RandomCrop(32, 32), A.HorizontalFlip(p=0.5),
        A.OneOf([A.ColorJitter(p=0.5), A.ToGray(p=0.2), A.CLAHE(p=0.3)], p=0.5),
        A.OneOf([A.CoarseDropout(p=0.5), A.GridDistortion(p=0.2), A.ElasticTransform(p=0.3)], p=0.5),
    ])


class _PerImage(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images, self.policy = images, None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.policy is None:  # built in the worker process
            self.policy = notebook_policy()
        return torch.from_numpy(self.policy(image=self.images[i])["image"]).permute(2, 0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the notebook's way (default: 2)")
    p.add_argument("--data-dir", help="a folder holding cifar-100-python/ (default: random images)")
    p.add_argument("--step-repeats", type=int, default=2)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.data_dir:
        images = cr.read_cifar(os.path.join(args.data_dir, "cifar-100-python")).train_images[:BATCH * 20]
        images = images.repeat(max(1, BATCH * 20 // len(images) + 1), 1, 1, 1)[:BATCH * 20]
    else:
        images = torch.randint(0, 256, (BATCH * 20, 3, 32, 32), dtype=torch.uint8)
    images = images.to(device)
    g = torch.Generator(device).manual_seed(0)
    rows = []

    def basic():
        return cr.random_flip(cr.random_crop(images, generator=g), generator=g)

    basic_s = timed(basic, 3, device) / 20
    advanced_s = timed(lambda: cr.advanced_augment(basic(), g), 3, device) / 20
    rows += [("crop + flip (`--aug basic`)", basic_s),
             ("crop + flip + the advanced policy (`--aug advanced`)", advanced_s),
             ("the advanced policy alone", advanced_s - basic_s)]

    config = cr.TrainConfig(arch="resnet34", batch_size=BATCH, lr=0.4, device=args.device, quiet=True,
                            mixup=False, cutmix=False, compile="off")
    data = lab.random_cifar("cifar100", BATCH, 10)
    trainer = cr.Trainer(config, data, log=lambda m: None)
    step_s = timed(lambda: trainer.train_epoch(), args.step_repeats, device)  # one epoch = one 512-image step
    rows.append(("one ResNet-34 training step (forward, backward, SGD)", step_s))

    try:
        policy = notebook_policy()
    except ImportError:
        policy = None
    if policy is not None:
        batch = images[:BATCH].permute(0, 2, 3, 1).contiguous().cpu().numpy()
        per_image = timed(lambda: [policy(image=x) for x in batch], 3, torch.device("cpu"))
        rows.append(("the notebook's way: Albumentations per image, this process", per_image))
        loader = torch.utils.data.DataLoader(_PerImage(np.concatenate([batch] * 8)), batch_size=BATCH,
                                             num_workers=args.workers, persistent_workers=args.workers > 0)
        for _ in loader:  # a first pass starts the workers: not timed
            pass
        start = time.perf_counter()
        for _ in loader:
            pass
        rows.append((f"the notebook's way: Albumentations per image, {args.workers} DataLoader workers",
                     (time.perf_counter() - start) / 8))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"per {BATCH}-image batch on {name}, torch {torch.__version__}:\n")
    print("| what | seconds per batch | vs one training step |")
    print("| --- | --- | --- |")
    for what, seconds in rows:
        print(f"| {what} | {seconds:.4f} | {seconds / step_s:.2%} |")


if __name__ == "__main__":
    main()
