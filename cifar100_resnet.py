"""Train a ResNet-34 from scratch on CIFAR-100: the notebook's recipe, correct, fast and GPU-resident.

    python cifar100_resnet.py --epochs 400               # the notebook's recipe at its defaults
    python cifar100_resnet.py --help                     # every flag, and every command
    python cifar100_resnet.py eval runs/a/best.pt --tta  # test accuracy of saved weights

One module (torch and numpy; torchvision only to download the data), to run, import or copy: its own
ResNet-18/34, a reader of the official files that runs no pickled code, the dataset resident on the device,
the augmentations and MixUp/CutMix as batch tensor functions, label-smoothed loss on mixed targets, SGD with
per-step cosine warm restarts, mixed precision, exact evaluation, and a run folder that a kill at any moment
leaves whole and that resumes bit-exactly. The lab beside it, cifar100_lab.py, adds lr-find, sweeps, plots,
reports and bench; its commands run from here too.

    import cifar100_resnet as cr
    result = cr.train(cr.TrainConfig(epochs=30, batch_size=512, lr=0.4, data_dir="./data"))
    result.model, result.history   # the trained nn.Module and one dict of metrics per epoch
"""

from __future__ import annotations

__version__ = "0.4.0"

__all__ = [  # what a vendoring user may rely on
    # dataset, reader and errors
    "DatasetInfo", "DATASETS", "IMAGE_SIZE", "CROP_PADDING", "CifarData", "read_cifar", "load_dataset",
    "Normalizer", "split_data", "epoch_batches", "UserError", "DataError", "TrainingDiverged", "WriteFailed",
    "RunWarning", "warn", "TEMP_SUFFIX",
    # settings
    "TrainConfig", "RESUMABLE_OVERRIDES", "PRESETS", "ARCHITECTURES", "COMPILE_AUTO_EPOCHS",
    # augmentation, mixing and loss
    "random_crop", "random_flip", "sample_beta", "cutmix_box", "mixup_batch", "cutmix_batch", "draw_mix",
    "apply_mix", "mix_batch", "ADVANCED_POLICY", "ADVANCED_OPERATIONS", "JITTER_RANGES", "CLAHE_CLIP_LIMIT",
    "CLAHE_TILES", "DROPOUT_HOLES", "DROPOUT_SIZE", "GRID_STEPS", "GRID_LIMIT", "ELASTIC_ALPHA", "ELASTIC_SIGMA",
    "advanced_augment", "color_jitter",
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "rgb_to_hsv", "hsv_to_rgb",
    "to_gray", "to_gray_uint8", "clahe", "clahe_luminance", "rgb_to_lab", "lab_to_rgb", "dropout_boxes",
    "coarse_dropout", "remap", "grid_distortion_maps", "elastic_maps", "blur_displacement", "displacement_maps",
    "mixed_cross_entropy",
    # model, optimiser, schedule, devices
    "BasicBlock", "ResNet", "resnet18", "resnet34", "build_model", "build_optimizer", "match_param_layout",
    "resolve_t0", "cycle_position", "learning_rate", "schedule_end", "schedule_end_warning", "resolve_device",
    "resolve_amp", "resolve_compile", "resolve_cuda_graphs", "Environment", "resolve", "process_group",
    "join_torchrun",
    # training and evaluation
    "autocast", "predict", "classification_metrics", "evaluate", "EpochState", "CapturedStep", "Trainer",
    "GRAPH_WARMUP_STEPS", "PROGRESS_FIRST_SECONDS", "PROGRESS_EVERY_SECONDS",
    "check_architecture", "train", "TrainResult", "ResumePoint", "find_resume", "LoadedRun", "load_run",
    "evaluate_checkpoint",
    # run folder and checkpoints
    "METRIC_COLUMNS", "RunFolder", "CheckpointWriter", "atomic_save", "load_checkpoint", "load_weights",
    "csv_text", "tensor_checksum",
    # command line
    "main", "build_parser", "command_parser", "config_from_args", "add_data_flags", "LAB_COMMANDS", "Console",
    "StopSignals", "set_backend_flags", "format_duration",
]

import argparse
import concurrent.futures
import copy
import csv
import dataclasses
import datetime
import difflib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import pickle
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
import zlib
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from typing import Callable, Optional

try:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except KeyboardInterrupt:  # Ctrl-C while torch loads (seconds): a command says one line, not a traceback
    if __name__ != "__main__" and not sys.argv[0].endswith("cifar100-resnet"):
        raise
    print("error: stopped by Ctrl-C while loading torch; nothing was created", file=sys.stderr)
    sys.exit(130)

# ----------------------------------------------------------------------------------------------------------
# Errors and warnings: each becomes one line on stderr, and an error a non-zero exit code, in main()


class UserError(Exception):
    """Bad input (a flag, a folder, a file): reported as one message, exit code 2."""


class DataError(UserError):
    """The dataset is missing or unreadable."""


class TrainingDiverged(Exception):
    """The loss, the weights or the evaluation became NaN or infinite. Exit code 1; no checkpoint holds them."""


class WriteFailed(Exception):
    """A run file could not be written (a full disk). Exit code 1; the run resumes from the files before it."""


class RunWarning(UserWarning):
    """Worth knowing about a run (a schedule ending mid-cycle): one 'warning:' line in the commands, even --quiet."""


def warn(message: str) -> None:
    warnings.warn(message, RunWarning, stacklevel=2)


def _first_line(error: BaseException, limit: Optional[int] = 160) -> str:
    """The first line of an exception's message, cut to `limit` characters (None: whole)."""
    return (str(error).strip().splitlines() or [""])[0][:limit]


def format_duration(seconds: float) -> str:
    """1m05s, 2h07m, 3d04h."""
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    return f"{d}d{h:02d}h" if d else f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# ----------------------------------------------------------------------------------------------------------
# Dataset facts (from the official release page and torchvision/datasets/cifar.py)


@dataclass(frozen=True)
class DatasetInfo:
    folder: str  # the folder the official archive extracts to, inside --data-dir
    url: str
    archive_md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str  # key of the labels list in each batch file
    names_key: str  # key of the class names list in the meta file
    num_classes: int
    mean: tuple[float, float, float]  # per-channel mean of the training pixels / 255
    std: tuple[float, float, float]
    coarse_key: Optional[str] = None  # CIFAR-100: key of the superclass labels in each batch file
    coarse_names_key: Optional[str] = None  # and of the superclass names in the meta file


DATASETS = {
    "cifar100": DatasetInfo(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",), test_files=("test",), meta_file="meta",
        label_key="fine_labels", names_key="fine_label_names", num_classes=100,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),  # the notebook's constants
        coarse_key="coarse_labels", coarse_names_key="coarse_label_names",
    ),
    "cifar10": DatasetInfo(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key="labels", names_key="label_names", num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),  # CIFAR-10's own statistics
    ),
}

IMAGE_SIZE = 32
CROP_PADDING = 4

# ----------------------------------------------------------------------------------------------------------
# Configuration


ARCHITECTURES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}  # BasicBlocks in each of the 4 stages
COMPILE_AUTO_EPOCHS = 200  # compile + graphs saved 0.35 s per epoch against 30-75 s of compiling (H100)


def _setting(default, help: str, group: str, *, check=None, choices=None, flag: Optional[str] = None,
             shown: Optional[str] = None, display: bool = False, resumable: bool = False,
             library_only: bool = False, **argparse_kwargs):
    """One setting, declared once: default, --help text and group, flag (default --field-name; a True bool is
    switched off by --no-...), choices or check (predicate, requirement), and its default as --help shows it.
    display: only changes what is printed, not saved. resumable: a resumed run may change it (it changes where
    or how the run is computed, not what). library_only: no flag of its own."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, group=group, check=check, choices=choices, flag=flag, shown=shown, display=display,
        resumable=resumable or display, library_only=library_only, argparse=argparse_kwargs))


_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_NOT_NEGATIVE = (lambda v: v >= 0, ">= 0")
_AUTO_ON_OFF = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Every setting of a run; the flags, their --help and validate() are made from these declarations."""
    # --- the notebook's hyperparameters (defaults are its values)
    epochs: int = _setting(400, "passes over the training set", "recipe", check=_AT_LEAST_1)
    batch_size: int = _setting(128, "images per optimiser step", "recipe", check=_AT_LEAST_1)
    lr: float = _setting(0.1, "peak learning rate; scale it with the batch size (0.4 at 512 is 0.1 x 512/128)",
                         "recipe", check=(lambda v: v > 0, "positive"))
    momentum: float = _setting(0.9, "SGD momentum", "recipe", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    weight_decay: float = _setting(1e-3, "L2 penalty, applied by SGD", "recipe", check=_NOT_NEGATIVE)
    decay_norm_and_bias: bool = _setting(True, "exempt BatchNorm weights and biases from weight decay (the "
                                         "notebook decays every parameter)", "recipe", flag="--no-decay-norm-bias",
                                         shown="every parameter decayed")
    nesterov: bool = _setting(False, "Nesterov momentum", "recipe")
    label_smoothing: float = _setting(0.1, "label smoothing of the (mixed) target", "recipe",
                                      check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    mixup: bool = _setting(True, "switch MixUp off", "recipe", flag="--no-mixup", shown="MixUp on")
    cutmix: bool = _setting(True, "switch CutMix off", "recipe", flag="--no-cutmix", shown="CutMix on")
    mixup_alpha: float = _setting(1.0, "Beta(alpha, alpha) for the MixUp weight; 0 switches MixUp off", "recipe",
                                  check=_NOT_NEGATIVE)
    cutmix_alpha: float = _setting(1.0, "Beta(alpha, alpha) for the CutMix area; 0 switches CutMix off", "recipe",
                                   check=_NOT_NEGATIVE)
    cutmix_prob: float = _setting(0.5, "with both on, the chance that a batch gets CutMix rather than MixUp",
                                  "recipe", check=(lambda v: 0 <= v <= 1, "in [0, 1]"))
    ema: float = _setting(0.0, "also keep an exponential moving average of the weights and BatchNorm statistics, "
                          "updated every step with this decay after timm's ModelEmaV3 warm-up (e.g. 0.999): "
                          "evaluated beside the raw weights (*_ema_* columns), saved in the checkpoints, read by "
                          "eval --ema (0: off)", "recipe", check=(lambda v: 0 <= v < 1, "in (0, 1), or 0 for off"))
    mix_off_epochs: int = _setting(0, "the last N epochs train on crop and flip only, without MixUp or CutMix",
                                   "recipe", check=_NOT_NEGATIVE)
    aug: str = _setting("basic", "basic: random crop (4-pixel padding) and flip; advanced: then the notebook's "
                        "Albumentations policy as batch operations on the device (colour jitter, grey, CLAHE; "
                        "coarse dropout, grid distortion, elastic: see the README)", "recipe",
                        choices=("basic", "advanced"))
    # --- schedule: cosine annealing with warm restarts, set every step
    t0: Optional[float] = _setting(None, "first cycle in epochs; auto fits whole cycles into --epochs; 50 is the "
                                   "notebook's", "schedule", shown="auto", metavar="EPOCHS|auto",
                                   check=(lambda v: v is None or v > 0, "positive or 'auto'"))
    t_mult: float = _setting(2.0, "each cycle is this many times longer than the one before", "schedule",
                             check=(lambda v: v >= 1, ">= 1"))
    warmup_epochs: float = _setting(0.0, "linear warm-up from 0 before the first cycle, in epochs", "schedule")
    min_lr: float = _setting(0.0, "the rate at the bottom of each cycle (torch's eta_min)", "schedule")
    restart_warmup: float = _setting(0.0, "after each restart, a linear ramp over this many epochs from the end "
                                     "of the cycle to the peak (0: a jump, the notebook's)", "schedule",
                                     check=_NOT_NEGATIVE)
    # --- model
    arch: str = _setting("resnet34", "network depth", "model", choices=tuple(ARCHITECTURES))
    stem: str = _setting("cifar", "cifar: 3x3 stride-1 conv, no max-pool; imagenet: torchvision's 7x7/2 conv + "
                         "max-pool (the notebook's)", "model", choices=("cifar", "imagenet"))
    width: int = _setting(64, "channels of the first stage; the stages have width x 1, 2, 4, 8", "model",
                          check=_AT_LEAST_1)
    zero_init_residual: bool = _setting(False, "start each residual block's last BatchNorm weight at 0, so each "
                                        "block starts as its shortcut (torchvision's option)", "model")
    # --- data
    dataset: str = _setting("cifar100", "which CIFAR", "data", choices=tuple(DATASETS))
    data_dir: str = _setting("./data", "the folder that holds cifar-100-python/ (downloaded there if absent)", "data",
                             resumable=True, type=os.path.expanduser)  # ~ expanded: bash leaves --data-dir=~/d
    download: bool = _setting(True, "never download; fail if the data is not in --data-dir", "data",
                              flag="--no-download", shown="download when missing", resumable=True)
    limit_train: int = _setting(0, "use the first N training images (0: all)", "data", check=_NOT_NEGATIVE)
    limit_test: int = _setting(0, "use the first N test images (0: all)", "data", check=_NOT_NEGATIVE)
    val_split: int = _setting(0, "hold out the last N training images; best.pt is then chosen on them, not on the "
                              "test set", "data", check=_NOT_NEGATIVE)
    # --- running
    amp: str = _setting("auto", "mixed precision: auto = bf16 where the GPU has it, else fp16 with a gradient "
                        "scaler; off on CPU", "running", choices=("auto", "bf16", "fp16", "off"))
    device: str = _setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", "running",
                           resumable=True)
    compile: str = _setting("auto", f"torch.compile the forward pass and loss (--compile alone: on); auto: on with "
                            f"CUDA for runs of {COMPILE_AUTO_EPOCHS}+ epochs, where its 30-75 s are repaid, and off "
                            f"again if compiling fails", "running", choices=_AUTO_ON_OFF, nargs="?", const="on",
                            resumable=True)
    cuda_graphs: str = _setting("auto", "replay each full-batch training step as one CUDA graph; auto: on with CUDA "
                                "unless fp16, whose gradient scaler decides on the host", "running",
                                choices=_AUTO_ON_OFF, resumable=True)
    seed: int = _setting(0, "seeds the weights, the data order, the augmentation and the mixing", "running",
                         check=(lambda v: abs(v) < 2 ** 62, "between -2^62 and 2^62"))
    sync_bn: bool = _setting(False, "with several processes (torchrun): BatchNorm statistics over the global batch "
                             "instead of each process's share (CUDA only)", "running")
    eval_batch_size: int = _setting(1000, "images per evaluation batch", "running", check=_AT_LEAST_1,
                                    resumable=True)
    tta: bool = _setting(False, "also report flip test-time augmentation metrics (extra *_tta_* columns; the plain "
                         "ones stay, and best.pt is still chosen on them)", "running", resumable=True)
    bn_recal: int = _setting(0, "also evaluate a copy whose BatchNorm statistics are re-estimated on N batches of "
                             "clean training images (crop and flip, no mixing): *_bnrecal_* columns; training is "
                             "unchanged (0: off)", "running", check=_NOT_NEGATIVE, resumable=True)
    # --- output
    out_dir: Optional[str] = _setting(None, "the run folder; library use without one writes nothing", "output",
                                      shown="runs/<timestamp> on the command line",
                                      check=(lambda v: v is None or v.strip() != "", "a folder name"),
                                      resumable=True, type=os.path.expanduser)
    checkpoint_every: int = _setting(20, "also keep ckpt_ep{N}.pt every N epochs (0: never)", "output",
                                     check=_NOT_NEGATIVE, resumable=True)
    log_every: int = _setting(100, "a progress line every N batches, and at least every 30 s (0: by time only)",
                              "output", check=_NOT_NEGATIVE, display=True)
    quiet: bool = _setting(False, "print only warnings and errors", "output", display=True)
    tensorboard: bool = _setting(False, "also write TensorBoard event files into the run folder's tensorboard/: "
                                 "the metrics of each epoch and the learning rate of each step (needs the "
                                 "tensorboard package)", "output", resumable=True)
    # --- set by `--resume --epochs N`, not a flag of its own
    extended_from: tuple = _setting((), "the --epochs of the run before each extension; the epochs added by each "
                                    "get one cosine cycle of their own", "schedule", library_only=True)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The settings among `values` (parsed flags, a checkpoint's config); other keys are left out."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields})

    def saved(self) -> dict:
        """The settings config.json and checkpoints record: all but the display ones."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata["display"]}

    def validate(self) -> None:
        """Raise UserError naming the first invalid value (what this machine offers: resolve())."""
        self._check_types()
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), _flag_of(f)
            shown = repr(value) if isinstance(value, str) else value
            choices, check = f.metadata["choices"], f.metadata["check"]
            if choices and value not in choices:
                raise UserError(f"{flag} must be one of {', '.join(choices)}, got {shown}")
            if check and not check[0](value):
                raise UserError(f"{flag} must be {check[1]}, got {shown}")
            if isinstance(value, float) and not abs(value) < 3.4e38:  # float32's range, where the step computes
                raise UserError(f"{flag} must be a finite number below 3.4e38, got {shown}")  # (Beta(inf) hangs)
        if not 0 <= self.warmup_epochs < self.epochs:
            raise UserError(f"--warmup-epochs must be in [0, epochs), got {self.warmup_epochs} with {self.epochs} "
                            f"epochs")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"--min-lr must be in [0, lr], got {self.min_lr}")
        if self.nesterov and not self.momentum:  # (torch's SGD raises a ValueError)
            raise UserError("--nesterov needs a momentum: --momentum 0 has none")
        if self.mix_off_epochs > self.epochs:
            raise UserError(f"--mix-off-epochs {self.mix_off_epochs} is longer than the run ({self.epochs} epochs)")
        t0, span = self.first_cycle, self.planned_epochs - self.warmup_epochs
        if self.restart_warmup and self.restart_warmup >= t0 * self.t_mult:
            raise UserError(f"--restart-warmup {self.restart_warmup:g} must be shorter than the cycles after a "
                            f"restart (the first of them: {t0 * self.t_mult:g} epochs)")
        n = span / t0 if self.t_mult == 1 else math.log1p(span / t0 * (self.t_mult - 1)) / math.log(self.t_mult)
        if n > 10_000:  # cycles: each step's rate walks those before it, and millions of them would never end
            raise UserError(f"--t0 {t0:g} --t-mult {self.t_mult:g} make {n:.3g} cycles of the schedule, over 10,000")
        ends = [*self.extended_from, self.epochs]
        if any(a >= b for a, b in zip(ends, ends[1:])):
            raise UserError(f"the run's extensions must add epochs, got --epochs {' then '.join(map(str, ends))}")

    @property
    def planned_epochs(self) -> int:
        """The run's --epochs before any extension: what its restarts schedule was fitted to."""
        return self.extended_from[0] if self.extended_from else self.epochs

    @property
    def first_cycle(self) -> float:
        """The first cosine cycle in epochs: --t0, or whole cycles fitted after the warm-up (resolve_t0)."""
        return resolve_t0(self.planned_epochs - self.warmup_epochs, self.t_mult, self.t0)

    def _check_types(self) -> None:
        """Each value has its field's type (a saved config.json or checkpoint may hold anything)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {bool: (bool,), int: (int,), float: (int, float), tuple: (tuple, list)}.get(
                type(f.default), (int, float) if f.name == "t0" else (str,))
            ok = (value is None and f.default is None) or (
                isinstance(value, expected) and (bool in expected or not isinstance(value, bool)))
            if ok and isinstance(value, (tuple, list)):
                ok = all(type(v) is int for v in value)
            if not ok:
                raise UserError(f"setting {f.name} must be {' or '.join(t.__name__ for t in expected)}, got {value!r}")


def _flag_of(field: dataclasses.Field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


RESUMABLE_OVERRIDES = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resumable"]}


# ----------------------------------------------------------------------------------------------------------
# Data: a reader of the official "python version" files that cannot be made to run code


class _RefusedObject(pickle.UnpicklingError):
    """A pickle names a class or function outside the CIFAR format."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR files hold: dicts, lists, str, int, bytes and numpy arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise _RefusedObject(f"{module}.{name}")
        if module.startswith(("numpy.core.", "numpy._core.")):  # numpy 2 renamed numpy.core to numpy._core
            submodule = module.split(".", 2)[2]
            module = ("numpy._core." if hasattr(np, "_core") else "numpy.core.") + submodule
        return super().find_class(module, name)


def _read_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedObject as e:
        raise DataError(f"{path} is refused: it would load {e}, which is not part of the CIFAR format (a "
                        f"pickle can run code)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, MemoryError):
        raise DataError(f"{path} is not a CIFAR python file (truncated, or not the official pickle)") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a readable CIFAR file (holds {type(obj).__name__}, not dict)")
    return obj


def _int_list(batch: dict, key: str, n: int, path: str) -> list:
    values = batch.get(key)
    if not isinstance(values, list) or len(values) != n or not all(type(v) is int for v in values):
        raise DataError(f"{path}: '{key}' must be a list of {n} ints")
    return values


def _read_batches(folder: str, files: tuple[str, ...], info: DatasetInfo) -> tuple:
    """(uint8 NCHW images, labels, the set of (class, superclass) pairs seen) of the batch files."""
    images, labels, pairs = [], [], set()
    for name in files:
        path = os.path.join(folder, name)
        batch = _read_pickle(path)
        data = batch.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
        fine = _int_list(batch, info.label_key, len(data), path)
        if fine and not 0 <= min(fine) <= max(fine) < info.num_classes:
            raise DataError(f"{path}: labels must lie in 0..{info.num_classes - 1}")
        images.append(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE))  # rows are R, G, B planes: NCHW
        labels.append(np.asarray(fine, dtype=np.int64))
        if info.coarse_key and batch.get(info.coarse_key) is not None:
            pairs.update(zip(fine, _int_list(batch, info.coarse_key, len(data), path)))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), pairs


@dataclass
class CifarData:
    train_images: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    info: DatasetInfo
    superclass_of: Optional[torch.Tensor] = None  # CIFAR-100: the superclass of each class (int64, 100)
    superclasses: Optional[list] = None  # and the superclass names


def read_cifar(folder: str, dataset: str = "cifar100") -> CifarData:
    """Read the official layout in `folder` (e.g. ./data/cifar-100-python) into uint8 NCHW tensors."""
    info = DATASETS[dataset]
    train_images, train_labels, pairs = _read_batches(folder, info.train_files, info)
    test_images, test_labels, test_pairs = _read_batches(folder, info.test_files, info)
    meta_path = os.path.join(folder, info.meta_file)
    meta = _read_pickle(meta_path)
    names = meta.get(info.names_key)
    if not isinstance(names, list) or len(names) != info.num_classes:
        raise DataError(f"{meta_path}: '{info.names_key}' must list {info.num_classes} class names")
    data = CifarData(train_images, train_labels, test_images, test_labels, [str(n) for n in names], info)
    superclass_of = dict(sorted(pairs | test_pairs))  # CIFAR-100's coarse labels
    if len(superclass_of) != len(pairs | test_pairs):
        raise DataError(f"{folder}: the '{info.coarse_key}' put a class in two superclasses")
    if len(superclass_of) == info.num_classes:  # (a cut-down copy may lack some classes: then no superclasses)
        data.superclass_of = torch.tensor([superclass_of[c] for c in range(info.num_classes)])
        n_super, coarse_names = int(data.superclass_of.max()) + 1, meta.get(info.coarse_names_key)
        data.superclasses = ([str(n) for n in coarse_names] if isinstance(coarse_names, list) and
                             len(coarse_names) == n_super else [f"superclass {i}" for i in range(n_super)])
    return data


def load_dataset(data_dir: str, dataset: str = "cifar100", download: bool = True) -> CifarData:
    """Read `data_dir/<official folder>`, first downloading the md5-checked archive if files are missing. Files
    already there are read as they are (a user's rebuild has other md5 sums): the reader checks the content."""
    info = DATASETS[dataset]
    if os.path.isfile(data_dir):
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")
    folder = os.path.join(data_dir, info.folder)
    expected = info.train_files + info.test_files + (info.meta_file,)
    missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing and all(os.path.isfile(os.path.join(data_dir, f)) for f in expected):
        parent = os.path.dirname(os.path.abspath(data_dir))
        raise DataError(f"--data-dir {data_dir} is the {info.folder} folder itself: pass the folder that holds "
                        f"it, {parent}")
    if missing:
        reason = "download switched off (--no-download)"
        if download:
            created = not os.path.exists(data_dir)
            try:
                from torchvision.datasets.utils import download_and_extract_archive  # only needed here
                download_and_extract_archive(info.url, download_root=data_dir, md5=info.archive_md5)
                reason = ""
            except Exception as e:  # no network, a proxy page, a bad md5, a full disk: all end the same way
                reason = ("downloading needs torchvision (pip install torchvision)" if isinstance(e, ImportError)
                          else f"download failed ({type(e).__name__}: {_first_line(e)})")
                if created:  # leave no empty or half-filled folder behind
                    shutil.rmtree(data_dir, ignore_errors=True)
        missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise DataError(
                f"{dataset} not found in {os.path.abspath(data_dir)}: expected {os.path.abspath(folder)}/ "
                f"with {', '.join(expected)} (missing: {', '.join(missing)}); {reason or 'archive had no such files'}. "
                f"Download {info.url}, extract it into {os.path.abspath(data_dir)}, or pass --data-dir.")
    return read_cifar(folder, dataset)


class Normalizer:
    """uint8 images -> float32 (x/255 - mean) / std as one fused multiply-add, optionally channels_last."""

    def __init__(self, mean, std, device, channels_last: bool = False):
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std_t), -mean_t / std_t
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(memory_format=self.memory_format).float()
        return torch.addcmul(self.shift, x, self.scale)


