#!/usr/bin/env python3
"""Train with the original notebook's MixUp/CutMix, its bugs kept, to measure what fixing them is worth.

    python bench/notebook_mixing.py [any cifar100_resnet.py train flags]

Everything is cifar100_resnet's training except the mixing of each batch, which does what the notebook's
training loop does (see its mixup_data, cutmix_data and train_epoch):
  1. MixUp: lam1 ~ Beta(alpha, alpha), each image blended with a partner from a random permutation;
  2. then CutMix on the already mixed batch: lam2 ~ Beta(alpha, alpha), a second permutation, a box whose
     top-left corner (not its centre) is uniform over the image, clipped at the bottom and right borders;
  3. the loss keeps only CutMix's labels and its lam, and that lam counts the box's unclipped area.
So an image blends up to four pictures while the loss names two of them, with weights that are wrong
whenever the box was clipped. cifar100_resnet applies exactly one of MixUp or CutMix per batch instead (its
README: "What differs from the original notebook").

The draws come from the run's own mixing generator, so runs are reproducible and resume like any other. The
run's config.json cannot say that the mixing was replaced: its train.log starts with a line that does.
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cifar100_resnet as cr  # noqa: E402


def notebook_mix_batch(images: torch.Tensor, labels: torch.Tensor, config: "cr.TrainConfig",
                       generator: torch.Generator = None):
    """The notebook's `mixup_data` then `cutmix_data` on a normalised (N, C, H, W) batch, with the same
    signature and result as cifar100_resnet.mix_batch: (images, labels_a, labels_b, lam)."""
    n, _, height, width = images.shape
    if config.mixup and config.mixup_alpha > 0:
        lam = cr.sample_beta(config.mixup_alpha, generator)
        partner = torch.randperm(n, generator=generator).to(images.device)
        images = lam * images + (1 - lam) * images[partner]
        labels_a, labels_b = labels, labels[partner]
    else:
        lam, labels_a, labels_b = 1.0, labels, labels
    if config.cutmix and config.cutmix_alpha > 0:  # labels_a, labels_b and lam of MixUp are overwritten
        lam = cr.sample_beta(config.cutmix_alpha, generator)
        partner = torch.randperm(n, generator=generator).to(images.device)
        left = int(torch.randint(0, width, (), generator=generator))
        top = int(torch.randint(0, height, (), generator=generator))
        box_w, box_h = int(width * math.sqrt(1 - lam)), int(height * math.sqrt(1 - lam))
        images = images.clone()  # the notebook pastes into its input batch; the caller's stays as it was
        images[:, :, top:top + box_h, left:left + box_w] = images[partner][:, :, top:top + box_h, left:left + box_w]
        lam = 1 - (box_w * box_h) / (width * height)  # the asked-for area, even where the box was clipped
        labels_a, labels_b = labels, labels[partner]
    return images, labels_a, labels_b, lam


def main(argv=None) -> int:
    print("mixing: the original notebook's (MixUp, then CutMix on the mixed batch, CutMix's labels and lam kept; "
          "bench/notebook_mixing.py)", flush=True)
    cr.mix_batch = notebook_mix_batch  # Trainer.train_batch mixes through this module-level name
    return cr.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