def split_data(data: CifarData, config: TrainConfig) -> dict:
    """{"train", "val", "test"}: (images, labels) of the run: the first --limit-train training images, the last
    --val-split of them held out as "val", the first --limit-test test images."""
    n_train = min(config.limit_train, len(data.train_images)) if config.limit_train else len(data.train_images)
    n_test = min(config.limit_test, len(data.test_images)) if config.limit_test else len(data.test_images)
    if config.val_split >= n_train:
        raise UserError(f"--val-split {config.val_split} leaves no training images (have {n_train})")
    n_fit = n_train - config.val_split
    return {"train": (data.train_images[:n_fit], data.train_labels[:n_fit]),
            "val": (data.train_images[n_fit:n_train], data.train_labels[n_fit:n_train]),
            "test": (data.test_images[:n_test], data.test_labels[:n_test])}


def epoch_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each batch of an n-image epoch; the last batch holds the remainder."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


# ----------------------------------------------------------------------------------------------------------
# Augmentation and mixing: batch tensor functions, all randomness from torch (optionally a Generator)


def random_crop(images: torch.Tensor, padding: int = CROP_PADDING, generator: Optional[torch.Generator] = None,
                return_offsets: bool = False):
    """Each image: zero-pad by `padding`, then cut a same-size window at its own random offset (return_offsets:
    also the offsets into the padded image, `padding` being no shift). Any dtype. Instead of a gather with a
    large index, one torch.where per possible offset and axis: 2 * (2 * padding + 1) passes, no host sync."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy, dx = (torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), generator=generator, device=images.device)
              for _ in range(2))
    rows = padded[:, :, 0:h, :]
    for s in range(1, 2 * padding + 1):
        rows = torch.where(dy == s, padded[:, :, s:s + h, :], rows)
    out = rows[:, :, :, 0:w]
    for s in range(1, 2 * padding + 1):
        out = torch.where(dx == s, rows[:, :, :, s:s + w], out)
    return (out, (dy.view(n), dx.view(n))) if return_offsets else out


def random_flip(images: torch.Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None,
                return_mask: bool = False):
    """Mirror each image left-right with probability p, each its own draw (with return_mask, also which)."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    out = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    return (out, flip) if return_mask else out


def sample_beta(alpha: float, generator: Optional[torch.Generator] = None) -> float:
    """One draw of Beta(alpha, alpha) from torch's RNG on the CPU (torch.distributions.Beta takes no generator):
    X / (X + Y), X and Y ~ Gamma(alpha) by Marsaglia and Tsang (2000), boosted Gamma(a + 1) * U^(1/a) for a < 1,
    in logs: U^(1/a) underflows to 0 for a small alpha (at 0.001, X and Y were both 0 in a quarter of the draws)."""
    def log_gamma(a: float) -> float:  # the log of one Gamma(a) draw
        log_boost = 0.0
        if a < 1:
            log_boost = math.log(float(torch.rand((), generator=generator)) or 1e-300) / a
            a += 1.0
        d = a - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        while True:
            z = float(torch.randn((), generator=generator))
            v = (1.0 + c * z) ** 3
            if v <= 0:
                continue
            u = float(torch.rand((), generator=generator))
            if u > 0 and math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
                return math.log(d * v) + log_boost

    return 0.5 + 0.5 * math.tanh((log_gamma(alpha) - log_gamma(alpha)) / 2)  # X / (X + Y), the first X


def cutmix_box(lam: float, height: int, width: int, generator: Optional[torch.Generator] = None,
               center: Optional[tuple[int, int]] = None):
    """(top, bottom, left, right) of a CutMix box: centre (row, col) uniform over the image unless given,
    sides sqrt(1 - lam) * size, clipped at the borders (so a box near an edge is smaller than asked)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    if center is None:
        center = (int(torch.randint(0, height, (), generator=generator)),
                  int(torch.randint(0, width, (), generator=generator)))
    top, left = center[0] - cut_h // 2, center[1] - cut_w // 2
    return max(top, 0), min(top + cut_h, height), max(left, 0), min(left + cut_w, width)


def mixup_batch(images: torch.Tensor, labels: torch.Tensor, lam: float):
    """MixUp with each image's partner in the reversed batch (the batch order is already random)."""
    mixed = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
    return mixed, labels, labels.flip(0), lam


def cutmix_batch(images: torch.Tensor, labels: torch.Tensor, box):
    """Paste `box` from each image's partner (reversed batch); lam recomputed from the area actually pasted."""
    top, bottom, left, right = box
    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (images.shape[2] * images.shape[3])
    return mixed, labels, labels.flip(0), lam


def draw_mix(config: TrainConfig, height: int, width: int, generator: Optional[torch.Generator] = None) -> tuple:
    """The random choices of one batch's mixing: ("cutmix", lam, box), ("mixup", lam, None) or ("none", 1.0,
    None). ONE of MixUp or CutMix per batch, chosen with config.cutmix_prob when both are on."""
    use_mixup = config.mixup and config.mixup_alpha > 0
    use_cutmix = config.cutmix and config.cutmix_alpha > 0
    if use_mixup and use_cutmix:
        use_cutmix = float(torch.rand((), generator=generator)) < config.cutmix_prob
        use_mixup = not use_cutmix
    if use_cutmix:
        lam = sample_beta(config.cutmix_alpha, generator)
        return "cutmix", lam, cutmix_box(lam, height, width, generator)
    if use_mixup:
        return "mixup", sample_beta(config.mixup_alpha, generator), None
    return "none", 1.0, None


def apply_mix(images: torch.Tensor, labels: torch.Tensor, method: str, lam: float, box=None):
    """Mix the batch as draw_mix chose; returns (images, labels_a, labels_b, lam)."""
    if method == "cutmix":
        return cutmix_batch(images, labels, box)
    if method == "mixup":
        return mixup_batch(images, labels, lam)
    return images, labels, labels, 1.0


def mix_batch(images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
              generator: Optional[torch.Generator] = None):
    """ONE of MixUp or CutMix (draw_mix, apply_mix): (images, labels_a, labels_b, lam), the target lam * a +
    (1 - lam) * b. (The notebook applied both and kept only CutMix's labels, losing MixUp's second label.)"""
    return apply_mix(images, labels, *draw_mix(config, images.shape[2], images.shape[3], generator))


# --- The notebook's "advanced" policy (--aug advanced), as batch operations on uint8 (N, 3, H, W) images.
# Each operation does what Albumentations 2 does to a uint8 image (rounding, clipping and all; the tests
# compare them), but on every image of a batch at once, each image with its own random parameters.
# Parameters for 32x32 images; Albumentations' defaults, which assume larger images, in the comments.

JITTER_RANGES = {"brightness": (0.8, 1.2), "contrast": (0.8, 1.2), "saturation": (0.8, 1.2),
                 "hue": (-0.1, 0.1)}  # Albumentations: the same, but hue (-0.5, 0.5): any colour at all
CLAHE_CLIP_LIMIT = (1.0, 4.0)  # Albumentations' default
CLAHE_TILES = 2  # a 2 x 2 grid of 16 x 16 tiles (Albumentations: 8 x 8 tiles, 4 x 4 pixels each at 32 x 32)
DROPOUT_HOLES = (1, 2)  # holes per image (Albumentations: 1)
DROPOUT_SIZE = (0.1, 0.25)  # hole sides, as fractions of the image's (Albumentations: 0.1-0.2): 3 to 8 pixels
GRID_STEPS, GRID_LIMIT = 4, 0.3  # a 4 x 4 grid of 8-pixel cells, each stretched by up to 30 % (Albumentations: 5)
ELASTIC_ALPHA, ELASTIC_SIGMA = 3.0, 3.0  # about 1 pixel of smooth displacement (Albumentations: alpha 1,
#                                          sigma 50: at 32 x 32 that blurs the noise to a near-constant shift)
ADVANCED_POLICY = (  # (the group's probability, its members with their p): one member per group, per image
    (0.5, (("color_jitter", 0.5), ("to_gray", 0.2), ("clahe", 0.3))),
    (0.5, (("coarse_dropout", 0.5), ("grid_distortion", 0.2), ("elastic", 0.3))),
)


def _rand(n: int, generator, device, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def to_gray_uint8(images: torch.Tensor) -> torch.Tensor:
    """Y = 0.299 R + 0.587 G + 0.114 B in OpenCV's fixed point for uint8 (weights x 2^15, rounded): (N, H, W)."""
    r, g, b = images.to(torch.int32).unbind(1)
    return ((r * 9798 + g * 19235 + b * 3735 + 16384) >> 15).to(torch.uint8)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """ToGray: the grey level in all three channels."""
    return to_gray_uint8(images)[:, None].expand_as(images).contiguous()


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply by each image's factor, clip, truncate (Albumentations' lookup table)."""
    return (images.float() * factor.view(-1, 1, 1, 1).float()).clamp(0, 255).to(torch.uint8)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its mean grey level: x * f + mean * (1 - f), clipped, truncated."""
    mean = to_gray_uint8(images).float().mean((1, 2)).view(-1, 1, 1, 1)
    f = factor.view(-1, 1, 1, 1).float()
    return (images.float() * f + mean * (1 - f)).clamp(0, 255).to(torch.uint8)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its grey version: x * f + grey * (1 - f), rounded (OpenCV's addWeighted)."""
    f = factor.view(-1, 1, 1, 1).float()
    grey = to_gray_uint8(images)[:, None].float()
    return (images.float() * f + grey * (1 - f)).round().clamp(0, 255).to(torch.uint8)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HSV with hue in degrees [0, 360), as OpenCV's float conversion."""
    r, g, b = rgb.unbind(1)
    value, _ = rgb.max(1)
    spread = value - rgb.min(1).values
    saturation = torch.where(value > 0, spread / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = spread.clamp(min=1e-12)
    hue = torch.where(value == r, 60 * (g - b) / safe,
                      torch.where(value == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    hue = torch.where(spread > 0, hue, torch.zeros_like(hue))
    return torch.stack([hue % 360, saturation, value], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv.unbind(1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
         + hue[:, None] / 60) % 6
    return value[:, None] - value[:, None] * saturation[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Turn each image's hue by factor x 360 degrees (in floating point), rounded back to uint8."""
    hsv = rgb_to_hsv(images.float() / 255)
    hsv[:, 0] = (hsv[:, 0] + factor.view(-1, 1, 1).float() * 360) % 360
    return (hsv_to_rgb(hsv) * 255).round().clamp(0, 255).to(torch.uint8)


def color_jitter(images: torch.Tensor, generator=None) -> torch.Tensor:
    """ColorJitter: brightness, contrast, saturation and hue, each image its own factors (uniform in
    JITTER_RANGES) applied in its own random order, as torchvision and Albumentations do."""
    n, device = len(images), images.device
    factors = [_rand(n, generator, device, *JITTER_RANGES[k]) for k in ("brightness", "contrast", "saturation", "hue")]
    order = torch.rand(n, 4, generator=generator, device=device).argsort(1)  # a random permutation per image
    operations = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for position in range(4):
        out = images.clone()
        for which, (operation, factor) in enumerate(zip(operations, factors)):
            chosen = order[:, position] == which
            out[chosen] = operation(images[chosen], factor[chosen])
        images = out
    return images


def _clahe_luts(luminance: torch.Tensor, clip_limit: torch.Tensor, tiles: int) -> torch.Tensor:
    """OpenCV's CLAHE look-up tables, one per tile: (N, tiles, tiles, 256) uint8."""
    n, h, w = luminance.shape
    th, tw = h // tiles, w // tiles
    cells = luminance.view(n, tiles, th, tiles, tw).permute(0, 1, 3, 2, 4).reshape(n, tiles * tiles, th * tw)
    hist = torch.zeros(n, tiles * tiles, 256, dtype=torch.int64, device=luminance.device)
    hist.scatter_add_(2, cells.long(), torch.ones_like(cells, dtype=torch.int64))
    area = th * tw
    limit = (clip_limit.float() * area / 256).to(torch.int64).clamp(min=1).view(n, 1, 1)  # int(), at least 1
    excess = (hist - limit).clamp(min=0).sum(2, keepdim=True)
    hist = hist.clamp(max=limit)
    hist += excess // 256  # redistributed evenly, the rest one by one at every step-th bin
    residual = excess % 256
    step = (256 // residual.clamp(min=1)).clamp(min=1)
    bins = torch.arange(256, device=luminance.device).view(1, 1, 256)
    hist += ((bins % step == 0) & (bins // step < residual)).long()
    lut = (hist.cumsum(2).float() * (255 / area)).round().clamp(0, 255)
    return lut.view(n, tiles, tiles, 256).to(torch.uint8)


def clahe_luminance(luminance: torch.Tensor, clip_limit: torch.Tensor, tiles: int = CLAHE_TILES) -> torch.Tensor:
    """CLAHE of uint8 (N, H, W) images as OpenCV does it: a clipped histogram's look-up table per tile, each
    pixel mapped through the four nearest tiles' tables, weighted bilinearly by its distance to their centres."""
    n, h, w = luminance.shape
    lut = _clahe_luts(luminance, clip_limit, tiles).float()
    device = luminance.device

    def axis(size, tile):  # the two neighbouring tiles of each pixel and the weight of the second
        position = torch.arange(size, device=device, dtype=torch.float32) * (1.0 / tile) - 0.5
        first = position.floor()
        weight = position - first
        return first.clamp(min=0).long(), (first + 1).clamp(max=tiles - 1).long(), weight

    y1, y2, wy = axis(h, h // tiles)
    x1, x2, wx = axis(w, w // tiles)
    values = luminance.long()
    batch = torch.arange(n, device=device).view(n, 1, 1)

    def look(ty, tx):
        return lut[batch, ty.view(1, h, 1), tx.view(1, 1, w), values]

    wx, wy = wx.view(1, 1, w), wy.view(1, h, 1)
    top = look(y1, x1) * (1 - wx) + look(y1, x2) * wx
    bottom = look(y2, x1) * (1 - wx) + look(y2, x2) * wx
    return (top * (1 - wy) + bottom * wy).round().clamp(0, 255).to(torch.uint8)


_LAB_TABLES: dict = {}  # device -> the look-up tables of OpenCV's 8-bit Lab conversion, built on first use


def _lab_tables(device) -> dict:
    """OpenCV's fixed-point sRGB <-> CIE Lab for 8-bit images (imgproc/src/color_lab.cpp: RGB2Lab_b and
    Lab2RGBinteger), rebuilt from its constants: what Albumentations' CLAHE converts through."""
    key = str(device)
    if key not in _LAB_TABLES:
        x = np.arange(256) / 255
        linear = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
        y = np.arange(3072) / 2040
        base, fy = 1 << 14, np.arange(256) * 100 * (1 << 14) / (255 * 116) + 16 * (1 << 14) / 116
        small = np.arange(256) <= 20  # the linear part of the curve near black
        i = np.arange(-8145, base * 9 // 4 - 8145)
        v = np.arange(4096) / 4096
        tables = {
            "gamma": np.round(2040 * linear),  # sRGB -> linear, x 255 x 2^3
            "cbrt": np.round(2 ** 15 * np.where(y < 0.008856, y * 7.787 + 16 / 116, np.cbrt(y))),
            "y": np.where(small, np.round(np.arange(256) * base * 180 / (17 * 29 ** 3)), np.round(fy ** 3 / base ** 2)),
            "fy": np.where(small, np.round(base * (16 / 116 + np.arange(256) * 5 / (3 * 17 * 29))), np.round(fy)),
            "xz": np.where(i <= 3390, np.trunc(i * 108 / 841) - (base * 16 // 116 * 108 // 841),
                           (i * i // base) * i // base),  # C's integer division (i > 3390 > 0 there)
            "inverse_gamma": np.round(255 * np.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055)),
        }
        _LAB_TABLES[key] = {k: torch.from_numpy(t.astype(np.int64)).to(device) for k, t in tables.items()}
    return _LAB_TABLES[key]


_D65 = (0.950456, 1.0, 1.088754)  # OpenCV's white point and matrices
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_XYZ_TO_RGB = ((3.240479, -1.53715, -0.498535), (-0.969256, 1.875991, 0.041556), (0.055648, -0.204043, 1.057311))


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> uint8 L*a*b* as OpenCV stores it (L x 255/100, a + 128, b + 128)."""
    tables = _lab_tables(images.device)
    red, green, blue = (tables["gamma"][images[:, k].long()] for k in range(3))
    coefficients = [[round(4096 * _RGB_TO_XYZ[i][j] / _D65[i]) for j in range(3)] for i in range(3)]
    fx, fy, fz = (tables["cbrt"][(red * c[0] + green * c[1] + blue * c[2] + 2048) >> 12] for c in coefficients)
    lightness = (296 * fy - 1336934 + (1 << 14)) >> 15
    a = (500 * (fx - fy) + (128 << 15) + (1 << 14)) >> 15
    b = (200 * (fy - fz) + (128 << 15) + (1 << 14)) >> 15
    return torch.stack([lightness, a, b], 1).clamp(0, 255).to(torch.uint8)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of rgb_to_lab (OpenCV's integer Lab -> RGB)."""
    tables = _lab_tables(lab.device)
    lightness, a, b = (lab[:, k].long() for k in range(3))
    y, fy = tables["y"][lightness], tables["fy"][lightness]
    a_step = ((5 * a * 53687 + 128) >> 13) - 4194  # about (a - 128) x 2^14 / 500
    b_step = ((b * 41943 + 16) >> 9) - 10484  # about (b - 128) x 2^14 / 200
    x, z = tables["xz"][fy + a_step + 8145], tables["xz"][fy - b_step + 8145]
    rows = [[round(4096 * _XYZ_TO_RGB[k][i] * _D65[i]) for i in range(3)] for k in range(3)]
    channels = [tables["inverse_gamma"][((c[0] * x + c[1] * y + c[2] * z + 8192) >> 14).clamp(0, 4095)] for c in rows]
    return torch.stack(channels, 1).clamp(0, 255).to(torch.uint8)


def clahe(images: torch.Tensor, clip_limit: torch.Tensor, tiles: int = CLAHE_TILES) -> torch.Tensor:
    """CLAHE on each image's luminance (the L plane of its 8-bit Lab, as Albumentations does), colour kept."""
    lab = rgb_to_lab(images)
    lab[:, 0] = clahe_luminance(lab[:, 0], clip_limit, tiles)
    return lab_to_rgb(lab)


def dropout_boxes(n: int, height: int, width: int, generator=None, device=None) -> torch.Tensor:
    """(N, DROPOUT_HOLES[1], 4) boxes (top, left, bottom, right), each image 1-2 holes of 3-8 pixel sides
    (DROPOUT_SIZE of the image's) inside the image; unused holes are empty (0, 0, 0, 0)."""
    k = DROPOUT_HOLES[1]
    holes = torch.randint(DROPOUT_HOLES[0], DROPOUT_HOLES[1] + 1, (n, 1), generator=generator, device=device)
    sides = []
    for size in (height, width):
        low, high = max(1, int(DROPOUT_SIZE[0] * size)), max(1, int(DROPOUT_SIZE[1] * size))
        sides.append(torch.randint(low, high + 1, (n, k), generator=generator, device=device))
    tops = (torch.rand(n, k, generator=generator, device=device) * (height - sides[0] + 1)).long()
    lefts = (torch.rand(n, k, generator=generator, device=device) * (width - sides[1] + 1)).long()
    boxes = torch.stack([tops, lefts, tops + sides[0], lefts + sides[1]], 2)
    return torch.where((torch.arange(k, device=device).view(1, k) < holes)[..., None], boxes, 0)


def coarse_dropout(images: torch.Tensor, boxes: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """CoarseDropout: set each image's boxes ((N, K, 4) top, left, bottom, right) to `fill`."""
    h, w = images.shape[2:]
    rows = torch.arange(h, device=images.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, 1, w)
    t, l, b, r = (boxes[..., i].view(*boxes.shape[:2], 1, 1) for i in range(4))
    inside = ((rows >= t) & (rows < b) & (cols >= l) & (cols < r)).any(1)
    return images.masked_fill(inside[:, None], fill)


def remap(images: torch.Tensor, map_x: torch.Tensor, map_y: torch.Tensor) -> torch.Tensor:
    """out[y, x] = image[map_y[y, x], map_x[y, x]] ((N, H, W) maps in pixels), bilinear, zero outside: cv2.remap
    with INTER_LINEAR and BORDER_CONSTANT, as Albumentations' GridDistortion and ElasticTransform call it."""
    n, _, h, w = images.shape
    grid = torch.stack([map_x * (2 / (w - 1)) - 1, map_y * (2 / (h - 1)) - 1], -1).float()
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def grid_distortion_maps(steps_x: torch.Tensor, steps_y: torch.Tensor, height: int, width: int) -> tuple:
    """Albumentations' GridDistortion maps (normalized=True) from each image's GRID_STEPS + 1 cell stretches
    per axis ((N, S + 1), around 1): each cell of the grid sampled from a stretched or squeezed source cell,
    the stretches rescaled so that the grid still spans the image. Returns (map_x, map_y), (N, H, W)."""
    num_steps = steps_x.shape[1] - 1

    def axis(steps, size):
        step = size // num_steps
        steps = steps.float().clone()
        last = min(size, (num_steps + 1) * step) - num_steps * step
        steps[:, -1] *= last / step
        steps = steps * ((size / math.floor(size / num_steps)) / steps.sum(1, keepdim=True))
        ends = torch.cumsum(step * steps, 1)
        starts = ends - step * steps
        position = torch.arange(size, device=steps.device)
        cell = (position // step).clamp(max=num_steps)
        length = (size - cell * step).clamp(max=step)  # the cell's pixels (the last may be shorter)
        within = (position - cell * step).float() / (length - 1).clamp(min=1)
        start, end = starts[:, cell], ends[:, cell]
        return start + (end - start) * within  # np.linspace(prev, cur, length) inside each cell

    xx, yy = axis(steps_x, width), axis(steps_y, height)
    n = len(steps_x)
    return xx[:, None, :].expand(n, height, width), yy[:, :, None].expand(n, height, width)


def elastic_maps(n: int, height: int, width: int, generator=None, device=None, alpha: float = ELASTIC_ALPHA,
                 sigma: float = ELASTIC_SIGMA) -> tuple:
    """Albumentations' ElasticTransform displacement: Gaussian noise per pixel and axis, divided by its largest
    magnitude in the image, blurred with a Gaussian of `sigma` (edges replicated), times alpha."""
    noise = torch.randn(n, 2, height, width, generator=generator, device=device, dtype=torch.float32)
    noise = noise / noise.abs().amax((1, 2, 3), keepdim=True).clamp(min=1e-6)
    return displacement_maps(*blur_displacement(noise, sigma).mul(alpha).unbind(1))


def blur_displacement(fields: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of (N, C, H, W) fields, edges replicated (OpenCV's BORDER_REPLICATE), with
    OpenCV's kernel for a float image and ksize (0, 0): 8 sigma + 1 taps (odd), normalised."""
    r = (int(round(sigma * 4 * 2 + 1)) | 1) // 2
    kernel = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(fields.device)
    n, c, h, w = fields.shape
    x = fields.reshape(n * c, 1, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.view(n, c, h, w)


def displacement_maps(dx: torch.Tensor, dy: torch.Tensor) -> tuple:
    """Source coordinates (map_x, map_y) = each pixel's own plus its displacement; (N, H, W) each."""
    n, h, w = dx.shape
    rows = torch.arange(h, device=dx.device, dtype=dx.dtype).view(1, h, 1)
    cols = torch.arange(w, device=dx.device, dtype=dx.dtype).view(1, 1, w)
    return cols + dx, rows + dy


def advanced_augment(images: torch.Tensor, generator: Optional[torch.Generator] = None,
                     policy: tuple = ADVANCED_POLICY) -> tuple:
    """The notebook's advanced policy (ADVANCED_POLICY), after crop and flip: per group and image, whether the
    group applies and which member, in proportion to the members' p (Albumentations' OneOf). Returns the images
    and the (N, 2) indices into ADVANCED_OPERATIONS of the operation each group ran (-1: none)."""
    n, device = len(images), images.device
    h, w = images.shape[2:]
    chosen = torch.full((n, 2), -1, dtype=torch.long, device=device)
    for g, (p, members) in enumerate(policy):
        applies = torch.rand(n, generator=generator, device=device) < p
        weights = torch.tensor([q for _, q in members], device=device)
        member = torch.multinomial(weights.expand(n, -1), 1, generator=generator)[:, 0]
        chosen[:, g] = torch.where(applies, member + 3 * g, -1)
        for m, (name, _) in enumerate(members):
            index = (applies & (member == m)).nonzero()[:, 0]
            if len(index) == 0:
                continue
            subset, k = images[index], len(index)
            if name == "color_jitter":
                out = color_jitter(subset, generator)
            elif name == "to_gray":
                out = to_gray(subset)
            elif name == "clahe":
                out = clahe(subset, _rand(k, generator, device, *CLAHE_CLIP_LIMIT))
            elif name == "coarse_dropout":
                out = coarse_dropout(subset, dropout_boxes(k, h, w, generator, device))
            elif name == "grid_distortion":
                steps = 1 + _rand(k * 2 * (GRID_STEPS + 1), generator, device, -GRID_LIMIT, GRID_LIMIT)
                steps = steps.view(2, k, GRID_STEPS + 1)
                out = remap(subset, *grid_distortion_maps(steps[0], steps[1], h, w))
            else:
                out = remap(subset, *elastic_maps(k, h, w, generator, device))
            images = images.index_copy(0, index, out)
    return images, chosen


ADVANCED_OPERATIONS = tuple(name for _, members in ADVANCED_POLICY for name, _ in members)


# ----------------------------------------------------------------------------------------------------------
# Loss


def mixed_cross_entropy(logits: torch.Tensor, labels_a: torch.Tensor, labels_b: Optional[torch.Tensor] = None,
                        lam=1.0, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed cross-entropy against the mixed target lam * a + (1 - lam) * b.

    Smoothing is applied once, to the mixed target: each sample's loss is
    (1 - smoothing) * (lam * NLL(a) + (1 - lam) * NLL(b)) + smoothing * mean over classes of -log p,
    which equals lam * CE_s(a) + (1 - lam) * CE_s(b) and, for hard labels, F.cross_entropy(label_smoothing=s).
    Computed in float32 whatever the logits' dtype. `lam` may be a float or a 0-d tensor.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, labels_a[:, None]).squeeze(1)
    if labels_b is not None:
        nll_b = -logp.gather(1, labels_b[:, None]).squeeze(1)
        nll = nll_b + lam * (nll - nll_b)
    loss = (1.0 - smoothing) * nll - smoothing * logp.mean(dim=1) if smoothing else nll
    return loss.mean()


# ----------------------------------------------------------------------------------------------------------
# Model: ResNet with BasicBlocks, parameter names as in torchvision


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:  # match the shortcut's shape with a 1x1 conv
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet of BasicBlocks. stem="cifar": 3x3 stride-1 conv, no max-pool (32x32 into stage 1); "imagenet":
    torchvision's 7x7/2 conv + 3x3 max-pool, state_dict-compatible with torchvision's resnet18/34 at width 64.
    zero_init_residual: each block's last BatchNorm weight starts at 0 (torchvision's option; Goyal et al. 2017)."""

    def __init__(self, blocks_per_stage=(3, 4, 6, 3), num_classes: int = 100, width: int = 64, stem: str = "cifar",
                 zero_init_residual: bool = False):
        super().__init__()
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = width
        for i, n_blocks in enumerate(blocks_per_stage):
            out_channels = width * 2 ** i
            blocks = [BasicBlock(channels, out_channels, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(out_channels, out_channels) for _ in range(n_blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            channels = out_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():  # torchvision's init; BatchNorm (weight 1, bias 0) and Linear keep torch's
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, BasicBlock) and zero_init_residual:
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x):  # x: (B, 3, H, W) normalised images
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


def resnet18(num_classes: int = 100, width: int = 64, stem: str = "cifar", zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 (2, 2, 2, 2 BasicBlocks) for 32x32 images: 11.2 M parameters at 100 classes and width 64.
    width: the first stage's channels (doubled at each of the 3 later stages); stem: see ResNet. Takes
    normalised (B, 3, H, W) images, returns (B, num_classes) logits."""
    return ResNet(ARCHITECTURES["resnet18"], num_classes, width, stem, zero_init_residual)


def resnet34(num_classes: int = 100, width: int = 64, stem: str = "cifar", zero_init_residual: bool = False) -> ResNet:
    """ResNet-34 (3, 4, 6, 3 BasicBlocks), the recipe's network: 21.3 M parameters at 100 classes and width 64.
    Arguments and shapes as resnet18's."""
    return ResNet(ARCHITECTURES["resnet34"], num_classes, width, stem, zero_init_residual)


def build_model(config: TrainConfig) -> ResNet:
    return ResNet(ARCHITECTURES[config.arch], DATASETS[config.dataset].num_classes, config.width, config.stem,
                  config.zero_init_residual)


# ----------------------------------------------------------------------------------------------------------
# Optimiser and schedule


def build_optimizer(model: nn.Module, config: TrainConfig, fused: bool = False) -> torch.optim.SGD:
    """SGD with momentum. With decay_norm_and_bias off, BatchNorm weights and all biases (every parameter
    with fewer than 2 dimensions) get no weight decay; the notebook decays them all."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.decay_norm_and_bias:
        groups = [{"params": params, "weight_decay": config.weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, **kwargs)


def resolve_t0(epochs: float, t_mult: float, t0: Optional[float] = None, notebook_t0: float = 50.0) -> float:
    """The first cycle's length: t0, or (None) k whole cycles fitted into `epochs`, k the most whose first is
    still >= the notebook's 50 epochs (k >= 1): 400 epochs at t_mult=2 give 57.1, 114.3 and 228.6."""
    if t0 is not None:
        return float(t0)
    k = 1  # the first of k cycles: epochs / (1 + t_mult + ... + t_mult^(k-1))
    while epochs / sum(t_mult ** i for i in range(k + 1)) >= notebook_t0:
        k += 1
    return epochs / sum(t_mult ** i for i in range(k))


def cycle_position(t: float, t0: float, t_mult: float) -> tuple[float, float]:
    """(epochs into the current cycle, length of that cycle) at `t` epochs after the warm-up."""
    length = t0
    # Subtract whole cycles, as torch's step() does. The 1e-9 tolerance puts a boundary that rounding left a
    # hair away (three cycles of 400/7 epochs sum to 399.99999999999994) at the boundary.
    while t > length - 1e-9:
        t -= length
        length *= t_mult
    return max(t, 0.0), length


def learning_rate(epoch: float, config: TrainConfig, t0: Optional[float] = None) -> float:
    """The rate at a fractional epoch in [0, config.epochs]: linear warm-up, then cosine annealing with warm
    restarts (t0: the first cycle, by default config.first_cycle); at the end, the annealed rate. At whole
    epochs after warm-up it equals torch's CosineAnnealingWarmRestarts(T_0=t0, T_mult, eta_min) stepped per
    epoch; set every step, it falls smoothly within an epoch."""
    t0 = config.first_cycle if t0 is None else t0
    if epoch < config.warmup_epochs:
        return config.lr * epoch / config.warmup_epochs
    if config.extended_from and epoch >= config.extended_from[0]:  # the epochs added by `--resume --epochs N`
        ends = [*config.extended_from, config.epochs]
        start = max(e for e in ends[:-1] if e <= epoch)
        t_cur, length = epoch - start, ends[ends.index(start) + 1] - start
        restarted = True
    else:  # at the run's end, the end of its last cycle rather than the next one's peak
        hair = 1e-6 if epoch >= config.epochs - 1e-9 else 0.0
        t_cur, length = cycle_position(epoch - config.warmup_epochs - hair, t0, config.t_mult)
        t_cur += hair
        restarted = length > t0 + 1e-9 or (config.t_mult == 1 and epoch - config.warmup_epochs >= t0 - 1e-9)
    ramp = min(config.restart_warmup, length / 2) if restarted else 0.0  # --restart-warmup: from the cycle's end
    if t_cur < ramp:
        return config.min_lr + (config.lr - config.min_lr) * t_cur / ramp
    t_cur, length = t_cur - ramp, length - ramp
    return config.min_lr + (config.lr - config.min_lr) * (1 + math.cos(math.pi * t_cur / length)) / 2


def schedule_end(config: TrainConfig, t0: float) -> tuple[float, float, float]:
    """Where the planned schedule ends: (epochs into its last cycle, 0 at a cycle's end; its length; the rate
    there as a fraction of the peak)."""
    t_cur, length = cycle_position(config.planned_epochs - config.warmup_epochs, t0, config.t_mult)
    if t_cur < 1e-6:
        return 0.0, length, config.min_lr / config.lr
    end_lr = learning_rate(config.planned_epochs, dataclasses.replace(config, extended_from=()), t0)
    return t_cur, length, end_lr / config.lr


def schedule_end_warning(config: TrainConfig, t0: float) -> Optional[str]:
    """A warning when the run ends inside a cycle, its last weights trained at a high rate."""
    t_cur, length, end_fraction = schedule_end(config, t0)
    if not t_cur:
        return None
    return (f"the schedule ends {t_cur:g} epoch{'s' * (t_cur != 1)} into a {length:g}-epoch cycle at "
            f"{end_fraction:.0%} of the peak learning rate, so the last weights are not annealed; --t0 auto fits "
            f"whole cycles into --epochs")


# ----------------------------------------------------------------------------------------------------------
# Devices and precision


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything named must exist here."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    device = None
    with suppress(RuntimeError):
        device = torch.device(name)
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if not {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps}[device.type]:
        raise UserError(f"--device {name}: {device.type.upper()} is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_cuda_graphs(setting: str, device: torch.device, amp_dtype: Optional[torch.dtype]) -> bool:
    """Whether to capture the training step as a CUDA graph (needs CUDA and no fp16 gradient scaler)."""
    possible = device.type == "cuda" and amp_dtype != torch.float16
    if setting == "on" and not possible:
        raise UserError(f"--cuda-graphs on needs a CUDA device and --amp other than fp16 (device {device}, "
                        f"amp {amp_dtype or 'off'})")
    return possible and setting != "off"


def resolve_compile(setting: str, device: torch.device, epochs: int) -> bool:
    """Whether to torch.compile the step. auto: with CUDA (and Triton, its GPU compiler), for long runs."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" and epochs >= COMPILE_AUTO_EPOCHS and importlib.util.find_spec("triton") is not None


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for float32. auto: bf16 where the GPU has it, else fp16; off on CPU/MPS."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device (with its gradient scaler); this run is on {device}")
    return torch.bfloat16 if amp == "bf16" else torch.float16


@dataclass(frozen=True)
class Environment:
    """What a run's settings became on this machine: decided once by resolve(), read by the run, recorded in
    config.json."""
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None: float32
    compile: bool
    cuda_graphs: bool
    t0: float  # the first cycle, in epochs
    rank: int = 0  # this process, and the number of processes training together (torchrun; 1 alone)
    world: int = 1

    def record(self) -> dict:
        """What config.json records of it, with the versions the run used."""
        torchvision_version = None  # (only downloading needs it) read from its metadata: importing it takes 1 s
        with suppress(importlib.metadata.PackageNotFoundError):
            torchvision_version = importlib.metadata.version("torchvision")
        record = {"device_resolved": str(self.device), "amp_resolved": str(self.amp_dtype or "off"),
                  "compile_resolved": self.compile, "cuda_graphs_resolved": self.cuda_graphs, "t0_resolved": self.t0,
                  "processes": self.world, "torch_version": torch.__version__,
                  "torchvision_version": torchvision_version, "numpy_version": np.__version__,
                  "python_version": sys.version.split()[0], "module_version": __version__}
        if self.device.type == "cuda":
            record["device_name"] = torch.cuda.get_device_name(self.device)
        return record


def resolve(config: TrainConfig) -> Environment:
    """Check config's values, then decide its auto settings here. Raises UserError for an invalid value or
    what this machine cannot do (an absent device, CUDA graphs with fp16)."""
    config.validate()
    rank, world = process_group()
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda" and device.index is None:  # each process its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    if config.sync_bn and world > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices: torch's SyncBatchNorm runs on GPUs only")
    amp_dtype = resolve_amp(config.amp, device)
    graphs = resolve_cuda_graphs(config.cuda_graphs, device, amp_dtype)
    if graphs and world > 1:
        if config.cuda_graphs == "on":
            warn("--cuda-graphs is off with several processes: DistributedDataParallel's gradient all-reduce "
                 "runs outside the captured step")
        graphs = False
    return Environment(device, amp_dtype, resolve_compile(config.compile, device, config.epochs), graphs,
                       config.first_cycle, rank, world)


def process_group() -> tuple[int, int]:
    """(this process's rank, the number of processes) of a running torch.distributed group; (0, 1) without."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _under_torchrun() -> bool:
    """Whether torchrun started this process as one of several (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_torchrun(device: str) -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join its process group: NCCL between GPUs, gloo
    between CPUs. Returns whether it joined (the caller leaves the group at the end)."""
    if not _under_torchrun() or process_group()[1] > 1:
        return False
    gpus = device != "cpu" and device != "mps" and torch.cuda.is_available()
    if gpus:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if gpus else "gloo")
    return True


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation


def autocast(device: torch.device, dtype: Optional[torch.dtype], **kwargs):
    """torch.autocast to `dtype` on the device's type, or no autocast for None (float32)."""
    return torch.autocast(device.type, dtype=dtype, **kwargs) if dtype else nullcontext()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, normalize: Normalizer, batch_size: int = 1000,
            amp_dtype: Optional[torch.dtype] = None, tta: bool = False) -> dict:
    """{"": the float32 logits of every image} and, with tta, {"tta_": the mean of the logits of each image and
    of its mirror image} (flip test-time augmentation)."""
    was_training = model.training
    model.eval()
    plain, mirrored = [], []
    for start, end in epoch_batches(len(images), batch_size):
        x = normalize(images[start:end])
        with autocast(images.device, amp_dtype):
            plain.append(model(x).float())
            if tta:
                mirrored.append(model(x.flip(3)).float())
    model.train(was_training)
    logits = {"": torch.cat(plain)}
    if tta:
        logits["tta_"] = (logits[""] + torch.cat(mirrored)) / 2
    return logits


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> dict:
    """loss = mean cross-entropy (no smoothing), top1/top5 = correct / N, over every image exactly. The loss is
    summed batch by batch, in the order the images were evaluated."""
    loss_sum = torch.zeros((), device=logits.device)
    for start, end in epoch_batches(len(labels), batch_size):
        loss_sum += F.cross_entropy(logits[start:end], labels[start:end], reduction="sum")
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    loss, top1, top5 = torch.stack([loss_sum, hits[:, 0].sum(), hits.any(dim=1).sum()]).tolist()  # one host sync
    n = max(len(labels), 1)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Normalizer,
             batch_size: int = 1000, amp_dtype: Optional[torch.dtype] = None, tta: bool = False) -> dict:
    """The metrics of every image (classification_metrics); with tta, also tta_loss/tta_top1/tta_top5 of flip
    test-time augmentation, reported beside the plain ones, never instead of them."""
    result = {"n": len(images)}
    for prefix, logits in predict(model, images, normalize, batch_size, amp_dtype, tta).items():
        result.update({prefix + k: v for k, v in classification_metrics(logits, labels, batch_size).items()})
    return result


@dataclass
class EpochState:
    """What a checkpoint written inside an epoch needs to finish that epoch exactly."""
    data_rng_at_start: torch.Tensor  # the data generator's state when the epoch began (replays its order)
    loss_sum: torch.Tensor  # sum over done batches of loss * batch size (0-d, on the device; in a checkpoint of
    #                         several processes, each process's sum, in the order of their ranks)
    first_bad_step: torch.Tensor  # -1, or the first step whose loss was not finite (0-d, on the device)
    step: int = 0  # batches done
    seen: int = 0  # images done
    seconds: float = 0.0  # training time spent in this epoch so far


PROGRESS_FIRST_SECONDS = 5.0  # the first step line comes this long after training starts,
PROGRESS_EVERY_SECONDS = 30.0  # then at least this often (and every --log-every steps)
GRAPH_WARMUP_STEPS = 3  # eager steps before capture: cuDNN autotuning, momentum buffers, compilation


class CapturedStep:
    """One training step (forward, backward, SGD update) recorded once as a CUDA graph, then replayed: a
    ResNet-34 step is about a thousand kernels, which at batch 128 take longer to launch than to run. Inputs
    are copied into the recorded buffers; the step sets gradients to None first, so backward allocates them
    in the graph's pool; the learning rate is a device tensor the optimiser reads, updated with fill_()."""

    def __init__(self, step: Callable, inputs: tuple):
        self.inputs = tuple(t.clone() for t in inputs)  # clone keeps channels_last
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step(*self.inputs)

    def __call__(self, *inputs) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return self.loss


class Trainer:
    """The model, optimiser, scaler, generators and position of one run; trains one epoch at a time. With
    several processes (torchrun) every process draws the same global batch of batch_size x processes images,
    trains on its share, and DistributedDataParallel averages the gradients."""

    def __init__(self, config: TrainConfig, data: CifarData, log: Callable[[str], None] = print,
                 env: Optional[Environment] = None, progress: Optional[Callable[[str], None]] = None):
        self.env = env or resolve(config)  # train() resolves once and passes it on
        self.config, self.log, self.progress = config, log, progress or log  # progress: the step lines
        self.next_progress = time.perf_counter() + PROGRESS_FIRST_SECONDS  # the first timed step line
        self.cost_note = None  # the CPU-cost note: None, the (images, seconds) it measures from, its estimate, "final"
        self.device, self.amp_dtype, self.t0 = self.env.device, self.env.amp_dtype, self.env.t0
        self.rank, self.world = self.env.rank, self.env.world
        cuda = self.device.type == "cuda"
        self.splits = {name: (images.to(self.device), labels.to(self.device))  # (uint8 images, labels)
                       for name, (images, labels) in split_data(data, config).items()}
        self.n_train = len(self.splits["train"][0])
        self.normalize = Normalizer(data.info.mean, data.info.std, self.device, channels_last=cuda)
        global_batch = config.batch_size * self.world
        if global_batch > self.n_train:
            processes = f" x {self.world} processes" if self.world > 1 else ""
            raise UserError(f"--batch-size {config.batch_size}{processes} is larger than the training set "
                            f"({self.n_train} images)")
        last = self.n_train % global_batch or global_batch  # the images of the epoch's last batch
        if last < self.world:
            raise UserError(f"the last batch of each epoch ({last} images) would leave some of the {self.world} "
                            f"processes without an image: change --batch-size or --limit-train")
        if config.stem == "imagenet" and min(config.batch_size, last // self.world) < 2:  # (torch raises a ValueError)
            raise UserError("--stem imagenet shrinks 32x32 images to 1x1 maps, on which BatchNorm cannot train with "
                            "one image in a batch (per process): change --batch-size or --limit-train")
        self.batches = epoch_batches(self.n_train, global_batch)
        self.steps_per_epoch = len(self.batches)

        torch.manual_seed(config.seed)  # the model's initial weights
        self.model = build_model(config).to(self.device)
        if config.sync_bn and self.world > 1:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # the same parameters and names
        if cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        # not fused beside fp16's scaler: torch's fused SGD leaves its momentum unwritten on a skipped first step
        self.optimizer = build_optimizer(self.model, config, fused=cuda and self.amp_dtype != torch.float16)
        self.ddp, self.control, self._vote = None, None, None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if cuda else None)
            self.control = torch.distributed.new_group(backend="gloo")  # CPU messages: stop votes
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        # Two streams of randomness: the epoch order and crop/flip on the device, and the per-batch mixing
        # scalars (lam, the box, MixUp or CutMix) on the CPU, where drawing them costs no device sync.
        self.data_rng = torch.Generator(self.device).manual_seed(config.seed + 1)
        self.mix_rng = torch.Generator().manual_seed(config.seed + 2)
        self.unmixed = dataclasses.replace(config, mixup=False, cutmix=False)  # the --mix-off-epochs at the end
        self.ema, self.ema_updates = None, 0  # --ema: the averaged model, and how many steps it has averaged
        if config.ema:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
            pairs = list(zip(self.ema.state_dict().values(), self.model.state_dict().values()))  # the tensors
            floats = [pair for pair in pairs if pair[0].is_floating_point()]  # themselves (views)
            self._ema_floats = ([e for e, _ in floats], [m for _, m in floats])  # (averages, weights): lerped
            self._ema_counts = [pair for pair in pairs if not pair[0].is_floating_point()]
        # How a step runs (see _step). dynamic=False: the smaller last batch gets a compiled graph of its own
        # instead of turning every batch size into a symbol (slower kernels). With CUDA graphs the rate lives
        # on the device, where the recorded SGD kernels read it at each replay.
        self.use_compile, self.use_graphs = self.env.compile, self.env.cuda_graphs
        if self.use_compile and self.device.type == "cpu":
            warn("--compile on the CPU is not trusted: with torch 2.14 on an AMD EPYC it computed a wrong weight "
                 "gradient for the strided 1x1 shortcut convolutions; --compile off (on --resume too) trains eagerly")
        self.forward_loss = torch.compile(self._forward_loss, dynamic=False) if self.use_compile else self._forward_loss
        self.graph, self.eager_steps = None, 0  # the captured step, and the steps run before it
        self.lr_tensor = torch.tensor(config.lr, device=self.device) if self.use_graphs else None

        self.epoch = 0  # epochs completed
        self.partial: Optional[EpochState] = None  # set while an epoch is interrupted
        self.best: dict = {"metric": "val_top1" if config.val_split else "test_top1", "value": -1.0, "epoch": 0}
        self.history: list = []  # one metrics row per completed epoch: metrics.csv is written from it
        self.run_id: Optional[str] = None  # names the run a checkpoint belongs to (set by train())

    # --- one step

    def _forward_loss(self, x, labels_a, labels_b, lam):
        # no autocast weight cache: each weight is cast once per step anyway, and a cache breaks graph replay
        with autocast(self.device, self.amp_dtype, cache_enabled=False):
            logits = (self.ddp if self.ddp is not None else self.model)(x)
        return mixed_cross_entropy(logits, labels_a, labels_b, lam, self.config.label_smoothing)

    def _update(self, x, labels_a, labels_b, lam, weight: float = 1.0) -> torch.Tensor:
        """Forward and loss, backward (scaled by weight: a process's share counts by its size), SGD update."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_loss(x, labels_a, labels_b, lam)
        self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def _step(self, x, labels_a, labels_b, lam, weight: float = 1.0) -> torch.Tensor:
        """One step: eager, compiled (--compile), or with CUDA graphs a full batch replays the step recorded after
        GRAPH_WARMUP_STEPS eager ones on a side stream (a smaller last batch runs eagerly). Under --compile auto
        a failure to compile is a warning and the run goes on without it."""
        batch, full = (x, labels_a, labels_b, lam), len(x) == self.config.batch_size
        if self.use_graphs and full and self.graph is None and self.eager_steps >= GRAPH_WARMUP_STEPS:
            self.graph = CapturedStep(self._update, batch)
        if self.graph is not None and full:
            return self.graph(*batch)
        self.eager_steps += 1
        side = torch.cuda.Stream(self.device) if self.use_graphs and self.graph is None else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # a no-op for None
            try:
                loss = self._update(*batch, weight)
            except Exception as e:  # compiling fails before the optimiser step: nothing has changed yet
                from torch._dynamo.exc import TorchDynamoException  # (loaded by torch.compile already)
                if not (self.use_compile and self.config.compile == "auto" and isinstance(e, TorchDynamoException)
                        and not isinstance(e, torch.cuda.OutOfMemoryError)):  # (out of memory is no compile failure)
                    raise
                warn(f"torch.compile failed ({type(e).__name__}: {_first_line(e, 200)}); training on without it "
                     f"(--compile off skips the attempt, --compile on stops instead)")
                self.forward_loss, self.use_compile = self._forward_loss, False
                loss = self._update(*batch, weight)
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)
        return loss

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps."""
        if self.lr_tensor is not None:
            self.lr_tensor.fill_(lr)  # a device-side write: no sync, and the captured graph sees it
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_tensor if self.lr_tensor is not None else lr

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        """Normalise and mix a (global) batch of augmented uint8 images, train on this process's share at the
        rate set; returns the loss (a device tensor) and the share's image count."""
        mixing = self.config if self.epoch < self.config.epochs - self.config.mix_off_epochs else self.unmixed
        x, y_a, y_b, lam = mix_batch(self.normalize(images), labels, mixing, self.mix_rng)
        n, weight = len(images), 1.0
        if self.world > 1:  # this process's share of the global batch, mixed as a whole above
            first, last = self._share(len(images))
            x, y_a, y_b, n = x[first:last], y_a[first:last], y_b[first:last], last - first
            weight = n * self.world / len(images)  # the gradients' average is then the batch's mean
        loss = self._step(x, y_a, y_b, torch.full((), lam, device=self.device), weight)
        if self.ema is not None:
            self.update_ema()
        return loss, n

    def update_ema(self) -> None:
        """One --ema step, as timm's ModelEmaV3(use_warmup=True): with decay min(ema, 1 - k ** -2/3) at update k,
        every floating tensor of the state moves towards the model's by 1 - decay; step counts are copied."""
        self.ema_updates += 1
        decay = min(self.config.ema, 1 - self.ema_updates ** (-2 / 3))  # 0 at the first
        with torch.no_grad():
            torch._foreach_lerp_(*self._ema_floats, 1.0 - decay)
            for ema, model in self._ema_counts:
                ema.copy_(model)

    # --- one epoch

    def augmented_epoch(self, details: bool = False) -> tuple:
        """One epoch's training images in the order drawn for it, cropped, flipped (and with --aug advanced, the
        policy), and their labels; with details, also how ({"order", "dy", "dx", "flipped", "operations"})."""
        train_images, train_labels = self.splits["train"]
        order = torch.randperm(self.n_train, generator=self.data_rng, device=self.device)
        cropped, (dy, dx) = random_crop(train_images[order], generator=self.data_rng, return_offsets=True)
        images, flipped = random_flip(cropped, generator=self.data_rng, return_mask=True)
        operations = None
        if self.config.aug == "advanced":
            images, operations = advanced_augment(images, self.data_rng)
        changes = {"order": order, "dy": dy, "dx": dx, "flipped": flipped, "operations": operations}
        return (images, train_labels[order], changes) if details else (images, train_labels[order])

    def train_epoch(self, should_stop: Callable[[], bool] = lambda: False) -> Optional[dict]:
        """Train (or finish) epoch self.epoch + 1: its train metrics, or None when should_stop() stopped it after
        a step (self.partial then says where to continue)."""
        cfg, dev, state = self.config, self.device, self.partial
        if state is None:
            state = EpochState(self.data_rng.get_state(), loss_sum=torch.zeros((), device=dev),
                               first_bad_step=torch.full((), -1, dtype=torch.int64, device=dev))
        else:
            self.data_rng.set_state(state.data_rng_at_start)  # replays this epoch's order and augmentation
            if state.loss_sum.ndim:  # every process's sum, gathered for a checkpoint: this process's own
                state.loss_sum = state.loss_sum[self.rank]
        self.partial = None
        images, labels = self.augmented_epoch()
        self.model.train()
        started = time.perf_counter() - state.seconds
        for step in range(state.step, self.steps_per_epoch):
            start, end = self.batches[step]
            lr = learning_rate(self.epoch + step / self.steps_per_epoch, cfg, self.t0)
            self.set_lr(lr)
            loss, n = self.train_batch(images[start:end], labels[start:end])
            state.loss_sum += loss * n
            bad_now = ~torch.isfinite(loss) & (state.first_bad_step < 0)
            state.first_bad_step = torch.where(bad_now, step, state.first_bad_step)
            state.seen += n
            state.step = step + 1
            now = time.perf_counter()
            counted = bool(cfg.log_every) and state.step % cfg.log_every == 0
            if counted or now >= self.next_progress:
                if counted or self.world == 1:  # with several processes a collective: only at a step count
                    self._check_finite(state)  # a host sync, once per progress line
                self._report_progress(state, lr, time.perf_counter() - started)
                self.next_progress = now + PROGRESS_EVERY_SECONDS
            if state.step < self.steps_per_epoch and self.agree_to_stop(should_stop()):
                break
        if dev.type == "cuda":  # its queued work done, before reading the clock
            torch.cuda.synchronize(dev)
        state.seconds = time.perf_counter() - started
        self._check_finite(state)
        if state.step < self.steps_per_epoch:
            if self.world > 1:  # each process's sum so far, for process 0's checkpoint: resumed, each goes on
                sums = [torch.zeros_like(state.loss_sum) for _ in range(self.world)]  # adding to its own
                torch.distributed.all_gather(sums, state.loss_sum)
                state.loss_sum = torch.stack(sums)
            self.partial = state
            return None
        totals = torch.tensor([float(state.loss_sum), state.seen], dtype=torch.float64, device=dev)
        if self.world > 1:  # the loss summed and the images counted over every process
            torch.distributed.all_reduce(totals)
        self.epoch += 1
        self._cpu_cost_note(self.n_train, state.seconds, epoch_done=True)
        return {"lr": learning_rate(self.epoch - 1, cfg, self.t0), "train_loss": float(totals[0]) / int(totals[1]),
                "train_seconds": state.seconds, "images_per_s": self.n_train / state.seconds}

    def _report_progress(self, state: EpochState, lr: float, seconds: float) -> None:
        """A step line: loss so far, images/s in this epoch (every process's), the time left in epoch and run."""
        cfg, rate = self.config, state.seen * self.world / max(seconds, 1e-9)
        epoch_left = (self.n_train - state.seen * self.world) / rate
        run_left = epoch_left + (cfg.epochs - self.epoch - 1) * self.n_train / rate
        self.progress(f"epoch {self.epoch + 1}/{cfg.epochs} step {state.step}/{self.steps_per_epoch} "
                      f"({state.step / self.steps_per_epoch:.0%}) lr {lr:.4f} loss "
                      f"{state.loss_sum.item() / state.seen:.4f} {rate:.0f} img/s, epoch ETA "
                      f"{format_duration(epoch_left)}, run ETA {format_duration(run_left)}")
        self._cpu_cost_note(state.seen * self.world, seconds)

    def _cpu_cost_note(self, seen: int, seconds: float, epoch_done: bool = False) -> None:
        """On a CPU, a note when the run would take over an hour: estimated from the steps after the first step
        line (those before it hold the warm-up), corrected by the first epoch if off by over 25 %."""
        note, cfg = self.cost_note, self.config
        if self.device.type != "cpu" or note == "final" or (isinstance(note, float) and not epoch_done):
            return
        if note is None and not epoch_done:  # the first step line: measure from here
            self.cost_note = (seen, seconds)
            return
        estimate = seconds if epoch_done else self.n_train * (seconds - note[1]) / max(seen - note[0], 1)
        run = f"{cfg.epochs} epochs: about {format_duration(estimate * cfg.epochs)}"
        if isinstance(note, float):  # the epoch's end corrects the estimate said
            if abs(estimate - note) > 0.25 * note:
                self.log(f"note: epoch {self.epoch} took {format_duration(estimate)} (estimated: "
                         f"{format_duration(note)}), so {run}")
        elif estimate * cfg.epochs > 3600:
            smaller = [flag for flag, bigger in [("--arch resnet18", cfg.arch != "resnet18"), ("--width 16",
                       cfg.width > 16), ("--limit-train 5000", self.n_train > 5000)] if bigger]
            self.log(f"note: on this CPU one epoch of {self.n_train:,} images takes about "
                     f"{format_duration(estimate)} ({run}); this recipe is meant for a GPU."
                     + (f" For a first try: {' '.join(smaller)}" if smaller else ""))
            self.cost_note = estimate
        if epoch_done:
            self.cost_note = "final"

    def _check_finite(self, state: EpochState) -> None:
        bad = state.first_bad_step
        if self.world > 1:  # the first bad step of any process (every process checks at the same steps)
            bad = torch.where(bad < 0, self.steps_per_epoch, bad)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
            bad = torch.where(bad == self.steps_per_epoch, -1, bad)
        if int(bad) >= 0:
            lr = learning_rate(self.epoch + int(bad) / self.steps_per_epoch, self.config, self.t0)
            raise TrainingDiverged(f"the loss became non-finite at epoch {self.epoch + 1}, step {int(bad) + 1} "
                                   f"(lr {lr:.4g})")

    def check_weights_finite(self, where: str) -> None:
        """Raise TrainingDiverged unless every weight and buffer (BatchNorm statistics too) is finite."""
        tensors = {name: t for name, t in self.model.state_dict().items() if t.is_floating_point()}
        if not bool(torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all()):  # one host sync
            bad = next(name for name, t in tensors.items() if not bool(torch.isfinite(t).all()))
            raise TrainingDiverged(f"the weights became non-finite {where} ({bad})")

    def evaluate(self, split: str = "test", model: Optional[nn.Module] = None, tta: Optional[bool] = None) -> dict:
        """The split's metrics by the run's model or `model` (TTA: the run's --tta unless given). With several
        processes each evaluates its share with process 0's BatchNorm statistics, and the counts are summed."""
        images, labels, model = *self.splits[split], model or self.model
        tta = self.config.tta if tta is None else tta
        if self.world == 1:
            return evaluate(model, images, labels, self.normalize, self.config.eval_batch_size, self.amp_dtype,
                            tta=tta)
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
        first, last = self._share(len(images))
        keys = ("loss", "top1", "top5") + (("tta_loss", "tta_top1", "tta_top5") if tta else ())
        sums = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        if last > first:
            local = evaluate(model, images[first:last], labels[first:last], self.normalize,
                             self.config.eval_batch_size, self.amp_dtype, tta=tta)
            counts = [round(local[k] * local["n"]) if "top" in k else local[k] * local["n"] for k in keys]
            sums += torch.tensor(counts, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(sums)
        return {"n": len(images), **{k: float(v) / max(len(images), 1) for k, v in zip(keys, sums)}}

    def recalibration_batches(self) -> list:
        """The --bn-recal batches after epoch self.epoch: cropped and flipped training images (no mixing, no
        policy) from a generator of their own (seed + 3 + epoch), leaving training's draws as they were."""
        rng = torch.Generator(self.device).manual_seed(self.config.seed + 3 + self.epoch)
        size = self.config.batch_size * self.world
        order = torch.randperm(self.n_train, generator=rng, device=self.device)[:self.config.bn_recal * size]
        images = random_flip(random_crop(self.splits["train"][0][order], generator=rng), generator=rng)
        return list(images.split(size))

    def recalibrated(self) -> nn.Module:
        """A copy of the model with BatchNorm statistics averaged over the recalibration_batches (momentum None)."""
        model = copy.deepcopy(self.model)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            model.train()
            for images in self.recalibration_batches():
                model(self.normalize(images))
        return model.eval()

    # --- several processes

    def _share(self, n: int) -> tuple[int, int]:
        """[first, last) of this process's share of n images: consecutive, sizes differing by at most one."""
        size, extra = divmod(n, self.world)
        first = self.rank * size + min(self.rank, extra)
        return first, first + size + (self.rank < extra)

    def agree_to_stop(self, asked: bool, wait: bool = False) -> bool:
        """Whether to stop now: alone, when asked. Several processes must stop at the same step though a signal
        reaches each at its own moment: each call sends this process's answer in the background (over the CPU)
        and reads the previous call's, so all stop one step after the first was asked, without waiting on each
        other. wait: decide on this call's answers too (after an epoch)."""
        if self.world == 1:
            return asked
        previous, mine = self._vote, torch.tensor([int(asked)], dtype=torch.int32)
        self._vote = (mine, torch.distributed.all_reduce(mine, group=self.control, async_op=True))
        stop = False
        if previous is not None:
            previous[1].wait()
            stop = bool(previous[0].item())
        if wait or stop:
            self._vote[1].wait()
            stop, self._vote = stop or bool(mine.item()), None
        return stop

    def close(self, timeout: Optional[float] = None) -> None:
        """The run's end: drop DDP (its reducer holds the process group) and forward_loss (a bound method, it kept the
        trainer and its data on the device alive until a garbage collection); with several processes, wait for the
        stop vote in flight, then meet the others unless stopping alone (timeout: a failed write; give up after it)."""
        self.ddp = self.forward_loss = None
        if self._vote is not None:
            try:
                self._vote[1].wait(*([datetime.timedelta(seconds=timeout)] if timeout is not None else []))
            except RuntimeError:
                if timeout is None:
                    raise
                return
            self._vote = None
        if self.control is not None:
            if timeout is None:  # every process is here (the end, or an agreed divergence): none tears down alone
                torch.distributed.barrier(group=self.control)
            torch.distributed.destroy_process_group(self.control)
            self.control = None

    # --- checkpoints: plain dicts of tensors and Python values, loadable with torch.load(weights_only=True)

    def state_dict(self) -> dict:
        return {"format": "cifar100_resnet", "version": __version__, "run_id": self.run_id,
                "config": self.config.saved(), "epoch": self.epoch,
                "partial_epoch": dataclasses.asdict(self.partial) if self.partial is not None else None,
                "best": dict(self.best), "processes": self.world, "history": [dict(row) for row in self.history],
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **({"ema": self.ema.state_dict(), "ema_updates": self.ema_updates} if self.ema is not None else {}),
                "scaler": self.scaler.state_dict(),
                "rng": {"data": self.data_rng.get_state(), "mix": self.mix_rng.get_state(),
                        "data_device": self.device.type}}

    def load_state_dict(self, ckpt: dict, path: str = "the checkpoint") -> None:
        load_weights(self.model, ckpt, path)
        if self.ema is not None:  # a run that had --ema from its start (the setting cannot change on resume)
            load_weights(self.ema, {"model": ckpt["ema"]}, path)
            self.ema_updates = int(ckpt["ema_updates"])
        self.optimizer.load_state_dict(ckpt["optimizer"])  # new momentum tensors: a captured graph is stale
        match_param_layout(self.optimizer)
        self.graph, self.eager_steps = None, 0
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.best = int(ckpt["epoch"]), dict(ckpt["best"])
        self.history = [dict(row) for row in ckpt["history"]]
        self.mix_rng.set_state(ckpt["rng"]["mix"])
        partial, processes = ckpt.get("partial_epoch"), ckpt.get("processes", 1)
        if partial is not None and processes != self.world:
            raise UserError(f"{path} was written inside an epoch by {processes} process(es), whose steps were "
                            f"batches of {processes} x --batch-size: resume it with as many (a checkpoint written "
                            f"between epochs resumes with any number)")
        moved = ckpt["rng"]["data_device"] != self.device.type
        if moved:  # a CPU generator's state cannot seed a CUDA generator: continue on a fresh, seeded stream
            warn(f"this run's data order was drawn on {ckpt['rng']['data_device']}; on {self.device.type} it "
                 f"continues from a fresh stream, so it will not repeat bit for bit")
            self.data_rng.manual_seed(self.config.seed + 1 + 1000003 * self.epoch)
        else:
            self.data_rng.set_state(ckpt["rng"]["data"])
        if partial is not None:
            partial = EpochState(**partial)
            if moved:  # the rest of the stopped epoch in an order of the fresh stream, from the step it stopped at
                partial.data_rng_at_start = self.data_rng.get_state()
            if partial.loss_sum.ndim:  # each process's sum (see train_epoch), and the images of its shares
                partial.loss_sum = partial.loss_sum[self.rank]
                partial.seen = sum(last - first for first, last in (
                    self._share(end - start) for start, end in self.batches[:partial.step]))
            elif self.rank > 0:  # 0.3: the sum of every process, which process 0 carries on
                partial.loss_sum, partial.seen = torch.zeros_like(partial.loss_sum), 0
            partial.loss_sum = partial.loss_sum.to(self.device)
            partial.first_bad_step = partial.first_bad_step.to(self.device)
        self.partial = partial


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded momentum buffer its parameter's memory layout: checkpoints hold contiguous tensors, on
    CUDA the weights are channels_last, and fused SGD refuses buffers whose strides differ from their own."""
    for param, state in optimizer.state.items():
        buffer = state.get("momentum_buffer")
        if buffer is not None and buffer.stride() != param.stride():
            state["momentum_buffer"] = torch.empty_like(param).copy_(buffer)


def check_architecture(ckpt: dict, config: TrainConfig) -> None:
    """Refuse a checkpoint of another model in one line instead of a state_dict key dump."""
    differ = [f"{k} {ckpt['config'].get(k)} (checkpoint) vs {getattr(config, k)}"
              for k in ("arch", "stem", "width", "dataset") if ckpt["config"].get(k) != getattr(config, k)]
    if differ:
        raise UserError(f"the checkpoint holds another architecture: {', '.join(differ)}")


# ----------------------------------------------------------------------------------------------------------
# Run folder: last.pt is the commit point; best.pt, ckpt_ep{N}.pt and metrics.csv are derived from it

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "test_loss", "test_top1", "test_top5", "val_loss", "val_top1",
                  "val_top5", "epoch_seconds", "train_seconds", "images_per_s", "elapsed_seconds",
                  *(f"{split}_{weights}_{k}" for weights in ("tta", "ema", "bnrecal") for split in ("test", "val")
                    for k in ("loss", "top1", "top5"))]  # test_tta_loss, ..., val_bnrecal_top5
TEMP_SUFFIX = ".partial"  # atomic_save's temporary files: .<name>.<pid>.<thread>.partial
_WEIGHT_KEYS = ("format", "version", "run_id", "config", "epoch", "best", "model", "ema")  # what best.pt keeps


def _serialize(obj, f) -> None:
    if isinstance(obj, (str, bytes)):
        f.write(obj.encode() if isinstance(obj, str) else obj)
    else:
        torch.save(obj, f)


def atomic_save(obj, path: str) -> None:
    """Write `obj` (str, bytes, or anything torch.save takes) to a temporary file beside `path`, fsync, rename it
    over `path`, fsync the folder: `path` holds its old content or the whole new one. An OSError (a full disk)
    becomes WriteFailed, the temporary file removed."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:  # honours the umask, unlike mkstemp's 0600
            _serialize(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with suppress(OSError):  # make the rename durable (POSIX; Windows cannot open a folder)
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException as e:
        with suppress(OSError):
            os.remove(tmp)
        # torch.save reports a failed write (a full disk) as a RuntimeError raised while handling the OSError
        cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e, RuntimeError) else None
        if isinstance(cause, OSError):
            raise WriteFailed(f"could not write {path}: {cause.strerror or cause}") from None
        raise


def tensor_checksum(state) -> str:
    """The CRC-32 of every tensor's bytes in a (nested) state, in order: a checkpoint's "checksum"."""
    crc = 0
    if isinstance(state, torch.Tensor):
        return f"{zlib.crc32(state.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()):08x}"
    for value in state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ():
        if isinstance(value, (torch.Tensor, dict, list, tuple)):
            crc = zlib.crc32(tensor_checksum(value).encode(), crc)
    return f"{crc:08x}"


def _with_checksum(state: dict) -> dict:
    state = {k: v for k, v in state.items() if k != "checksum"}
    return {**state, "checksum": tensor_checksum(state)}


def load_checkpoint(path: str, full: bool = True) -> dict:
    """Load a checkpoint of this module and check its keys (full: all a resume needs; else the weights') and the
    checksum of its tensors. torch.load runs with weights_only: a crafted file cannot run code."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about pickles it did not write (a bare pickle's protocol)
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None
    except Exception as e:  # torch's words (an EOFError; advice to pass weights_only=False) would not help the user
        if "unsupported global" in str(e).lower() or "unsupported class" in str(e).lower():  # (the latter: torch 2.3)
            raise UserError(f"{path} is refused: it holds Python objects other than tensors and plain values, "
                            f"which a checkpoint of this module never does (loading them could run code)") from None
        raise UserError(f"{path} is not a readable checkpoint (not a file written by torch.save, or one cut "
                        f"short)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "cifar100_resnet":
        raise UserError(f"{path} is not a cifar100_resnet checkpoint")
    needed = {"config": dict, "epoch": int, "best": dict, "model": dict}
    if full:
        needed.update(optimizer=dict, rng=dict, partial_epoch=(dict, type(None)), history=list)
    missing = [k for k, kind in needed.items() if not isinstance(ckpt.get(k, ...), kind)]
    if not missing and not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        missing = ["the tensors of 'model'"]
    if missing:
        raise UserError(f"{path} is not a complete cifar100_resnet checkpoint: {', '.join(missing)} missing or "
                        f"malformed")
    if full and not {"data", "mix", "data_device"} <= set(ckpt["rng"]):
        raise UserError(f"{path} is not a complete cifar100_resnet checkpoint: 'rng' lacks its generator states")
    checksum = ckpt.pop("checksum", None)  # (0.3's checkpoints have none)
    if checksum is not None and checksum != tensor_checksum(ckpt):
        raise UserError(f"{path} is damaged: its tensors do not match the checksum written with them (a changed "
                        f"byte); nothing is read from it")
    return ckpt


def load_weights(model: nn.Module, ckpt: dict, path: str) -> None:
    """model.load_state_dict(ckpt["model"]), with one line naming the first difference instead of a dump."""
    ours, theirs = model.state_dict(), ckpt["model"]
    for name in sorted(set(ours) | set(theirs)):
        if name not in theirs or name not in ours:
            where = "missing from" if name not in theirs else "unexpected in"
            raise UserError(f"the weights in {path} do not fit the model of its settings: {name} {where} the "
                            f"checkpoint")
        if ours[name].shape != theirs[name].shape:
            raise UserError(f"the weights in {path} do not fit the model of its settings: {name} has shape "
                            f"{tuple(theirs[name].shape)}, the model built from it {tuple(ours[name].shape)}")
    model.load_state_dict(theirs)


def csv_text(rows: list, columns: list) -> str:
    """A CSV file's text: a header of `columns`, one line per row dict (other keys left out, floats to 8 digits)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _derived_files(state: dict) -> list:
    """[(name, content)] of the files derived from last.pt's state: best.pt when the epoch is the best so far,
    ckpt_ep{N}.pt when due, metrics.csv."""
    files = []
    if state["partial_epoch"] is None and state["epoch"] > 0:
        if state["best"]["epoch"] == state["epoch"]:
            files.append(("best.pt", _with_checksum({k: state[k] for k in _WEIGHT_KEYS if k in state})))
        every = state["config"]["checkpoint_every"]
        if every and state["epoch"] % every == 0:
            files.append((f"ckpt_ep{state['epoch']}.pt", state))
    files.append(("metrics.csv", csv_text(state["history"], METRIC_COLUMNS)))
    return files


def _position(ckpt: dict) -> tuple:
    """(epochs done, steps done in the next) of a checkpoint."""
    return ckpt["epoch"], (ckpt["partial_epoch"] or {}).get("step", 0)


class RunFolder:
    """The files of one run. last.pt is the commit point: every other file derives from it (best.pt and
    ckpt_ep{N}.pt are parts or copies, metrics.csv its history) and is written after it, each write atomic. So
    after a kill or a full disk, last.pt is whole and repair() rebuilds the rest. open() locks the folder."""

    def __init__(self, path: str):
        self.path = path
        self.committed: Optional[tuple] = None  # (epoch, step inside the next epoch) of the last last.pt written
        self._lock_fd: Optional[int] = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def holds_run(self) -> bool:
        return any(os.path.exists(self.file(f)) for f in ("config.json", "last.pt"))  # either: a run

    def saved_config(self) -> Optional[dict]:
        path = self.file("config.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not readable JSON ({type(e).__name__})") from None
        if not isinstance(saved, dict):
            raise UserError(f"{path} does not hold a run's settings")
        return saved

    def check_writable(self) -> None:
        """Refuse a folder that cannot be created or written, before anything is created."""
        path = os.path.abspath(self.path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"--out-dir {self.path} is a file, not a folder")
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to --out-dir {self.path}: {parent} is not a writable folder")

    def open(self) -> None:
        """Create the folder, lock it, and remove temporary files that a killed process left in it."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out-dir {self.path}: {e.strerror or e}") from None
        if os.name == "posix":  # (Windows: no lock)
            import fcntl
            fd = os.open(self.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise UserError(f"another process is writing to --out-dir {self.path}") from None
            self._lock_fd = fd
        for name in os.listdir(self.path):
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                os.remove(self.file(name))

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def write_config(self, record: dict) -> None:
        atomic_save(json.dumps(record, indent=2) + "\n", self.file("config.json"))

    def commit(self, state: dict) -> None:
        """last.pt, then the files derived from it."""
        state = _with_checksum(state)
        atomic_save(state, self.file("last.pt"))
        self.committed = _position(state)
        for name, content in _derived_files(state):
            atomic_save(content, self.file(name))

    def repair(self, state: dict) -> list:
        """Write the derived files of `state` (last.pt's content) that are missing or stale; returns their names."""
        self.committed = _position(state)
        written = []
        for name, content in _derived_files(_with_checksum(state)):
            path = self.file(name)
            if os.path.exists(path):
                if name == "metrics.csv":
                    with open(path, newline="") as f:
                        if f.read() == content:
                            continue
                elif torch.load(path, map_location="cpu", weights_only=True).get("epoch") == state["epoch"]:
                    continue
            atomic_save(content, path)
            written.append(name)
        return written

    def on_disk(self) -> str:
        """What a resume would continue from, in words."""
        if self.committed is None:
            return f"no checkpoint was written to {self.path}"
        epoch, step = self.committed
        return f"{self.file('last.pt')} holds epoch {epoch}" + (f" and {step} steps of the next" if step else "")


class CheckpointWriter:
    """Commits the run's state on a background thread while the next epoch trains (last.pt of ResNet-34 is
    170 MB); wait() re-raises a failed write, `failed` says so at once. snapshot() copies CUDA tensors into
    page-locked buffers kept between checkpoints, queued on the current stream without waiting (so they run
    before the next epoch's updates); the writer thread waits for them to land. No host sync, no pageable copy."""

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._pending: Optional[concurrent.futures.Future] = None  # the write in flight, or the last one
        self._pinned: dict = {}  # key path in the state dict -> its page-locked CPU buffer
        self._copies_done: Optional[torch.cuda.Event] = None
        self._cuda_device: Optional[torch.device] = None

    @property
    def failed(self) -> bool:
        return self._pending is not None and self._pending.done() and self._pending.exception() is not None

    def snapshot(self, state):
        """A CPU copy of a (nested) state dict that training cannot change. It shares buffers with the next
        snapshot, so submit it (or drop it) before taking another."""
        self.wait()  # the buffers still hold the previous checkpoint until its write has ended
        self._cuda_device = None
        copy = self._copy(state, ())
        if self._cuda_device is not None:
            self._copies_done = torch.cuda.Event()
            self._copies_done.record(torch.cuda.current_stream(self._cuda_device))
        return copy

    def cpu_state(self, state):
        """A snapshot that has landed: for writes on the calling thread."""
        copy = self.snapshot(state)
        if self._copies_done is not None:
            self._copies_done.synchronize()
        return copy

    def _copy(self, obj, key: tuple):
        if isinstance(obj, torch.Tensor):
            if not obj.is_cuda:
                return obj.detach().to("cpu", copy=True)
            buffer = self._pinned.get(key)
            if buffer is None or (buffer.shape, buffer.dtype) != (obj.shape, obj.dtype):
                buffer = self._pinned[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
            # contiguous on both sides: an asynchronous copy into a non-contiguous (e.g. channels_last) CPU
            # tensor would go through a pageable temporary that is read before the copy lands
            buffer.copy_(obj.detach().contiguous(), non_blocking=True)
            self._cuda_device = obj.device
            return buffer
        if isinstance(obj, dict):
            return {k: self._copy(v, key + (k,)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v, key + (i,)) for i, v in enumerate(obj))
        return obj

    def submit(self, write: Callable[[], None]) -> None:
        """Run write() on the writer thread, after the copies of the last snapshot have landed."""
        self.wait()
        copies_done, self._copies_done = self._copies_done, None

        def run():
            if copies_done is not None:
                copies_done.synchronize()
            write()

        self._pending = self._pool.submit(run)

    def wait(self) -> None:
        """Wait for the write in flight; raise its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the write in flight, whatever its outcome, and end the thread."""
        self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------------------
# The training run


@dataclass
class TrainResult:
    model: nn.Module
    history: list  # one dict per epoch trained in this call (the columns of metrics.csv)
    out_dir: Optional[str]
    interrupted: bool = False  # stopped by should_stop(); last.pt holds the position to resume from


@dataclass
class ResumePoint:
    """Where a run continues from: a checkpoint and its path (None: stopped before its first checkpoint, it
    starts again from config.json), its run, settings, and the folder it continues in by default."""
    ckpt: Optional[dict]
    path: Optional[str]
    identity: Optional[str]  # the run's id
    settings: dict
    folder: str


def find_resume(resume: str, out_dir: Optional[str] = None) -> ResumePoint:
    """What `resume` names: a checkpoint, a run folder (its last.pt, else its config.json), or (empty) out_dir."""
    if resume and not os.path.isdir(resume):
        ckpt = load_checkpoint(resume)
        folder = os.path.dirname(os.path.abspath(resume))
        return ResumePoint(ckpt, resume, ckpt.get("run_id"), ckpt["config"], folder)
    source = resume or out_dir
    if not source:
        raise UserError("--resume without a PATH continues the run in --out-dir: pass --out-dir")
    run = RunFolder(source)
    if os.path.exists(run.file("last.pt")):
        return dataclasses.replace(find_resume(run.file("last.pt")), folder=source)
    saved = run.saved_config()
    if saved is None:
        raise UserError(f"{source} holds no run to resume (no last.pt or config.json)")
    if out_dir and os.path.realpath(out_dir) != os.path.realpath(source):
        raise UserError(f"{source} holds a run stopped before its first checkpoint: nothing to branch from")
    return ResumePoint(None, None, saved.get("run_id"), saved, source)


def _check_target(folder: RunFolder, point: Optional[ResumePoint]) -> bool:
    """Refuse a folder that holds another run or a later part of this one, or cannot be written. True: the
    checkpoint branches off into a folder of its own (a new run)."""
    branched = False
    if not folder.holds_run():
        branched = point is not None and point.ckpt is not None and \
            os.path.realpath(os.path.dirname(os.path.abspath(point.path))) != os.path.realpath(folder.path)
    elif point is None:
        raise UserError(f"--out-dir {folder.path} holds another run; pass --resume to continue it (a run stopped "
                        f"before its first checkpoint starts again with its saved settings), or choose another "
                        f"--out-dir")
    elif (folder.saved_config() or {}).get("run_id") != point.identity:  # which run the folder holds
        raise UserError(f"--out-dir {folder.path} holds another run; a run folder is only continued by its own "
                        f"run: pass an empty --out-dir to branch off {point.path}")
    elif point.ckpt is not None and os.path.exists(folder.file("last.pt")) and \
            os.path.realpath(folder.file("last.pt")) != os.path.realpath(point.path):
        later = load_checkpoint(folder.file("last.pt"))
        if _position(later) > _position(point.ckpt):
            raise UserError(f"{folder.path} already holds epochs up to {later['epoch']}; resuming from epoch "
                            f"{point.ckpt['epoch']} there would overwrite them: pass another --out-dir to branch off")
    folder.check_writable()
    return branched


def train(config: TrainConfig, data: Optional[CifarData] = None, log: Callable[[str], None] = print,
          resume=None, should_stop: Callable[[], bool] = lambda: False,
          progress: Optional[Callable[[str], None]] = None,
          on_epoch: Optional[Callable[[dict], None]] = None,
          on_create: Callable[[], None] = lambda: None) -> TrainResult:
    """Train per `config`, writing the run folder config.out_dir if set; nothing is created before the
    settings, the checkpoint and the data are read and checked (then on_create() is called).

    resume: a checkpoint (continued into config.out_dir: its own folder, or an empty one to branch off), a run
    folder, or a ResumePoint of find_resume(). should_stop() is polled after every step: True writes last.pt
    at that exact position and the result says interrupted. progress: the step lines (default: log);
    on_epoch(row): each epoch's metrics row, while its last.pt is being written.
    """
    env = resolve(config)
    board = _tensorboard_writer() if config.tensorboard and env.rank == 0 else None  # before anything is created
    if config.quiet or env.rank > 0:  # with several processes, process 0 speaks and writes for all
        log = progress = lambda message: None  # noqa: E731
    point = None
    if resume:
        point = resume if isinstance(resume, ResumePoint) else find_resume(resume, config.out_dir)
        if point.ckpt is not None:
            check_architecture(point.ckpt, config)
    folder = RunFolder(config.out_dir) if config.out_dir and env.rank == 0 else None
    branched = folder is not None and _check_target(folder, point)
    data = data or load_dataset(config.data_dir, config.dataset, config.download)
    trainer = Trainer(config, data, log, env, progress)
    if point and point.ckpt is not None:
        trainer.load_state_dict(point.ckpt, point.path)
    trainer.run_id = point.identity if point and point.identity and not branched else uuid.uuid4().hex[:12]
    if trainer.epoch == 0 and (warning := schedule_end_warning(config, trainer.t0)):
        warn(warning)

    on_create()
    writer = CheckpointWriter()
    try:
        if folder:
            _prepare(folder, trainer, writer, point, branched, log)
        result = _train_epochs(trainer, folder, writer, log, should_stop, board, on_epoch)
        writer.wait()  # every checkpoint is on disk before train() returns
        trainer.close()
        return result
    except TrainingDiverged as e:
        trainer.close()  # every process diverged at the same step: its check was agreed by all
        with suppress(WriteFailed):
            writer.wait()
        on_disk = folder.on_disk() if folder else "nothing was written (no out_dir)"
        raise TrainingDiverged(f"{e}; stopped, no checkpoint holds the non-finite values: {on_disk}") from None
    except (WriteFailed, RuntimeError) as e:  # process 0's write failed, or another process was lost (gloo, NCCL):
        trainer.close(timeout=60)  # a stop vote left in flight would abort this process as it exits (SIGABRT)
        if not isinstance(e, WriteFailed) or folder is None:
            raise
        again = f"resume with --resume --out-dir {folder.path}" if folder.holds_run() else "run the same command again"
        raise WriteFailed(f"{e}; {folder.on_disk()}: free some space, then {again}") from None
    finally:
        writer.close()
        if folder:
            folder.close()


def _prepare(folder: RunFolder, trainer: Trainer, writer: CheckpointWriter, point: Optional[ResumePoint],
             branched: bool, log: Callable[[str], None]) -> None:
    """Open the run folder, write config.json (a new run, or an extension by --resume --epochs N), and rebuild
    from last.pt what a stopped process left unwritten."""
    config = trainer.config
    folder.open()
    saved = folder.saved_config()
    if saved is None:
        record = {**config.saved(), "run_id": trainer.run_id, **trainer.env.record(),
                  "train_images": trainer.n_train, "steps_per_epoch": trainer.steps_per_epoch}
        if branched:
            record["branched_from"] = {"checkpoint": os.path.abspath(point.path), "epoch": point.ckpt["epoch"],
                                       "run_id": point.ckpt.get("run_id")}
        folder.write_config(record)
    elif saved.get("epochs") != config.epochs:  # extended by --resume --epochs N: record the new plan
        folder.write_config({**saved, **config.saved()})
        log(f"extending the run from {saved.get('epochs')} to {config.epochs} epochs: the added epochs get a "
            f"cosine cycle of their own, from lr {config.lr} down to {config.min_lr}")
    if point and point.ckpt is not None:
        repaired = folder.repair(writer.cpu_state(trainer.state_dict()))
        if repaired and not branched:
            log(f"repaired {', '.join(repaired)} from last.pt (a previous process stopped while writing)")


def _tensorboard_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install "cifar100_resnet[tensorboard]" '
                        '(or pip install tensorboard; a resumed run: --no-tensorboard)') from None
    return SummaryWriter


def _board_epoch(board, row: dict, trainer: Trainer) -> None:
    """--tensorboard: a metrics row ("test/top1" for test_top1), and the rate of each of its steps ("lr/step")."""
    epoch, steps = row["epoch"], trainer.steps_per_epoch
    for key, value in row.items():
        if key != "epoch" and isinstance(value, float):
            board.add_scalar("/".join(key.split("_", 1)) if "_" in key else f"{key}/epoch_start", value, epoch)
    for step in range(steps):
        rate = learning_rate(epoch - 1 + step / steps, trainer.config, trainer.t0)
        board.add_scalar("lr/step", rate, (epoch - 1) * steps + step)
    board.flush()


def _train_epochs(trainer: Trainer, folder: Optional[RunFolder], writer: CheckpointWriter,
                  log: Callable[[str], None], should_stop: Callable[[], bool], board_class=None,
                  on_epoch=None) -> TrainResult:
    config = trainer.config
    if trainer.epoch >= config.epochs:
        log(f"the run in {folder.path if folder else 'the checkpoint'} is complete: {trainer.epoch} of "
            f"{config.epochs} epochs; nothing to train")
        return TrainResult(trainer.model, [], config.out_dir)
    log(f"training {config.arch} ({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters, "
        f"{config.stem} stem) on {trainer.n_train} {config.dataset} images, device {trainer.device}, "
        f"amp {trainer.amp_dtype or 'off'}, cuda graphs {'on' if trainer.use_graphs else 'off'}"
        f"{', compiled' if trainer.use_compile else ''}, batch {config.batch_size}"
        + (f" per process x {trainer.world} processes = {config.batch_size * trainer.world}" if trainer.world > 1
           else "") + f", lr {config.lr}, "
        f"{trainer.steps_per_epoch} steps per epoch, epochs {trainer.epoch + 1}..{config.epochs}"
        + (f", run folder {folder.path}" if folder else ""))
    board = board_class(folder.file("tensorboard") if folder else "tensorboard") if board_class else None
    first, run_started = len(trainer.history), time.perf_counter()  # this call's rows: trainer.history[first:]
    elapsed_before = trainer.history[-1]["elapsed_seconds"] if trainer.history else 0.0
    stop = lambda: should_stop() or writer.failed  # noqa: E731  (a failed write stops within one step)
    try:
        while trainer.epoch < config.epochs:
            stats = trainer.train_epoch(stop)
            if stats is None:
                writer.wait()  # raises the failed write, if that is why it stopped
                trainer.check_weights_finite(f"inside epoch {trainer.epoch + 1}")
                if folder:
                    folder.commit(writer.cpu_state(trainer.state_dict()))
                log(f"stopped inside epoch {trainer.epoch + 1} after step {trainer.partial.step}"
                    + (f"; last.pt written, continue with --resume --out-dir {folder.path}" if folder else ""))
                return TrainResult(trainer.model, trainer.history[first:], config.out_dir, interrupted=True)
            row, evaluation_started = {"epoch": trainer.epoch, **stats}, time.perf_counter()
            models = {"": trainer.model, "ema_": trainer.ema} if config.ema else {"": trainer.model}
            if config.bn_recal:
                models["bnrecal_"] = trainer.recalibrated()
            for prefix, model in models.items():
                for split in ("test", "val") if config.val_split else ("test",):  # flip TTA: raw weights only
                    metrics = trainer.evaluate(split, model, tta=config.tta and not prefix)
                    row.update({f"{split}_{prefix}{k}": v for k, v in metrics.items() if k != "n"})  # test_tta_top1
            trainer.check_weights_finite(f"in epoch {trainer.epoch}")
            if not all(math.isfinite(row[f"{split}_loss"]) for split in ("test", "val") if f"{split}_loss" in row):
                raise TrainingDiverged(f"the test loss became non-finite in epoch {trainer.epoch}")
            # train_seconds covers the whole epoch's training, also the part before a resume
            row["epoch_seconds"] = stats["train_seconds"] + time.perf_counter() - evaluation_started
            row["elapsed_seconds"] = elapsed_before + time.perf_counter() - run_started
            trainer.history.append(row)

            if row[trainer.best["metric"]] > trainer.best["value"]:
                trainer.best.update(value=row[trainer.best["metric"]], epoch=trainer.epoch)
            if folder:
                state = writer.snapshot(trainer.state_dict())  # waits for (and raises) the previous write
                writer.submit(lambda: folder.commit(state))
            if board:
                _board_epoch(board, row, trainer)
            if on_epoch:
                on_epoch(row)
            per_epoch = (row["elapsed_seconds"] - elapsed_before) / (len(trainer.history) - first)
            eta = (config.epochs - trainer.epoch) * per_epoch
            also = "".join(f" {column.removeprefix('test_')} {row[column]:.2%}" for column in (
                "test_tta_top1", "test_ema_top1", "test_bnrecal_top1", "val_top1") if column in row)
            log(f"epoch {trainer.epoch}/{config.epochs} lr {row['lr']:.4f} train_loss {row['train_loss']:.4f} "
                f"test_loss {row['test_loss']:.4f} top1 {row['test_top1']:.2%} top5 {row['test_top5']:.2%}{also} "
                f"{row['epoch_seconds']:.1f}s {row['images_per_s']:.0f} img/s (epoch mean) ETA {format_duration(eta)}")
            if trainer.epoch < config.epochs and trainer.agree_to_stop(should_stop(), wait=True):
                log(f"stopped after epoch {trainer.epoch}" + (f"; continue with --resume --out-dir {folder.path}"
                                                              if folder else ""))
                return TrainResult(trainer.model, trainer.history[first:], config.out_dir, interrupted=True)
        return TrainResult(trainer.model, trainer.history[first:], config.out_dir)
    finally:
        if board:
            board.close()


# ----------------------------------------------------------------------------------------------------------
# Evaluating a saved checkpoint


@dataclass
class LoadedRun:
    """A checkpoint's model, ready to evaluate as its run did, with its settings, precision, data and splits."""
    path: str
    ckpt: dict
    config: TrainConfig
    model: nn.Module
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    normalize: Normalizer
    data: CifarData
    splits: dict

    @property
    def chosen_on_test(self) -> bool:  # best.pt of a run without --val-split: its test numbers are optimistic
        return "optimizer" not in self.ckpt and self.ckpt["best"].get("metric") == "test_top1"


def load_run(path: str, data: Optional[CifarData] = None, data_dir: Optional[str] = None, device: str = "auto",
             limit_test: Optional[int] = None, download: bool = True, ema: bool = False) -> LoadedRun:
    """Load a checkpoint (or a run folder's last.pt), its model in eval mode on `device` (ema: the --ema average)."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    ckpt = load_checkpoint(path, full=False)
    if ema and not isinstance(ckpt.get("ema"), dict):
        raise UserError(f"{path} holds no averaged weights: its run was trained without --ema")
    # no training step here to capture, and fp16 autocast only on CUDA: a T4's fp16 run evaluates on a CPU in float32
    config = TrainConfig.from_dict({**ckpt["config"], "device": device, "cuda_graphs": "off"})
    if config.amp == "fp16" and resolve_device(device).type != "cuda":
        config.amp = "off"
    if limit_test is not None:
        config.limit_test = limit_test
    env = resolve(config)
    dev = env.device
    data = data or load_dataset(data_dir or config.data_dir, config.dataset, download)
    model = build_model(config)
    load_weights(model, {"model": ckpt["ema"]} if ema else ckpt, path)
    model = model.to(dev, memory_format=torch.channels_last if dev.type == "cuda" else torch.preserve_format).eval()
    normalize = Normalizer(data.info.mean, data.info.std, dev, channels_last=dev.type == "cuda")
    return LoadedRun(path, ckpt, config, model, dev, env.amp_dtype, normalize, data, split_data(data, config))


def evaluate_checkpoint(path: str, data: Optional[CifarData] = None, data_dir: Optional[str] = None,
                        device: str = "auto", tta: bool = False, limit_test: Optional[int] = None,
                        batch_size: Optional[int] = None, download: bool = True, ema: bool = False) -> dict:
    """Test (and val) metrics of a checkpoint or run folder's weights (ema: its --ema average), measured as the
    run measured them: its images, precision and batches unless limit_test or batch_size say otherwise."""
    run = load_run(path, data, data_dir, device, limit_test, download, ema)
    result = {"checkpoint": run.path, "epoch": run.ckpt["epoch"], "weights": "ema" if ema else "raw",
              "partial_epoch": run.ckpt.get("partial_epoch") is not None, "chosen_on_test": run.chosen_on_test}
    for split in ("test", "val") if run.config.val_split else ("test",):
        images, labels = run.splits[split]
        result[split] = evaluate(run.model, images.to(run.device), labels.to(run.device), run.normalize,
                                 batch_size or run.config.eval_batch_size, run.amp_dtype, tta=tta)
    return result


# ----------------------------------------------------------------------------------------------------------
# Command line: train and eval here; the lab's commands (cifar100_lab.py) through the same main()

LAB_COMMANDS = ("lr-find", "sweep", "plot", "report", "preview-aug", "conv-demo", "bench")
_COMMANDS_HELP = """\
Train a ResNet on CIFAR-100 with the notebook's recipe: the defaults are its values.

commands (each with its own --help):
  train [flags]             train (the default command), or continue a run with --resume
  eval CHECKPOINT|RUN_DIR   test top-1, top-5 and loss of saved weights (--tta: with flips)
the lab's (cifar100_lab.py, beside this file):
  lr-find [flags]           the learning-rate range test
  sweep [flags] --grid ...  train many runs (grid, random or Optuna) and choose on validation images
  plot RUN_DIR...           learning curves of runs or sweeps; --schedule: the learning rate of a run
  report CHECKPOINT         what saved weights get right and wrong, and why (report.html)
  preview-aug [flags]       what the network sees: crops, flips, the advanced policy, MixUp and CutMix
  conv-demo                 what a convolution does: kernel size, padding and stride
  bench [flags]             time the training step and evaluation on this device

Under torchrun, training is data-parallel (--batch-size is per process). The train flags:"""
# Named recipes for --preset: settings that replace the defaults (flags given beside --preset still win).
PRESETS = {
    # the plain short-budget recipe: 74.29 % top-1 (last epoch) in 30 epochs on one H100 (README, Accuracy)
    "plain30": dict(epochs=30, batch_size=512, lr=0.4, nesterov=True, weight_decay=5e-4, decay_norm_and_bias=False,
                    warmup_epochs=2.0, mixup=False, cutmix=False),
}


def _program() -> str:
    """How the program was started, for its usage lines (cifar100_resnet.py also when called from Python)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # python -m NAME: NAME's (sys.orig_argv: 3.10+)
    if spec is not None and spec.name in ("cifar100_resnet", "cifar100_lab"):
        return f"python -m {spec.name}"
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return name if name in ("cifar100-resnet", "cifar100_lab.py") else "cifar100_resnet.py"


def _typed(setting: str, value) -> list:
    """The words that set `setting` to `value` on the command line (a switch: its flag, or none at its default)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == setting)
    if isinstance(field.default, bool):
        return [_flag_of(field)] if value != field.default else []
    return [_flag_of(field), "auto" if value is None else f"{value:g}" if isinstance(value, float) else str(value)]


def _preset_flags(name: str) -> list:
    """The flags a preset stands for, as they would be typed."""
    return [word for setting, value in PRESETS[name].items() for word in _typed(setting, value)]


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations (a later flag never changes an old command), its errors one UserError line
    with the closest flag for a misspelt one. --preset NAME stands for its flags typed first."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "preset", None):
            parsed = super().parse_args(_preset_flags(parsed.preset) + list(args), namespace)
        return parsed

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            flags = [option for action in self._actions for option in action.option_strings]
            words = []
            for word in message.split(": ", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1) if word.startswith("-") else []
                words.append(f"{word} (did you mean {close[0]}?)" if close else word)
            message = "unrecognized arguments: " + " ".join(words)
        raise UserError(f"{message}; see {self.prog} --help")


def _t0_arg(text: str) -> Optional[float]:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of epochs or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The train command's flags, made from TrainConfig's declarations."""
    p = _Parser(prog=_program(), allow_abbrev=False, usage="%(prog)s [COMMAND] [flags]",
                formatter_class=argparse.RawDescriptionHelpFormatter, description=_COMMANDS_HELP)
    groups = {key: p.add_argument_group(title) for key, title in (
        ("recipe", "recipe"), ("schedule", "schedule (cosine annealing with warm restarts, set every step)"),
        ("model", "model"), ("data", "data"), ("running", "running"), ("output", "output"))}
    for f in dataclasses.fields(TrainConfig):
        m, flag = f.metadata, _flag_of(f)
        if m["library_only"]:
            continue
        if isinstance(f.default, bool):  # a switch: --name turns an off setting on, --no-name an on one off
            groups[m["group"]].add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                                            default=f.default, help=f"{m['help']} (default: {m['shown'] or 'off'})")
            if m["resumable"] and not (f.default or m["display"]):  # a resumed run may switch it off again
                groups[m["group"]].add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                                                default=f.default, help=argparse.SUPPRESS)
            continue
        kwargs = {"type": _t0_arg if f.name == "t0" else type(f.default) if f.default is not None else str,
                  "default": f.default, "help": f"{m['help']} (default: {m['shown'] or f.default})", **m["argparse"]}
        groups[m["group"]].add_argument(flag, dest=f.name, **kwargs, **({"choices": list(m["choices"])}
                                                                        if m["choices"] else {}))
    groups["recipe"].add_argument("--preset", choices=list(PRESETS), default=None,
                                  help="a named recipe, as if its flags were given (flags given beside it win): "
                                       + "; ".join(f"{name} = {' '.join(_preset_flags(name))}" for name in PRESETS))
    groups["output"].add_argument("--resume", nargs="?", const="", metavar="PATH", type=os.path.expanduser,
                                  help="continue a run: --out-dir's, or the run folder or checkpoint PATH "
                                       "(--no-tta and --no-tensorboard switch those off for the rest of it)")
    return p


def command_parser(command: str, description: str, train_flags: bool = False) -> argparse.ArgumentParser:
    """The parser of `PROGRAM command`, with one-line errors (and with train_flags, every train flag)."""
    parser = build_parser() if train_flags else _Parser(allow_abbrev=False)
    parser.prog, parser.description = f"{_program()} {command}", description
    parser.usage, parser.formatter_class = None, argparse.HelpFormatter
    return parser


def add_data_flags(p: argparse.ArgumentParser, data_dir_help: str) -> None:
    """--data-dir, --no-download and --device, for the commands that read a checkpoint (eval, report, ...)."""
    p.add_argument("--data-dir", help=data_dir_help, type=os.path.expanduser)
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="never download (default: download when missing)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The settings of parsed train flags; an invalid value that a preset set names the preset."""
    config = TrainConfig.from_dict(vars(args))
    if getattr(args, "preset", None):
        try:
            config.validate()
        except UserError as e:
            raise UserError(f"{e} (--preset {args.preset} sets {' '.join(_preset_flags(args.preset))})") from None
    return config


def _resume_config(args: argparse.Namespace, argv: list) -> tuple[TrainConfig, ResumePoint]:
    """The saved settings with the flags a resume may change (refusing others), and the point it resumes from."""
    if args.preset:  # its epochs, say, would extend the run
        raise UserError("--preset chooses a new run's settings; a resumed run keeps its own (drop --preset)")
    point = find_resume(args.resume, args.out_dir)
    run = TrainConfig.from_dict(point.settings)  # a setting its file does not name: the default
    try:
        run._check_types()
    except UserError as e:
        raise UserError(f"{point.path or point.folder} holds settings this module cannot use: {e}") from None
    not_given = object()  # the settings the user typed are those not left at this default
    probe = build_parser()
    probe.set_defaults(**{f.name: not_given for f in dataclasses.fields(TrainConfig)})
    given = {k: v for k, v in vars(probe.parse_args(argv)).items() if v is not not_given and hasattr(run, k)}
    extend = given.get("epochs", run.epochs) != run.epochs
    if extend and given["epochs"] < run.epochs:
        raise UserError(f"--epochs {given['epochs']}: a resumed run can only be extended, and this one has --epochs "
                        f"{run.epochs}")
    changed = [k for k, v in given.items() if k not in RESUMABLE_OVERRIDES | {"epochs"} and v != getattr(run, k)]
    if changed:
        flags = ", ".join(" ".join(_typed(k, given[k])) + (f" (the run has {_typed(k, getattr(run, k))[1]})" if not
                          isinstance(given[k], bool) else " (the run was started without it)") for k in changed)
        raise UserError(f"a resumed run keeps its settings (only --epochs may grow); these differ: {flags}")
    values = run.saved()
    values.update({k: v for k, v in given.items() if k in RESUMABLE_OVERRIDES})
    if extend:  # the added epochs get a cosine cycle of their own (see learning_rate)
        values.update(epochs=given["epochs"], extended_from=[*run.extended_from, run.epochs])
    values["out_dir"] = args.out_dir or point.folder
    return TrainConfig.from_dict(values), point


def _train_command(argv: list) -> int:
    """`[train] [flags]`: train, or continue a run with --resume."""
    args = build_parser().parse_args(argv)
    if args.resume is not None:
        config, resume = _resume_config(args, argv)
    else:
        config, resume = config_from_args(args), None
        if config.out_dir is None:  # runs started in the same second (a shell loop) get -2, -3, ...
            stamp = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
            config.out_dir, n = stamp, 1
            while os.path.exists(config.out_dir):
                n += 1
                config.out_dir = f"{stamp}-{n}"
    set_backend_flags()
    joined = join_torchrun(config.device)
    try:
        console = Console(sys.stdout)
        with StopSignals(quiet=_speaker() is None, at_once=True) as stop:
            result = train(config, resume=resume, should_stop=stop.requested, log=console.log,
                           progress=console.progress, on_create=stop.defer)
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    return stop.exit_code if result.interrupted else 0


def _eval_command(argv: list) -> int:
    """`eval CHECKPOINT|RUN_DIR [--tta]`: test top-1/top-5 and loss of saved weights."""
    p = command_parser("eval", "test top-1/top-5 and loss of saved weights")
    p.add_argument("checkpoint", type=os.path.expanduser,
                   help="a checkpoint (best.pt, last.pt, ckpt_ep{N}.pt) or a run folder (its last.pt)")
    add_data_flags(p, "folder holding cifar-100-python/ (default: the run's --data-dir)")
    p.add_argument("--tta", action="store_true", help="also with flip test-time augmentation (default: off)")
    p.add_argument("--ema", action="store_true", help="the run's --ema average instead of its weights (default: off)")
    p.add_argument("--limit-test", type=int, help="the first N test images (0: all; default: as the run did)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the run's --eval-batch-size)")
    args = p.parse_args(argv)
    if (args.batch_size is not None and args.batch_size < 1) or (args.limit_test is not None and args.limit_test < 0):
        raise UserError("--batch-size must be at least 1 and --limit-test at least 0")
    r = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device=args.device, tta=args.tta,
                            limit_test=args.limit_test, batch_size=args.batch_size, download=args.download,
                            ema=args.ema)
    where = f"epoch {r['epoch']}" + (" (stopped inside the next epoch)" if r["partial_epoch"] else "") \
        + (", EMA weights" if args.ema else "")
    for split, m in ((split, r[split]) for split in ("test", "val") if split in r):
        print(f"{r['checkpoint']}, {where}, {split} ({m['n']} images): top-1 {m['top1']:.2%} top-5 {m['top5']:.2%} "
              f"loss {m['loss']:.4f}" + (f"; with flip TTA: top-1 {m['tta_top1']:.2%} top-5 {m['tta_top5']:.2%} "
                                        f"loss {m['tta_loss']:.4f}" if args.tta else ""))
    if r["chosen_on_test"]:
        print(f"note: {r['checkpoint']} is the epoch of the best test top-1 (the run had no --val-split), so its test "
              f"numbers are optimistic; quote the last epoch's, or train with --val-split 5000")
    print("EVAL_JSON " + json.dumps(r))
    return 0


def main(argv: Optional[list] = None) -> int:
    """The command line: train (the default), eval, the lab's commands. Exit codes: 0 done, 1 diverged, out of
    memory or a failed write, 2 bad input, 130 Ctrl-C and 143 SIGTERM (last.pt written), 141 a closed pipe."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):  # each line written when printed: a closed pipe is seen below, not at exit
        sys.stdout.reconfigure(line_buffering=True)
    commands = ("train", "eval", *LAB_COMMANDS)
    command = argv.pop(0) if argv and argv[0] in commands else "train"
    with warnings.catch_warnings():  # restores the process's warning display afterwards
        warnings.showwarning = _show_warning
        try:
            if command == "train" and argv and not argv[0].startswith("-"):  # train takes no bare word
                close = difflib.get_close_matches(argv[0].replace("_", "-"), commands, n=1, cutoff=0.65)
                raise UserError(f"unknown command {argv[0]!r}" + (f" (did you mean {close[0]}?)" if close else "")
                                + f"; the commands: {', '.join(commands)} (see {_program()} --help)")
            if command != "train" and _under_torchrun():  # each process would do the same work, into one folder
                raise UserError(f"{command} runs in one process: start it with python, not torchrun (training is "
                                f"what runs data-parallel; a sweep spreads its runs over GPUs with --devices)")
            if command in LAB_COMMANDS:
                try:
                    import cifar100_lab
                except ModuleNotFoundError as e:
                    if e.name != "cifar100_lab":
                        raise
                    raise UserError(f"{command} is a command of the lab: it needs cifar100_lab.py beside "
                                    f"cifar100_resnet.py (pip install cifar100_resnet installs both)") from None
                return cifar100_lab.COMMANDS[command](argv)
            return (_eval_command if command == "eval" else _train_command)(argv)
        except UserError as e:
            return _fail(e, 2)
        except (TrainingDiverged, WriteFailed) as e:
            return _fail(e, 1)
        except BrokenPipeError:  # (in training: last.pt holds the last epoch that ended, as after any stop)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is left to flush goes nowhere
            return 141  # 128 + SIGPIPE
        except KeyboardInterrupt as e:  # StopSignals says what is kept; elsewhere each write is atomic
            message, code = e.args if len(e.args) == 2 else (f"{command} stopped by Ctrl-C; no file is left "
                                                             f"half-written", 130)
            return _fail(message, code)
        except RuntimeError as e:  # out of memory (each process its own); or another process failed (it says why)
            plain = ("can't allocate memory", "not enough memory", "MPS backend out of memory")  # CPU, Windows, MPS<2.5
            if isinstance(e, torch.cuda.OutOfMemoryError) or any(text in str(e) for text in plain):
                cause = ". ".join(_first_line(e, None).split(". ")[:2]).rstrip(".")
                return _fail(f"out of memory ({cause}): a smaller --batch-size or --eval-batch-size needs less; a run "
                             f"folder keeps its last checkpoint", 1, own=True)
            if not _under_torchrun() or not any(
                    word in _first_line(e, None) for word in ("gloo", "NCCL", "Connection reset", "Connection closed")):
                raise
            return _fail(f"another process of this run stopped, and this one lost it ({_first_line(e)})", 1)


def _speaker() -> Optional[str]:
    """Who prints under torchrun: process 0 (prefix ""), and for errors only the first process of each other
    machine (prefix its number: a data folder may be missing on one machine only). None: silent. Alone: ""."""
    if not _under_torchrun() or int(os.environ.get("RANK", "0")) == 0:
        return ""
    return f"[machine {os.environ.get('GROUP_RANK', '?')}] " if int(os.environ.get("LOCAL_RANK", "0")) == 0 else None


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    if not issubclass(category, RunWarning):
        _default(message, category, filename, lineno, file, line)
    elif _speaker() == "":  # with several processes, process 0 only
        print(f"warning: {message}", file=sys.stderr)


def _fail(error, code: int, own: bool = False) -> int:
    """One line on stderr, whatever the message holds: with several processes from _speaker(), or (own) from each."""
    speaker = _speaker() if not own or _speaker() == "" else f"[process {os.environ.get('RANK', '?')}] "
    if speaker is not None and (speaker == "" or own or isinstance(error, UserError)):
        print(f"{speaker}error: " + " ".join(str(error).split()), file=sys.stderr)
    return code


class StopSignals:
    """Ctrl-C or SIGTERM (SLURM, `timeout`, docker stop) asks to stop: training finishes its step, writes last.pt,
    and the command exits 128 + the signal's number. A second Ctrl-C stops at once, a second SIGTERM ends the
    process; with at_once, so does the first until defer() (train() calls it before creating anything).
    Stopping at once raises KeyboardInterrupt(message, exit code), which main() prints as one line."""

    def __init__(self, what: str = "writing last.pt after this step", quiet: bool = False, at_once: bool = False,
                 kept: str = "the run folder keeps its last complete checkpoint"):
        self.what, self.signals, self.previous, self.quiet = what, [], {}, quiet
        self.at_once, self.kept = at_once, kept

    def requested(self) -> bool:
        return bool(self.signals)

    def defer(self) -> None:
        self.at_once = False

    @property
    def exit_code(self) -> int:
        return 128 + self.signals[0]

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.at_once:
            raise KeyboardInterrupt(f"stopped by {name} before the first step; nothing was created", 128 + signum)
        if self.signals:
            raise KeyboardInterrupt(f"aborted by a second {name}; {self.kept}", 128 + signum)
        self.signals.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a collective may be waiting: a second SIGTERM ends it
        if not self.quiet:
            print(f"\n{name}: {self.what} (Ctrl-C again to abort)", flush=True)

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Console:
    """Step lines on a terminal rewrite one line in place; other lines, and output to a file, are plain lines."""

    def __init__(self, stream):
        self.stream, self.tty, self.pending = stream, stream.isatty(), False

    def log(self, message: str) -> None:
        if self.pending:
            self.stream.write("\r\033[K")
            self.pending = False
        print(message, file=self.stream, flush=True)

    def progress(self, message: str) -> None:
        if not self.tty:
            return self.log(message)
        print("\r\033[K" + message[:shutil.get_terminal_size().columns - 1], end="", file=self.stream, flush=True)
        self.pending = True


def set_backend_flags() -> None:
    """Process-wide settings, made only by the commands (library callers choose their own)."""
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels (CUDA only)


if __name__ == "__main__":
    import cifar100_resnet  # the module as the lab imports it, not this copy of it named __main__
    sys.exit(cifar100_resnet.main())
