"""The lab beside cifar100_resnet: tools for experimenting with the recipe and for understanding a run.

    python cifar100_lab.py lr-find [train flags]          # the learning-rate range test
    python cifar100_lab.py sweep [train flags] --grid lr=0.05,0.1,0.2 --out-dir sweeps/lr
    python cifar100_lab.py plot runs/a runs/b             # learning curves (needs matplotlib)
    python cifar100_lab.py report runs/a                  # what saved weights get right and wrong
    python cifar100_lab.py preview-aug [train flags]      # what the network sees
    python cifar100_lab.py conv-demo                      # what a convolution does
    python cifar100_lab.py bench [train flags]            # time the training step on this device

The same commands run as `cifar100-resnet COMMAND` and `python cifar100_resnet.py COMMAND`. Everything here is
built on the library's public API (`import cifar100_resnet as cr`); matplotlib (figures) and optuna
(`sweep --search optuna`) are optional and imported only when a command needs them.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import difflib
import io
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import textwrap
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

try:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import cifar100_resnet as cr
except KeyboardInterrupt:  # Ctrl-C while torch loads (seconds): a command says one line, not a traceback
    if __name__ != "__main__":
        raise
    print("error: stopped by Ctrl-C while loading torch; nothing was created", file=sys.stderr)
    sys.exit(130)


# ----------------------------------------------------------------------------------------------------------
# Reading and writing the files of runs and sweeps: each bad one is one line naming it, before any output


def read_metrics(path: str, columns: tuple = (), numbers: tuple = ()) -> list[dict]:
    """The rows of a CSV file this project wrote (metrics.csv, sweep.csv, ...) as dicts of text; [] without one.
    UserError naming the file unless it is text with every one of `columns`, and a number in every `numbers`
    cell (converted to float) of each row."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise cr.UserError(f"{path} is not a readable CSV file ({type(e).__name__})") from None
    missing = [c for c in (*columns, *numbers) if c not in header]
    if missing:
        raise cr.UserError(f"{path} lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)}")
    for line, row in enumerate(rows, start=2):
        for column in numbers:
            try:
                row[column] = float(row[column])
            except (TypeError, ValueError):
                raise cr.UserError(f"{path}, line {line}: {column} is {row[column]!r}, not a number") from None
    return rows


def read_run_metrics(run_dir: str) -> list[dict]:
    """A run folder's metrics.csv, checked (numbers where the figures and reports read them); [] without one."""
    return read_metrics(os.path.join(run_dir, "metrics.csv"),
                        numbers=("epoch", "lr", "train_loss", "test_loss", "test_top1", "test_top5"))


def remove_stale_temporaries(folder: str) -> None:
    """Remove the temporary files (cr.atomic_save's .NAME.PID.THREAD.partial) that a killed process left in
    `folder`: those of processes that are gone, never one another process is writing (several may share a
    sweep's folder)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        parts = name.split(".")
        if name.startswith(".") and name.endswith(cr.TEMP_SUFFIX) and len(parts) >= 5 and parts[-3].isdigit():
            try:
                os.kill(int(parts[-3]), 0)  # raises if the process is gone (signal 0 sends nothing)
            except ProcessLookupError:
                os.remove(os.path.join(folder, name))
            except OSError:  # alive, another user's
                pass


def check_png(path: str) -> str:
    """Refuse a figure's path that is not a new or replaceable .png in a folder that can be written, before any
    work; returns it."""
    if os.path.isdir(path):
        raise cr.UserError(f"--out {path} is a folder: name the PNG file to write")
    if not path.lower().endswith(".png"):
        raise cr.UserError(f"--out {path}: the figure is a PNG file, so its name ends in .png")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise cr.UserError(f"cannot write --out {path}: {parent} is not a writable folder")
    return path


def make_folder(path: str) -> str:
    """os.makedirs(path, exist_ok=True), its failure one UserError line (root passes os.access where it cannot
    write: a check before the work cannot catch everything); returns the path."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise cr.UserError(f"cannot create {path}: {e.strerror or e}") from None
    return path


# ----------------------------------------------------------------------------------------------------------
# Benchmark: the real training step and evaluation, timed on this device


def random_cifar(dataset: str, n_train: int, n_test: int, seed: int = 0) -> cr.CifarData:
    """Random uint8 images and labels of CIFAR's shape: the cost of a step does not depend on pixel values."""
    info = cr.DATASETS[dataset]
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for n in (n_train, n_test):
        tensors.append(torch.randint(0, 256, (n, 3, cr.IMAGE_SIZE, cr.IMAGE_SIZE), dtype=torch.uint8, generator=g))
        tensors.append(torch.randint(0, info.num_classes, (n,), generator=g))
    return cr.CifarData(*tensors, [str(i) for i in range(info.num_classes)], info)


def benchmark(config: cr.TrainConfig, data: cr.CifarData, epochs: int = 2, eval_repeats: int = 3,
              env: Optional[cr.Environment] = None, log: Callable[[str], None] = lambda message: None) -> dict:
    """Time whole training epochs (augmentation, mixing, forward, backward, optimiser) and evaluation.

    One full epoch first is the warm-up, timed and reported apart: it holds cuDNN's autotuning, compilation
    (both batch shapes) and graph capture. Returns the measured seconds per epoch and per evaluation, and the
    same scaled to CIFAR's 50,000 training and 10,000 test images; images/s and peak memory. (FLOPs, MFU and
    a kernel profile: bench/profile_epoch.py.)
    """
    # the run's schedule and settings (env), but step lines that count the bench's own epochs and time left
    env = env or cr.resolve(config)
    trainer = cr.Trainer(dataclasses.replace(config, epochs=1 + epochs), data, log=log, env=env)
    log(f"bench: times {epochs} training epochs of {trainer.n_train:,} images after one warm-up epoch, then "
        f"{eval_repeats} evaluations; the step lines count these {1 + epochs} epochs and the time left in them")
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.train_epoch()
    first_epoch = time.perf_counter() - start
    trainer.evaluate("test")
    warmup_seconds = time.perf_counter() - start
    rest = epochs * first_epoch + eval_repeats * (warmup_seconds - first_epoch)
    log(f"bench: warm-up done in {cr.format_duration(warmup_seconds)}; the {epochs} timed epochs and "
        f"{eval_repeats} evaluations take at most about {cr.format_duration(rest)} more")

    epoch_seconds = [trainer.train_epoch()["train_seconds"] for _ in range(epochs)]
    eval_seconds = []
    for _ in range(eval_repeats):
        start = time.perf_counter()
        trainer.evaluate("test")  # ends in a host sync
        eval_seconds.append(time.perf_counter() - start)

    n_train, n_test = trainer.n_train, len(trainer.splits["test"][0])
    train_epoch = sorted(epoch_seconds)[len(epoch_seconds) // 2]
    evaluation = sorted(eval_seconds)[len(eval_seconds) // 2]
    train_50k, eval_10k = train_epoch * 50_000 / n_train, evaluation * 10_000 / max(n_test, 1)
    trainer.close()  # goes when this returns, not at a garbage collection (it holds a bound method of itself)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__, "batch_size": config.batch_size, "lr": config.lr, "arch": config.arch,
        "stem": config.stem, "width": config.width, "amp": str(trainer.amp_dtype or "off"),
        "cuda_graphs": trainer.use_graphs, "compile": trainer.use_compile,
        "train_images": n_train, "test_images": n_test, "warmup_seconds": warmup_seconds,
        "measured_train_epoch_seconds": train_epoch, "measured_eval_seconds": evaluation,
        "train_epoch_seconds": train_50k, "train_epoch_seconds_each": [s * 50_000 / n_train for s in epoch_seconds],
        "images_per_s": n_train / train_epoch, "eval_seconds_per_10k": eval_10k,
        "epoch_with_eval_seconds": train_50k + eval_10k,  # a 50,000-image epoch and its 10,000-image evaluation
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
    }


def bench_main(argv: list) -> int:
    """`bench [train flags]`: time the training step and evaluation on random data (or --data-dir's data)."""
    parser = cr.command_parser("bench", "Time the training step and evaluation on this device, on random data of "
                               "CIFAR's shape (or the real data with --data-dir). Takes every train flag; "
                               "--limit-train and --limit-test time fewer images, and the output says what it "
                               "measured and what it scaled to CIFAR's 50,000 and 10,000.", train_flags=True)
    parser.add_argument_group("bench").add_argument("--bench-epochs", type=int, default=2, help="timed epochs, "
                                                    "after one warm-up epoch (default: 2)")
    args = parser.parse_args(argv)
    config = cr.config_from_args(args)
    config.out_dir = None
    env = cr.resolve(config)
    if args.bench_epochs < 1:
        raise cr.UserError(f"--bench-epochs must be at least 1, got {args.bench_epochs}")
    cr.set_backend_flags()
    if any(a == "--data-dir" or a.startswith("--data-dir=") for a in argv):
        data, source = cr.load_dataset(config.data_dir, config.dataset, config.download), "real data"
    else:
        data = random_cifar(config.dataset, config.limit_train or 50_000, config.limit_test or 10_000, config.seed)
        source = "random data"
    try:
        r = benchmark(config, data, epochs=args.bench_epochs, env=env, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        raise KeyboardInterrupt("bench stopped by Ctrl-C; it writes no file, so nothing is lost", 130) from None
    print(f"bench: {r['arch']} ({config.stem} stem, width {r['width']}) on {r['device']}, torch {r['torch']}, "
          f"amp {r['amp']}, batch {r['batch_size']}, cuda graphs {'on' if r['cuda_graphs'] else 'off'}, "
          f"compile {'on' if r['compile'] else 'off'}, {source}")
    print("warm-up (one epoch and one evaluation"
          + (": autotuning, compilation, capture" if r["compile"] or r["cuda_graphs"] else "")
          + f"): {r['warmup_seconds']:.2f} s")
    scaled = r["train_images"] != 50_000 or r["test_images"] != 10_000
    print(f"train: {r['measured_train_epoch_seconds']:.3f} s per epoch of {r['train_images']:,} images "
          f"({r['images_per_s']:,.0f} images/s, the median of {len(r['train_epoch_seconds_each'])} epochs)"
          + (f"; scaled to 50,000 images: {r['train_epoch_seconds']:.3f} s" if scaled else ""))
    print(f"eval: {r['measured_eval_seconds']:.3f} s for {r['test_images']:,} images"
          + (f"; scaled to 10,000: {r['eval_seconds_per_10k']:.3f} s" if scaled else ""))
    print(f"a 50,000-image epoch with its evaluation: {r['epoch_with_eval_seconds']:.3f} s"
          + (" (scaled)" if scaled else "") + f"; {config.epochs} epoch{'s' * (config.epochs != 1)}: "
          f"{cr.format_duration(config.epochs * r['epoch_with_eval_seconds'])}")
    if r["peak_memory_gib"] is not None:
        print(f"peak GPU memory: {r['peak_memory_gib']:.2f} GiB")
    print("BENCH_JSON " + json.dumps(r))
    return 0


# ----------------------------------------------------------------------------------------------------------
# Experiments: the learning-rate range test, and sweeps that choose on held-out training images


@dataclass
class LRFindResult:
    rates: list  # the rate of each step taken, growing exponentially
    losses: list  # each step's training loss (the mixed, label-smoothed loss that training minimises)
    smoothed: list  # an exponential moving average of the losses, bias-corrected as in Adam
    suggestion: float  # a peak learning rate to try
    rule: str  # how the suggestion was chosen, in words
    stopped_early: Optional[str]  # why the test ended before its last step, or None


def _check_lr_range(start: float, end: float, steps: int) -> None:
    if not 0 < start < end < 3.4e38:  # (the optimiser's step computes in float32)
        raise cr.UserError(f"the rates must satisfy 0 < --start < --end < 3.4e38, got --start {start:g} --end "
                           f"{end:g}")
    if steps < 2:
        raise cr.UserError(f"--steps must be at least 2, got {steps}")


def lr_find(config: cr.TrainConfig, data: Optional[cr.CifarData] = None, start: float = 1e-5, end: float = 10.0,
            steps: int = 300, model: Optional[nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None,
            smoothing: float = 0.98, diverge_factor: float = 4.0,
            log: Callable[[str], None] = lambda message: None) -> LRFindResult:
    """The learning-rate range test (Smith 2015, "Cyclical learning rates"; fastai's lr_find): `steps`
    mini-batches of real training (the configured augmentation, mixing, loss, momentum and weight decay) while
    the rate grows exponentially from `start` to `end`. It stops early once the smoothed loss exceeds
    `diverge_factor` times its lowest value, or a loss is not finite.

    It trains a copy: of `model` and `optimizer` when given (their weights and momentum are left untouched),
    else of the model a run with `config` starts from. Suggestion: a tenth of the rate at the lowest smoothed
    loss, where the loss still falls steadily (fastai's `lr_min` rule).
    """
    _check_lr_range(start, end, steps)
    if cr.process_group()[1] > 1:  # its early stop and its copy of the model are one process's
        raise cr.UserError("lr_find runs in one process, not inside a torch.distributed group")
    config = dataclasses.replace(config, out_dir=None)
    env = cr.resolve(config)  # validates the settings
    if data is None:
        data = cr.load_dataset(config.data_dir, config.dataset, config.download)
    trainer = cr.Trainer(config, data, log=log, env=env)
    if model is not None:
        trainer.model = copy.deepcopy(model).to(trainer.device)  # _forward_loss reads trainer.model
        trainer.optimizer = cr.build_optimizer(trainer.model, config, fused=trainer.device.type == "cuda")
        if optimizer is not None:  # deep-copied: load_state_dict may keep the very tensors it is given
            trainer.optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            cr.match_param_layout(trainer.optimizer)
    log(f"lr-find: up to {steps} steps of batch {config.batch_size}, rate {start:g} to {end:g}")  # (settings fit)
    low, high = math.log(start), math.log(end)  # (end / start overflows for --start 1e-300 --end 1e300)
    rates = [math.exp(low + (high - low) * i / (steps - 1)) for i in range(steps)]
    result = LRFindResult([], [], [], float("nan"), "", None)
    average, lowest = 0.0, float("inf")
    trainer.model.train()
    for i, rate in enumerate(rates):
        step = i % trainer.steps_per_epoch
        if step == 0:
            images, labels = trainer.augmented_epoch()
        first, last = trainer.batches[step]
        trainer.set_lr(rate)
        loss = float(trainer.train_batch(images[first:last], labels[first:last])[0])
        if not math.isfinite(loss):
            result.stopped_early = f"the loss became non-finite at rate {rate:.3g}"
            break
        average = smoothing * average + (1 - smoothing) * loss
        smoothed = average / (1 - smoothing ** (i + 1))
        result.rates.append(rate)
        result.losses.append(loss)
        result.smoothed.append(smoothed)
        lowest = min(lowest, smoothed)
        if smoothed > diverge_factor * lowest:
            result.stopped_early = (f"the smoothed loss passed {diverge_factor:g} x its lowest value at rate "
                                    f"{rate:.3g}")
            break
    trainer.close()  # goes when this returns, not at a garbage collection (it holds a bound method of itself)
    if not result.rates:
        raise cr.UserError(f"the loss was not finite at the first rate, {start:g}: lower --start")
    lowest_at = result.smoothed.index(min(result.smoothed))
    at_lowest = result.rates[lowest_at]
    result.suggestion = max(at_lowest / 10, start)
    result.rule = f"a tenth of {at_lowest:.3g}, where the smoothed loss was lowest"
    if lowest_at == 0:  # it never fell: no steady part to place the rate in
        result.rule = "--start itself: the smoothed loss was lowest there and never fell; a lower --start shows where"
    # near the end, with no rise after it (0.5 %: the mixed loss is noisy), the lowest may lie beyond --end
    if result.stopped_early is None and lowest_at >= 0.9 * (len(result.rates) - 1) and \
            result.smoothed[-1] < 1.005 * min(result.smoothed):
        result.rule += f"; it still fell at {end:g}: a larger --end or more --steps would place it better"
    return result


def write_lr_find(result: LRFindResult, folder: str) -> list:
    """lr_find.csv (step, rate, loss, smoothed loss), then lr_find.png; returns their paths. Without
    matplotlib the CSV is written and UserError says how to install it."""
    csv_path = os.path.join(folder, "lr_find.csv")
    rows = [{"step": i + 1, "lr": r, "loss": loss, "smoothed_loss": s}
            for i, (r, loss, s) in enumerate(zip(result.rates, result.losses, result.smoothed))]
    _write_csv(csv_path, rows, ["step", "lr", "loss", "smoothed_loss"])
    try:
        return [csv_path, plot_lr_find(result, os.path.join(folder, "lr_find.png"))]
    except cr.UserError as e:
        raise cr.UserError(f"wrote {csv_path}; the figure: {e}") from None


SWEEP_VAL_SPLIT = 5000  # a sweep's default --val-split: the training images it chooses on
MAX_SWEEP_RUNS = 10_000  # more than anyone trains: a mistyped --random 10000000000 says so instead of filling memory


def _sweepable() -> dict:
    """The settings a sweep may vary: those that change what a run computes (the seed has --seeds)."""
    return {f.name: f for f in dataclasses.fields(cr.TrainConfig)
            if not (f.metadata["resumable"] or f.metadata["library_only"] or f.name == "seed")}


def _parse_setting(field: dataclasses.Field, text: str):
    """One value of a setting, from text, with the setting's own type and checks."""
    if field.name == "t0":
        return None if text == "auto" else float(text)
    kind = type(field.default)
    if kind is bool:
        if text.lower() not in ("true", "false", "on", "off", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "on", "1")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{field.name} takes {'whole numbers' if kind is int else 'numbers'}, got {text!r}") from None


def parse_sweep_specs(specs: list, ranges: bool = False) -> dict:
    """{setting: values} from NAME=V1,V2,... specs (the flag's name, dashes or underscores). With ranges, a
    spec may instead be NAME=LOW:HIGH (uniform) or NAME=log:LOW:HIGH (log-uniform): {setting: ("log"|"uniform",
    low, high)}; a list is then a uniform choice."""
    fields, space = _sweepable(), {}
    for spec in specs:
        name, _, text = spec.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if name in fields and not text:
            raise cr.UserError(f"{spec!r} gives {name} no values: {name}=V1,V2")
        if name not in fields:
            if name == "seed":
                raise cr.UserError("vary the seed with --seeds 0,1,2, not in the grid")
            close = difflib.get_close_matches(name, list(fields), n=1)
            raise cr.UserError(f"{spec!r} is not NAME=VALUES for a setting a sweep can vary"
                            + (f" (did you mean {close[0]}?)" if close else "")
                            + f"; those are: {', '.join(sorted(fields))}")
        if name in space:
            raise cr.UserError(f"{name} is given twice")
        field = fields[name]
        try:
            parts = text.split(":")
            if ranges and ":" in text:
                kind = "log" if parts[0] == "log" else "uniform"
                if len(parts) != 2 + (kind == "log"):
                    raise ValueError("a range is LOW:HIGH or log:LOW:HIGH")
                low, high = (parts[1:] if kind == "log" else parts)
                low, high = _parse_setting(field, low), _parse_setting(field, high)
                if type(field.default) not in (int, float) or not low < high or (kind == "log" and low <= 0):
                    positive = " and LOW > 0" if kind == "log" else ""
                    raise ValueError(f"a range needs a numeric setting and LOW < HIGH{positive}")
                space[name] = (kind, low, high)
            else:
                values = [_parse_setting(field, v) for v in text.split(",")]
                if len(set(map(repr, values))) != len(values):
                    raise ValueError("a value is repeated")
                space[name] = values
        except ValueError as e:
            raise cr.UserError(f"cannot read {spec!r}: {e}") from None
    return space


def _round(value, digits: int = 3):
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def sample_settings(space: dict, n: int, seed: int = 0) -> list:
    """n settings drawn from `space` (parse_sweep_specs with ranges); floats to 3 significant digits, so that
    the folder name shows the value exactly. The first n of a larger n are the same: a sweep grows."""
    import random

    rng, points = random.Random(seed), []
    for _ in range(n):
        point = {}
        for name in sorted(space):
            spec = space[name]
            if isinstance(spec, list):
                point[name] = spec[rng.randrange(len(spec))]
                continue
            kind, low, high = spec
            u = rng.random()
            value = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if kind == "log" \
                else low + u * (high - low)
            point[name] = round(value) if isinstance(low, int) and isinstance(high, int) else _round(value)
        points.append(point)
    return points


def grid_settings(grid: dict) -> list:
    """Every combination of the grid's values, the first setting varying slowest."""
    points = [{}]
    for name, values in grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


def _show(value) -> str:
    return "auto" if value is None else str(value).lower() if isinstance(value, bool) else \
        f"{value:g}" if isinstance(value, float) else str(value)


def setting_name(setting: dict) -> str:
    """A setting as text, also its runs' folder name: lr=0.1,weight_decay=0.0005."""
    return ",".join(f"{k}={_show(v)}" for k, v in setting.items()) or "base"


@dataclass
class SweepRun:
    setting: dict  # the varied settings
    seed: int
    config: Optional[cr.TrainConfig] = None  # everything, its out_dir the run's folder: out_dir/runs/<name>
    name: str = ""  # default: the setting and seed, lr=0.1,seed=0 (an Optuna trial: trial-0007)

    def __post_init__(self):
        self.name = self.name or ",".join(filter(None, [setting_name(self.setting) * bool(self.setting),
                                                        f"seed={self.seed}"]))


def _changed_settings(saved: dict, config: cr.TrainConfig) -> list:
    return [f"--{k.replace('_', '-')} {_show(v)} (the run has {_show(saved.get(k))})"
            for k, v in config.saved().items()
            if k not in cr.RESUMABLE_OVERRIDES and k in saved and saved[k] != v and
            not (isinstance(v, tuple) and list(v) == saved[k])]


DIVERGED_FILE = "diverged.txt"  # in a run folder: the run diverged; a re-run leaves it as it is


def run_status(folder: str, epochs: int) -> str:
    """done, diverged, partial (has epochs or a checkpoint, not all) or pending (nothing yet)."""
    run = cr.RunFolder(folder)
    if os.path.exists(run.file(DIVERGED_FILE)):
        return "diverged"
    if len(read_metrics(run.file("metrics.csv"))) >= epochs:  # metrics.csv is written after last.pt
        return "done"
    return "partial" if run.holds_run() else "pending"


def _train_sweep_run(run: SweepRun, data: cr.CifarData, log: Callable[[str], None], should_stop,
                     on_epoch=None, device: Optional[str] = None) -> str:
    """Train (or continue) one run of a sweep in its folder; returns its status afterwards."""
    config = dataclasses.replace(run.config, device=device or run.config.device)
    folder = cr.RunFolder(config.out_dir)
    status = run_status(folder.path, config.epochs)
    if status in ("done", "diverged"):
        return status
    try:
        result = cr.train(config, data, log=log, resume=folder.path if folder.holds_run() else None,
                       should_stop=should_stop, on_epoch=on_epoch)
    except cr.TrainingDiverged as e:
        log(f"diverged: {e}")
        cr.atomic_save(f"{e}\n", folder.file(DIVERGED_FILE))
        return "diverged"
    except cr.UserError as e:
        if not str(e).startswith("another process is writing to --out-dir"):  # (RunFolder.open's lock)
            raise
        raise cr.UserError(f"another process is training run {run.name} ({folder.path}): a second sweep in the same "
                           f"--out-dir? One sweep runs in a folder at a time; --devices spreads its runs over "
                           f"several devices") from None
    return "partial" if result.interrupted else "done"


def _sweep_row(run: SweepRun) -> dict:
    """The row of sweep.csv for one run, read from its folder: final and best validation top-1, final test."""
    rows = read_metrics(os.path.join(run.config.out_dir, "metrics.csv"),
                        numbers=("val_top1", "test_top1", "elapsed_seconds"))
    row = {"run": run.name, **{k: _show(v) for k, v in run.setting.items()}, "seed": run.seed,
           "status": run_status(run.config.out_dir, run.config.epochs), "epochs": len(rows)}
    if rows:
        val = [r["val_top1"] for r in rows]
        best = max(range(len(val)), key=val.__getitem__)
        row.update(final_val_top1=val[-1], best_val_top1=val[best], best_val_epoch=best + 1,
                   final_test_top1=rows[-1]["test_top1"], wall_seconds=rows[-1]["elapsed_seconds"])
    return row


def _run_line(run: SweepRun) -> str:
    row = _sweep_row(run)
    if "final_val_top1" not in row:
        return f"{run.name}: {row['status']}"
    return (f"{run.name}: {row['status']} after {row['epochs']} epochs, val top-1 {row['final_val_top1']:.2%}, "
            f"test top-1 {row['final_test_top1']:.2%}, {cr.format_duration(row['wall_seconds'])}")


def _mean_std(values: list) -> tuple:
    """The mean and the sample standard deviation (n - 1; nan for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def summarize_sweep(rows: list, varied: list) -> list:
    """One row per setting: mean and std over its seeds of the final val and test top-1. The setting with the
    best mean final val top-1, among those whose runs all finished, is chosen; test is reported, never used."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in varied), []).append(row)
    summary = []
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "done"]
        entry = {**dict(zip(varied, key)), "setting": setting_name(dict(zip(varied, key))),
                 "runs": len(members), "done": len(done), "chosen": ""}
        if done:
            for metric in ("final_val_top1", "final_test_top1"):
                entry[metric + "_mean"], entry[metric + "_std"] = _mean_std([r[metric] for r in done])
        summary.append(entry)
    complete = [e for e in summary if e["done"] == e["runs"]]
    if complete:
        max(complete, key=lambda e: e["final_val_top1_mean"])["chosen"] = "yes"
    return summary


def _write_csv(path: str, rows: list, columns: list) -> None:
    cr.atomic_save(cr.csv_text(rows, columns), path)


@dataclass
class SweepResult:
    rows: list  # one per run (the columns of sweep.csv)
    summary: list  # one per setting (summary.csv)
    chosen: Optional[dict]  # the summary row chosen on validation; None until a setting has all its runs
    out_dir: str
    interrupted: bool = False


def plan_sweep(base: cr.TrainConfig, out_dir: str, settings: list, seeds: list) -> list:
    """The runs of a sweep, each checked: valid settings, and a folder that holds nothing or the same run."""
    if base.val_split < 1:
        raise cr.UserError("a sweep chooses on held-out training images: --val-split must be at least 1 (default "
                        f"{SWEEP_VAL_SPLIT}), never 0, which would leave only the test set to choose on")
    if not seeds:
        raise cr.UserError("--seeds needs at least one seed")
    runs, names = [], set()
    for setting in settings:
        for seed in seeds:
            run = SweepRun(setting, seed)
            if run.name in names:
                continue
            names.add(run.name)
            run.config = dataclasses.replace(base, **setting, seed=seed,
                                             out_dir=os.path.join(out_dir, "runs", run.name))
            _check_sweep_run(run)
            runs.append(run)
    return runs


def _check_sweep_run(run: SweepRun) -> None:
    """Refuse invalid settings, and a run folder that holds a run with other settings."""
    try:
        run.config.validate()
    except cr.UserError as e:
        raise cr.UserError(f"run {run.name}: {e}") from None
    saved = cr.RunFolder(run.config.out_dir).saved_config()
    changed = _changed_settings(saved, run.config) if saved else []
    if changed:
        raise cr.UserError(f"{run.config.out_dir} holds a run with other settings: {', '.join(changed)}; the base "
                        f"settings of a sweep cannot change, choose another --out-dir")


def _check_fits(run: SweepRun, data: cr.CifarData) -> None:
    """Refuse, before anything is created, a run whose settings leave it too few training images."""
    try:
        n_train = len(cr.split_data(data, run.config)["train"][0])
    except cr.UserError as e:
        raise cr.UserError(f"run {run.name}: {e}") from None
    if run.config.batch_size > n_train:
        raise cr.UserError(f"run {run.name}: --batch-size {run.config.batch_size} is larger than the training set "
                           f"({n_train} images)")


def _saved_sweep(out_dir: str, search: str, base: cr.TrainConfig, varied: list) -> Optional[dict]:
    """The sweep.json of out_dir (None without one), refused unless it is the same kind of sweep, with the same
    base settings."""
    path = os.path.join(out_dir, "sweep.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        saved_base = saved["base"]
    except (OSError, ValueError, KeyError, TypeError):
        raise cr.UserError(f"{path} is not a sweep's record (sweep.json): choose another --out-dir") from None
    kinds = {"optuna": "an Optuna study", "": "a grid or random sweep"}
    if saved.get("search", "") != search:
        raise cr.UserError(f"{out_dir} holds {kinds.get(saved.get('search', ''), 'another sweep')}, not "
                           f"{kinds[search]}: choose another --out-dir")
    changed = [c for c in _changed_settings(saved_base, dataclasses.replace(base, **{
        k: saved_base[k] for k in varied if k in saved_base}))]
    if search == "optuna" and changed:  # (a grid's runs are each checked against their own folder)
        raise cr.UserError(f"{out_dir} holds a study with other settings: {', '.join(changed)}; the base "
                           f"settings of a sweep cannot change, choose another --out-dir")
    return saved


def sweep(base: cr.TrainConfig, out_dir: str, grid: Optional[dict] = None, space: Optional[dict] = None,
          trials: int = 0, seeds: tuple = (0,), devices: Optional[list] = None, sample_seed: int = 0,
          data: Optional[cr.CifarData] = None, log: Callable[[str], None] = print,
          should_stop: Callable[[], bool] = lambda: False, search: str = "", storage: Optional[str] = None,
          study_name: Optional[str] = None) -> SweepResult:
    """Train every combination of `grid` ({setting: [values]}), or `trials` settings drawn from `space`
    (parse_sweep_specs with ranges), once per seed, each run in out_dir/runs/<setting>,seed=<seed>/.

    Runs already finished are skipped and interrupted ones continued, so the same call finishes a sweep and a
    larger grid trains only its new runs. Selection is on the validation images (base.val_split, the last of
    the training set), the test set reported beside it. devices: one worker process per entry (a device may
    repeat); default: this process, base.device. Writes sweep.csv (one row per run) and summary.csv (one row
    per setting, mean and std over seeds), also after an interruption. Every setting, the folder and the data
    are checked before anything is created.

    search="optuna": an Optuna study instead (TPE sampling of `space`, pruning on each epoch's val top-1) that
    runs until it holds `trials` finished trials, stored in `storage` (a database URL; default: optuna.db in
    out_dir), so that the same call on other machines joins it. One seed: base.seed.
    """
    cr.RunFolder(out_dir).check_writable()
    n_settings = math.prod(len(values) for values in grid.values()) if grid is not None else trials
    n_runs = n_settings * (1 if search == "optuna" else len(seeds))
    if n_runs > MAX_SWEEP_RUNS:
        seeds_note = f" ({n_settings:,} settings x {len(seeds)} seeds)" if n_runs != n_settings else ""
        raise cr.UserError(f"the sweep would train {n_runs:,} runs{seeds_note}; one sweep trains at most "
                           f"{MAX_SWEEP_RUNS:,}")
    if search == "optuna":
        if tuple(seeds) != (base.seed,) and tuple(seeds) != (0,):
            raise cr.UserError("--seeds is for grid and random sweeps; an Optuna trial trains one seed (--seed)")
        return _optuna_sweep(base, out_dir, space or {}, trials, storage, study_name, sample_seed, devices, data,
                             log, should_stop)
    if storage or study_name:
        raise cr.UserError("--storage and --study are for --search optuna")
    settings = grid_settings(grid) if grid is not None else sample_settings(space or {}, trials, sample_seed)
    runs = plan_sweep(base, out_dir, settings, list(seeds))
    varied = list(grid or space or {})
    _saved_sweep(out_dir, "", base, varied)
    if data is None:
        data = cr.load_dataset(base.data_dir, base.dataset, base.download)
    for run in runs:
        _check_fits(run, data)
    todo = [r for r in runs if run_status(r.config.out_dir, r.config.epochs) not in ("done", "diverged")]
    make_folder(os.path.join(out_dir, "runs"))
    remove_stale_temporaries(out_dir)
    cr.atomic_save(json.dumps({"base": base.saved(), "grid": grid, "space": space, "trials": trials,
                               "seeds": list(seeds), "sample_seed": sample_seed, "varied": varied,
                               "runs": [r.name for r in runs]}, indent=2, default=list) + "\n",
                   os.path.join(out_dir, "sweep.json"))
    log(f"sweep: {len(runs)} runs ({len(settings)} settings x {len(seeds)} seeds), {len(runs) - len(todo)} already "
        f"finished; choosing on the last {base.val_split} training images (validation), the test set only "
        f"reported")
    interrupted = False
    if todo and devices and len(devices) > 1:
        interrupted = _in_workers(_sweep_worker_run, todo, devices, data, log, should_stop)
    else:
        for i, run in enumerate(todo):
            log(f"sweep: run {i + 1}/{len(todo)}: {run.name}")
            status = _train_sweep_run(run, data, lambda m, n=run.name: log(f"[{n}] {m}"), should_stop,
                                      device=devices[0] if devices else None)
            log(f"sweep: run {i + 1}/{len(todo)}: {_run_line(run)}")
            if status == "partial":
                interrupted = True
                break
    return _finish_sweep(runs, varied, out_dir, log, interrupted)


def _finish_sweep(runs: list, varied: list, out_dir: str, log, interrupted: bool,
                  trials: Optional[dict] = None) -> SweepResult:
    """Write sweep.csv and summary.csv from the run folders, and say what was chosen. trials: an Optuna
    sweep's {run name: (trial number, trial state)}."""
    rows = [_sweep_row(r) for r in runs]
    for row in rows:
        if trials:
            row["trial"], state = trials[row["run"]]
            if state in ("pruned", "running"):
                row["status"] = state
    summary = summarize_sweep(rows, varied)
    columns = ["run", *(["trial"] if trials else []), *varied, "seed", "status", "epochs", "final_val_top1",
               "best_val_top1", "best_val_epoch", "final_test_top1", "wall_seconds"]
    _write_csv(os.path.join(out_dir, "sweep.csv"), rows, columns)
    _write_csv(os.path.join(out_dir, "summary.csv"), summary,
               ["setting", *varied, "runs", "done", "final_val_top1_mean", "final_val_top1_std",
                "final_test_top1_mean", "final_test_top1_std", "chosen"])
    chosen = next((e for e in summary if e["chosen"]), None)
    log(sweep_table(summary))
    if chosen:
        log(f"chosen on validation: {chosen['setting']} (val top-1 {chosen['final_val_top1_mean']:.2%} over "
            f"{chosen['done']} seed{'s' * (chosen['done'] > 1)}); its test top-1, "
            f"{chosen['final_test_top1_mean']:.2%}, "
            f"is reported, not used to choose")
    log(f"wrote {os.path.join(out_dir, 'sweep.csv')} and summary.csv"
        + ("; stopped: the same command continues the sweep" if interrupted else ""))
    return SweepResult(rows, summary, chosen, out_dir, interrupted)


def sweep_table(summary: list) -> str:
    """The summary as an aligned text table, mean ± std over seeds."""
    def pm(entry, metric):
        if f"{metric}_mean" not in entry:
            return "-"
        std = entry[f"{metric}_std"]
        return f"{entry[metric + '_mean']:.2%}" + (f" ± {std:.2%}" if math.isfinite(std) else "")

    lines = [("setting", "runs done", "val top-1", "test top-1", "")]
    lines += [(e["setting"], f"{e['done']}/{e['runs']}", pm(e, "final_val_top1"), pm(e, "final_test_top1"),
               "<- chosen on val" if e["chosen"] else "") for e in summary]
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


_worker: dict = {}  # in a sweep's worker process: its device, the sweep's stop event, the dataset, and whether
#                    the sweep's own process has ended


class WorkerLost(Exception):
    """A worker process of a sweep ended without finishing its task (killed, out of memory): exit code 1."""


def _sweep_worker_init(devices, stop_event, data: cr.CifarData, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers through stop_event
    if threads:
        torch.set_num_threads(threads)
    cr.set_backend_flags()
    orphaned, parent = threading.Event(), multiprocessing.parent_process()

    def watch():  # however the sweep's process ends (a kill -9 too), its workers end: the run after its step,
        parent.join()  # with last.pt written, and the worker itself at once after, or a minute later at most
        orphaned.set()
        time.sleep(60)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    _worker.update(device=devices.get(), stop=stop_event, data=data, orphaned=orphaned)


def _worker_should_stop() -> bool:
    return _worker["stop"].is_set() or _worker["orphaned"].is_set()


def _in_worker(function, *args):
    """function(*args) in a worker; a worker whose sweep has ended exits once it returns."""
    result = function(*args)
    if _worker["orphaned"].is_set():
        os._exit(0)
    return result


def _sweep_worker_run(run: SweepRun) -> str:  # in a worker process
    if _worker_should_stop():  # handed over before the sweep stopped: left for the next invocation, untouched
        return "partial"
    prefix = f"[{run.name} on {_worker['device']}]"
    return _in_worker(_train_sweep_run, run, _worker["data"], lambda m: print(f"{prefix} {m}", flush=True),
                      _worker_should_stop, None, _worker["device"])


def _in_workers(function, tasks: list, devices: list, data: cr.CifarData, log, should_stop) -> bool:
    """function(task) for each task, in one process per device, each given `data`; returns True when stopped
    early. function returns "partial" or True for a task that stopped before its end."""
    import concurrent.futures

    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    queue, stop = context.Queue(), context.Event()
    for device in devices:
        queue.put(device)
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if all(d == "cpu" for d in devices) else 0
    log(f"sweep: {len(devices)} worker processes ({', '.join(devices)})")
    interrupted = False
    with concurrent.futures.ProcessPoolExecutor(len(devices), context, _sweep_worker_init,
                                                (queue, stop, data, threads)) as pool:
        futures = {pool.submit(function, task): task for task in tasks}
        pending = set(futures)

        def stop_all():  # running tasks stop after their step, with last.pt written; no other one starts
            stop.set()
            for future in pending:
                future.cancel()

        try:
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.2,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    if future.cancelled():
                        continue
                    try:
                        interrupted |= future.result() in ("partial", True)  # a worker's error is raised here
                    except concurrent.futures.process.BrokenProcessPool:
                        raise WorkerLost("a worker process of the sweep ended before its run did (killed, or out "
                                         "of memory); each run folder keeps its last checkpoint, and the same "
                                         "command continues the sweep") from None
                    if isinstance(tasks[0], SweepRun):
                        log(f"sweep: {_run_line(futures[future])}")
                if should_stop() and not stop.is_set():
                    stop_all()
                    interrupted = True
        except BaseException:  # a run's error ends the sweep now, not after the pool has run every other task
            stop_all()
            raise
    return interrupted


class _SweepStopped(Exception):
    """Raised out of an Optuna objective when the sweep was asked to stop: the trial is marked failed, and
    the next invocation continues its run folder."""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise cr.UserError('--search optuna needs optuna: pip install "cifar100_resnet[optuna]" (or pip install '
                           'optuna)') from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep says what happens (a stopped trial too)
    return optuna


def _suggest(trial, name: str, spec):
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    kind, low, high = spec
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(name, low, high, log=kind == "log")
    return trial.suggest_float(name, low, high, log=kind == "log")


def _worker_id() -> str:
    """Which process of which machine runs a trial (asked each time: a forked process is another one)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def _study_lock(out_dir: str):
    """One process of this machine at a time opens the study of out_dir, fails its dead trials and queues their
    runs again: a lock on the folder itself (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_study(out_dir: str, storage: Optional[str], study_name: Optional[str]):
    """The study in `storage` (default: optuna.db in out_dir), created by the first process to open it; one
    line naming the database when it cannot be opened."""
    optuna = _optuna()
    url = storage or "sqlite:///" + os.path.abspath(os.path.join(out_dir, "optuna.db"))
    # a heartbeat, so that a trial whose process was killed on another machine is marked failed and queued
    # again (its user attributes, the run folder among them, copied) by the next worker that opens the study
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # optuna >= 4.9
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" in optuna's terms since 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry_kwargs = ({"heartbeat_stale_trial_callback": retry(max_retry=3)} if retry else
                                {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3)})
                rdb = optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180, **retry_kwargs,
                                                 engine_kwargs={"connect_args": {"timeout": 60}}  # a busy database:
                                                 if url.startswith("sqlite") else None)  # wait, never fail
                study = optuna.create_study(storage=rdb, direction="maximize", load_if_exists=True,
                                            study_name=study_name or os.path.basename(os.path.abspath(out_dir)),
                                            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
                optuna.storages.fail_stale_trials(study)
            return study
        except ImportError as e:
            raise cr.UserError(f"--storage {url}: its database driver is not installed ({e}); pip install "
                               f"psycopg2-binary for PostgreSQL, pymysql for MySQL") from None
        except Exception as e:  # the database's own errors (SQLAlchemy's, sqlite3's): a bad URL, a damaged file
            first_line = (str(e).strip().splitlines() or [""])[0][:160]
            if "already exists" in first_line and attempt < 4:  # another process created the tables first
                time.sleep(0.2 * (attempt + 1))
                continue
            raise cr.UserError(f"cannot open the study's database {url} ({type(e).__name__}: {first_line})") from None


def _fail_dead_trials(study) -> None:
    """Mark failed the trials left running by processes of this machine that are gone (a kill -9): the
    heartbeat would take minutes to notice, and their runs continue at once."""
    optuna = _optuna()
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker_host, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if worker_host == host and pid.isdigit():
            try:
                os.kill(int(pid), 0)  # signal 0 sends nothing: does the process exist?
            except ProcessLookupError:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            except OSError:
                pass


def _queue_unfinished(study, out_dir: str, epochs: int) -> None:
    """Queue again, with its setting and run folder, every failed trial of this machine whose run stopped
    before its end (a Ctrl-C, a kill) and that no other trial continues: the run goes on from its last.pt."""
    optuna = _optuna()
    host = socket.gethostname()
    trials = study.get_trials(deepcopy=False)
    claimed = {t.user_attrs.get("run") for t in trials if t.state != optuna.trial.TrialState.FAIL}
    for t in trials:
        run = t.user_attrs.get("run")
        if t.state != optuna.trial.TrialState.FAIL or not run or run in claimed or \
                t.user_attrs.get("worker", host + ":").rsplit(":", 1)[0] != host:
            continue
        if run_status(os.path.join(out_dir, "runs", run), epochs) in ("partial", "pending"):
            study.enqueue_trial(t.params, user_attrs={"run": run, "resumes": t.number})
            claimed.add(run)


def _optuna_loop(base: cr.TrainConfig, out_dir: str, space: dict, trials: int, storage: Optional[str],
                 study_name: Optional[str], sample_seed: int, data: cr.CifarData, log, should_stop,
                 device: Optional[str] = None) -> bool:
    """Run trials until the study holds `trials` complete or pruned ones; returns True when stopped early.

    The n-th new setting of a study is drawn with a seed of its own (from sample_seed and n), whatever came
    before it: a study stopped and continued proposes what an uninterrupted one does."""
    optuna = _optuna()
    with _study_lock(out_dir):
        study = _open_study(out_dir, storage, study_name)
        _fail_dead_trials(study)
        _queue_unfinished(study, out_dir, base.epochs)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial):
        name = trial.user_attrs.get("run") or f"trial-{trial.number:04d}"
        trial.set_user_attr("run", name)
        trial.set_user_attr("worker", _worker_id())
        if "resumes" not in trial.user_attrs:  # a new setting (a continued run keeps its own)
            runs = {t.user_attrs.get("run") for t in study.get_trials(deepcopy=False)} - {None, name}
            study.sampler = optuna.samplers.TPESampler(seed=(sample_seed * 1_000_003 + len(runs)) % 2 ** 32)
        setting = {k: _suggest(trial, k, space[k]) for k in space}
        run = SweepRun(setting, base.seed, dataclasses.replace(base, **setting,
                                                               out_dir=os.path.join(out_dir, "runs", name)), name)
        _check_sweep_run(run)
        pruned = []

        def on_epoch(row):
            trial.report(row["val_top1"], row["epoch"])
            if trial.should_prune():
                pruned.append(row["epoch"])

        log(f"sweep: trial {trial.number} ({name}): {setting_name(setting)}")
        status = _train_sweep_run(run, data, lambda m: log(f"[{name}] {m}"), lambda: bool(pruned) or should_stop(),
                                  on_epoch, device)
        row = _sweep_row(run)
        if "final_test_top1" in row:
            trial.set_user_attr("test_top1", row["final_test_top1"])
        if pruned:
            raise optuna.TrialPruned(f"val top-1 below the median of earlier trials at epoch {pruned[0]}")
        if status == "partial":  # optuna marks it failed; the next invocation continues its run
            raise _SweepStopped()
        if status == "diverged":
            raise cr.TrainingDiverged(f"trial {trial.number} diverged")
        return row["final_val_top1"]

    if sum(t.state in finished for t in study.get_trials(deepcopy=False)) >= trials:
        return False
    try:
        study.optimize(objective, catch=(cr.TrainingDiverged,),
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished)])
    except _SweepStopped:
        return True
    return False


def _optuna_worker_run(args: tuple) -> bool:
    return _in_worker(_optuna_loop, *args, _worker["data"], lambda m: print(f"[{_worker['device']}] {m}", flush=True),
                      _worker_should_stop, _worker["device"])


def _optuna_sweep(base: cr.TrainConfig, out_dir: str, space: dict, trials: int, storage: Optional[str],
                  study_name: Optional[str], sample_seed: int, devices: Optional[list], data: Optional[cr.CifarData],
                  log, should_stop) -> SweepResult:
    """The sweep as an Optuna study: TPE sampling, median pruning on each epoch's val top-1, trials stored in
    `storage` (default: optuna.db in out_dir), so that workers on other machines can join the same study."""
    _optuna()  # installed?
    if not space or trials < 1:
        raise cr.UserError("--search optuna needs --random N (the trials the study should hold) and what to vary")
    plan_sweep(base, out_dir, [{}], [base.seed])  # checks --val-split and the base settings
    ends = [dataclasses.replace(base, **{name: value}) for name, spec in space.items()
            for value in (spec if isinstance(spec, list) else spec[1:])]
    for config in ends:  # each end of a range must be a valid value
        config.validate()
    _saved_sweep(out_dir, "optuna", base, list(space))
    if data is None:
        data = cr.load_dataset(base.data_dir, base.dataset, base.download)
    for config in [base, *ends]:
        _check_fits(SweepRun({}, base.seed, config, "of the study"), data)
    created = not os.path.exists(out_dir)
    make_folder(out_dir)
    try:
        with _study_lock(out_dir):
            study = _open_study(out_dir, storage, study_name)
    except cr.UserError:
        if created:  # leave nothing behind
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, "optuna.db"))
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        raise
    make_folder(os.path.join(out_dir, "runs"))
    remove_stale_temporaries(out_dir)
    cr.atomic_save(json.dumps({"base": base.saved(), "search": "optuna", "space": space, "trials": trials,
                               "study": study.study_name, "storage": storage or "optuna.db", "varied": list(space)},
                              indent=2, default=list) + "\n", os.path.join(out_dir, "sweep.json"))
    log(f"sweep: Optuna study {study.study_name!r} ({storage or os.path.join(out_dir, 'optuna.db')}), {trials} "
        f"trials wanted, {len(study.trials)} in it; choosing on the last {base.val_split} training images "
        f"(validation), the test set only reported")
    loop = (base, out_dir, space, trials, storage, study_name, sample_seed)
    if devices and len(devices) > 1:  # each worker its own sampler seed, or they would propose the same trials
        loops = [loop[:-1] + (sample_seed + 1000 * i,) for i in range(len(devices))]
        interrupted = _in_workers(_optuna_worker_run, loops, devices, data, log, should_stop)
    else:
        interrupted = _optuna_loop(*loop, data, log, should_stop, devices[0] if devices else None)
    # (a trial of another process may not have drawn its setting yet)
    latest = {t.user_attrs["run"]: t for t in study.trials if "run" in t.user_attrs and set(space) <= set(t.params)}
    runs, states = [], {}
    for name, t in sorted(latest.items()):
        setting = {k: t.params[k] for k in space if k in t.params}
        runs.append(SweepRun(setting, base.seed, dataclasses.replace(
            base, **setting, out_dir=os.path.join(out_dir, "runs", name)), name))
        states[name] = (t.number, t.state.name.lower())
    return _finish_sweep(runs, list(space), out_dir, log, interrupted, states)


def lr_find_main(argv: list) -> int:
    """`lr-find [train flags] [--start R] [--end R] [--steps N]`: the learning-rate range test."""
    parser = cr.command_parser("lr-find", "The learning-rate range test: real training steps of the configured "
                                  "recipe while the rate grows exponentially; prints a suggested peak rate and "
                                  "writes lr_find.csv and lr_find.png into --out-dir. Takes every train flag.",
                                  train_flags=True)
    group = parser.add_argument_group("lr-find")
    group.add_argument("--start", type=float, default=1e-5, help="the first rate (default: 1e-05)")
    group.add_argument("--end", type=float, default=10.0, help="the last rate (default: 10)")
    group.add_argument("--steps", type=int, default=300, help="mini-batches, one rate each: a network learning "
                       "from scratch needs a few hundred before its loss moves (default: 300)")
    args = parser.parse_args(argv)
    if args.resume is not None:
        raise cr.UserError("lr-find starts from the initial weights of its settings; --resume is for training")
    config = cr.config_from_args(args)
    config.validate()  # the settings and the rates, before the data is read and the first line printed
    _check_lr_range(args.start, args.end, args.steps)
    out = config.out_dir or os.path.join("runs", "lr-find-" + time.strftime("%Y%m%d-%H%M%S"))
    if all(os.path.exists(os.path.join(out, name)) for name in ("lr_find.csv", "lr_find.png")):  # png: the last
        raise cr.UserError(f"{out} already holds a finished lr-find (lr_find.csv, lr_find.png); pass another "
                           f"--out-dir")
    cr.RunFolder(out).check_writable()
    remove_stale_temporaries(out)
    cr.set_backend_flags()
    try:
        data = cr.load_dataset(config.data_dir, config.dataset, config.download)
        result = lr_find(config, data, args.start, args.end, args.steps, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        print(f"error: lr-find stopped by Ctrl-C before it wrote anything into {out}", file=sys.stderr)
        return 130
    print(f"lr-find: {len(result.rates)} step{'s' * (len(result.rates) > 1)}"
          + (f"; stopped early: {result.stopped_early}" if result.stopped_early else ""))
    print(f"suggested peak learning rate: {result.suggestion:.3g} for batch {config.batch_size} ({result.rule})")
    make_folder(out)
    print(f"wrote {' and '.join(write_lr_find(result, out))}")
    return 0


def sweep_main(argv: list) -> int:
    """`sweep [train flags] --grid NAME=V1,V2 ... | --random N NAME=RANGE ... [--seeds 0,1] [--devices ...]`."""
    parser = cr.command_parser("sweep", "Train many runs from one command, each in "
                               "--out-dir/runs/<setting>,seed=<seed>/, and choose the setting on held-out training "
                               "images (--val-split), reporting its test top-1 beside it. Running the same command "
                               "again skips finished runs and continues an interrupted one. Takes every train flag "
                               "as the base of every run.", train_flags=True)
    for action in parser._actions:
        if action.dest == "val_split":
            action.default = SWEEP_VAL_SPLIT
            action.help = action.help.replace("(default: 0)", f"(default: {SWEEP_VAL_SPLIT} in a sweep)")
    group = parser.add_argument_group("sweep")
    group.add_argument("--grid", nargs="+", action="extend", metavar="NAME=V1,V2", help="every combination of "
                       "these values (any train setting: lr=0.05,0.1 weight_decay=5e-4,1e-3)")
    group.add_argument("--random", nargs="+", action="append", metavar="N NAME=RANGE", help="N settings drawn from "
                       "ranges: lr=log:0.01:1 (log-uniform), momentum=0.8:0.95 (uniform), arch=resnet18,resnet34 "
                       "(choice)")
    group.add_argument("--seeds", default="0", help="train each setting once per seed (default: 0)")
    group.add_argument("--devices", help="cuda:0,cuda:1,...: one worker process per device, side by side "
                       "(default: --device, one run at a time)")
    group.add_argument("--search", choices=["optuna"], help="optuna: an Optuna study instead, of --random N "
                       "trials (TPE sampling, pruning on each epoch's val top-1); needs pip install optuna")
    group.add_argument("--storage", help="with --search optuna: the study's database URL, shared by workers on "
                       "several machines (default: sqlite in --out-dir)")
    group.add_argument("--study", help="with --search optuna: the study's name (default: --out-dir's name)")
    group.add_argument("--sample-seed", type=int, default=0, help="seeds the drawing of --random settings "
                       "(default: 0)")
    args = parser.parse_args(argv)
    if args.resume is not None:
        raise cr.UserError("a sweep continues when the same command runs again; --resume is for training")
    if not args.out_dir:
        raise cr.UserError("sweep needs --out-dir: the folder of its runs (the same command continues it later)")
    if bool(args.grid) == bool(args.random):
        raise cr.UserError("sweep needs --grid NAME=V1,V2 ... or --random N NAME=RANGE ..., one of the two")
    if args.random and len(args.random) > 1:  # (repeated --grid flags add up: action="extend")
        raise cr.UserError("--random is given twice: one --random N NAME=RANGE NAME=RANGE ... draws N settings of "
                           "them all")
    random_spec = args.random[0] if args.random else None
    grid = space = None
    trials = 0
    if args.grid:
        grid = parse_sweep_specs(args.grid)
    else:
        if not random_spec[0].isdigit() or int(random_spec[0]) < 1:
            raise cr.UserError(f"--random needs the number of settings first, then NAME=RANGE specs; got "
                               f"{random_spec[0]!r}")
        trials, space = int(random_spec[0]), parse_sweep_specs(random_spec[1:], ranges=True)
    if args.search and grid is not None:
        raise cr.UserError("--search optuna samples ranges: use --random N NAME=RANGE ...")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise cr.UserError(f"--seeds must be integers separated by commas, got {args.seeds!r}") from None
    devices = [d.strip() for d in args.devices.split(",")] if args.devices is not None else None
    for device in devices or []:
        cr.resolve_device(device)
    config = cr.config_from_args(args)
    cr.set_backend_flags()
    console = cr.Console(sys.stdout)
    with cr.StopSignals("stopping the sweep: each running run writes last.pt after its step") as stop:
        try:
            result = sweep(config, args.out_dir, grid, space, trials, seeds, devices, args.sample_seed,
                           log=console.log, should_stop=stop.requested, search=args.search or "",
                           storage=args.storage, study_name=args.study)
        except WorkerLost as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return stop.exit_code if result.interrupted and stop.requested() else 0


# ----------------------------------------------------------------------------------------------------------
# Learning curves from metrics.csv (matplotlib, an optional extra: pip install "cifar100_resnet[plot]")


SCHEDULE_POINTS = 200_000  # a figure is 1,100 pixels wide: a longer schedule is drawn at every k-th step
SCHEDULE_RESTARTS = 100  # restarts marked and listed (a schedule with more shows none of them apart)


def schedule_per_step(config: cr.TrainConfig, t0: float, steps_per_epoch: int, epochs: float) -> tuple:
    """(fractional epochs, rates) at every step of the first `epochs` epochs (every k-th step, when there are
    SCHEDULE_POINTS or more): the rate the run sets."""
    steps = int(round(epochs * steps_per_epoch))
    points = [i / steps_per_epoch for i in range(0, steps, max(1, steps // (SCHEDULE_POINTS // 2)))]
    return points, [cr.learning_rate(x, config, t0) for x in points]


def _cifar_steps_per_epoch(config: cr.TrainConfig) -> int:
    """Steps per epoch of a run on the full CIFAR training set (50,000 images), before any data is read."""
    return math.ceil((min(config.limit_train or 50_000, 50_000) - config.val_split) / config.batch_size)


def _run_settings(run_dir: str) -> Optional[tuple]:
    """(settings, first cycle, steps per epoch) of a run folder, from its config.json (0.3 or later); None
    without one."""
    folder = cr.RunFolder(run_dir)
    saved = folder.saved_config()
    if saved is None or not {"t0_resolved", "steps_per_epoch"} <= set(saved):
        return None
    config, t0, steps = cr.TrainConfig.from_dict(saved), saved["t0_resolved"], saved["steps_per_epoch"]
    try:
        config.validate()
        if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not t0 > 0:
            raise cr.UserError(f"t0_resolved must be a positive number, got {t0!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise cr.UserError(f"steps_per_epoch must be a positive integer, got {steps!r}")
    except cr.UserError as e:
        raise cr.UserError(f"{folder.file('config.json')} does not hold a run's settings: {e}") from None
    return config, t0, steps


def _run_schedule(run_dir: str, epochs: float):
    """The per-step schedule of a run folder's first `epochs` epochs (schedule_per_step); None without one."""
    settings = _run_settings(run_dir)
    return None if settings is None else schedule_per_step(*settings, epochs)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise cr.UserError('the figures need matplotlib: pip install "cifar100_resnet[plot]" (or pip install '
                        'matplotlib)') from None
    return plt


def _names_height(count: int, columns: int) -> float:
    """Inches a legend of `count` names in `columns` columns takes under a figure's panels."""
    return 0.1 + 0.25 * math.ceil(count / columns)


def _lay_out_above_names(fig, handles: list, labels: list, columns: int, height: float, fontsize: int) -> None:
    """Lay the panels out above a legend of the runs (or settings) of `height` inches, one name per colour,
    where it covers no curve; height 0: no such legend."""
    if height:
        fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=fontsize, frameon=False)
    fig.tight_layout(rect=(0, height / fig.get_size_inches()[1], 1, 1))


def _save(fig, path: str, dpi: int = 110) -> str:
    """Write the figure as a PNG (its folder created if need be; atomically, as every file here), close it,
    return the path."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, dpi=dpi, format="png")
    plt.close(fig)
    make_folder(os.path.dirname(os.path.abspath(path)))
    cr.atomic_save(png.getvalue(), path)
    return path


def plot_schedule(config: cr.TrainConfig, out_path: str, steps_per_epoch: Optional[int] = None,
                  trained: Optional[int] = None) -> dict:
    """Draw the learning rate a run with these settings will set at every step (steps_per_epoch: by default
    those of the full training set in one process): the restarts and the run's end marked, and with `trained`,
    the epochs a run has done so far. Returns where the run ends: {"end_fraction": rate at the end / peak,
    "restarts": [epochs] (the first SCHEDULE_RESTARTS + 1 at most), "into_cycle": epochs into the last cycle,
    "cycle": its length}."""
    plt = _pyplot()
    config.validate()
    t0 = config.first_cycle
    points, rates = schedule_per_step(config, t0, steps_per_epoch or _cifar_steps_per_epoch(config), config.epochs)
    restarts, start, length = [], config.warmup_epochs + t0, t0
    while start < config.planned_epochs - 1e-9 and len(restarts) <= SCHEDULE_RESTARTS:
        restarts.append(start)
        length *= config.t_mult
        start += length
    into, cycle, end = cr.schedule_end(config, t0)
    if config.extended_from:  # each extension restarts with a cycle of its own: the run ends at its bottom
        restarts = (restarts + list(config.extended_from))[:SCHEDULE_RESTARTS + 1]
        into, cycle, end = 0.0, config.epochs - config.extended_from[-1], config.min_lr / config.lr

    extended = f" (extended from {' then '.join(map(str, config.extended_from))})" if config.extended_from else ""
    fig, ax = plt.subplots(figsize=(10, 4.4))
    ax.plot(points, rates, label="learning rate at each step")
    marked = "warm restart" + (f" (the first {SCHEDULE_RESTARTS} marked)" if len(restarts) > SCHEDULE_RESTARTS else "")
    for i, x in enumerate(restarts[:SCHEDULE_RESTARTS]):
        ax.axvline(x, color="grey", linestyle=":", label=marked if i == 0 else None)
    ax.plot([config.epochs], [end * config.lr], "o", color="tab:red",
            label=f"the run ends (epoch {config.epochs}): {end:.0%} of the peak rate")
    if trained is not None:
        ax.axvspan(0, trained, color="tab:green", alpha=0.12, label=f"trained so far: {trained} epochs")
    ax.set(title=f"planned learning rate: {config.epochs} epochs, t0 {'auto = ' if config.t0 is None else ''}"
                 f"{t0:.4g}, t_mult {config.t_mult:g}, warm-up {config.warmup_epochs:g}, peak {config.lr:g}{extended}",
           xlabel="epoch", ylabel="learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    _save(fig, out_path)
    return {"end_fraction": end, "restarts": restarts, "into_cycle": into, "cycle": cycle}


# the top-1 curves drawn beside the test set's where a run measured them: (column, line style, marker, name)
OTHER_TOP1 = (("val_top1", "--", "s", "val top-1"), ("test_ema_top1", "-.", "D", "EMA top-1"),
              ("test_tta_top1", (0, (3, 1, 1, 1, 1, 1)), "v", "flip-TTA top-1"),
              ("test_bnrecal_top1", (0, (6, 2, 1, 2, 1, 2)), "P", "BN-recal top-1"))


def plot_runs(run_dirs: list, out_path: str, labels: Optional[list] = None) -> str:
    """Draw loss, accuracy and learning rate of one or more runs into one PNG; returns its path. The accuracy
    panel also draws the OTHER_TOP1 curves a run measured (--val-split, --ema, --tta, --bn-recal); the rate is
    drawn per step from each run's config.json (per epoch from metrics.csv without one)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    runs, schedules = [], []  # every file read and checked before anything is drawn
    for run_dir in run_dirs:
        rows = read_run_metrics(run_dir)
        if not rows:
            raise cr.UserError(f"{run_dir} has no metrics.csv rows to plot")
        runs.append(rows)
        schedules.append(_run_schedule(run_dir, max(r["epoch"] for r in rows)))
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]

    def column(rows, name):
        return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]

    # one colour per run, named once in a legend under the panels (however many runs); each panel's own
    # legend says only what its line styles mean
    legend_columns = min(len(runs), 4)
    legend_height = _names_height(len(runs), legend_columns)
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.5 + legend_height), sharex=True)  # epochs aligned
    colours, per_epoch_rate, measured = [], False, set()
    for rows, schedule in zip(runs, schedules):
        epochs = column(rows, "epoch")
        one = len(rows) == 1  # a line of one point is not drawn: a marker is, one shape for each curve
        (line,) = ax_loss.plot(epochs, column(rows, "test_loss"), marker="o" if one else None)
        colours.append(line.get_color())
        ax_loss.plot(epochs, column(rows, "train_loss"), "--", color=line.get_color(), marker="x" if one else None)
        ax_acc.plot(epochs, [100 * v for v in column(rows, "test_top1")], color=line.get_color(),
                    marker="o" if one else None)
        ax_acc.plot(epochs, [100 * v for v in column(rows, "test_top5")], ":", color=line.get_color(),
                    marker="^" if one else None)
        for name, style, marker, _ in OTHER_TOP1:  # what the run also measured: --val-split, --ema, --tta, ...
            values = column(rows, name)
            if not all(math.isnan(v) for v in values):
                ax_acc.plot(epochs, [100 * v for v in values], linestyle=style, color=line.get_color(), marker=marker,
                            markersize=4, markevery=max(1, len(rows) // 10))  # sparse markers tell them apart
                measured.add(name)
        if schedule is not None:
            ax_lr.plot(*schedule, color=line.get_color())
        else:  # no config.json to compute it from
            ax_lr.plot(epochs, column(rows, "lr"), "o-", color=line.get_color())
            per_epoch_rate = True
    losses = [v for rows in runs for k in ("test_loss", "train_loss") for v in column(rows, k) if v > 0]
    wide = bool(losses) and max(losses) > 10 * min(losses)  # a spike would flatten the rest on a linear axis
    ax_loss.set(title="loss" + (" (log scale)" if wide else ""), xlabel="epoch", ylabel="cross-entropy",
                yscale="log" if wide else "linear")
    ax_acc.set(title="accuracy" if "val_top1" in measured else "test accuracy", xlabel="epoch", ylabel="%")
    per_step = any(schedule is not None for schedule in schedules)
    ax_lr.set(title="learning rate " + ("(per step)" if per_step else "(at epoch starts)"), xlabel="epoch",
              ylabel="rate")

    def key(ax, styles):
        ax.legend([plt.Line2D([], [], color="dimgrey", linestyle=style, marker=marker) for style, marker, _ in styles],
                  [text for _, _, text in styles], fontsize=8)

    single = any(len(rows) == 1 for rows in runs)
    key(ax_loss, [("-", "o" if single else None, "test"), ("--", "x" if single else None, "train")])
    key(ax_acc, [("-", "o" if single else None, "top-1"), (":", "^" if single else None, "top-5")]
        + [(style, marker, text) for name, style, marker, text in OTHER_TOP1 if name in measured])
    if per_epoch_rate:  # (the "per step" line only where a run has one)
        key(ax_lr, [("-", None, "per step")] * per_step + [("-", "o", "at epoch starts (a run without config.json)")])
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(left=0)  # the run's start (and room around a run of one epoch)
    _lay_out_above_names(fig, [plt.Line2D([], [], color=c, linewidth=2.5) for c in colours], labels,
                         legend_columns, legend_height, fontsize=9)
    return _save(fig, out_path)


def plot_lr_find(result: LRFindResult, out_path: str) -> str:
    """The range test's loss against the rate (log axis), the suggestion marked; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    one = len(result.rates) == 1  # (stopped after its first step): a marker, as a line of one point is not drawn
    ax.plot(result.rates, result.losses, color="tab:blue", alpha=0.25, linewidth=1, label="loss of each step")
    ax.plot(result.rates, result.smoothed, color="tab:blue", label="smoothed loss", marker="o" if one else None)
    ax.axvline(result.suggestion, color="tab:red", linestyle="--",
               label=f"suggested peak rate {result.suggestion:.3g}")
    if one:  # (matplotlib warns of a range of zero width)
        ax.set_xlim(result.rates[0] / 3, result.rates[0] * 3)
    ax.set(xscale="log", xlabel="learning rate (log scale)", ylabel="training loss (mixed, label-smoothed)",
           title=f"learning-rate range test: {len(result.rates)} step{'s' * (not one)}, "
                 f"{result.rates[0]:.2g} to {result.rates[-1]:.2g}")
    low, high = min(result.losses), max(result.losses[:max(1, len(result.losses) // 10)] + [result.smoothed[0]])
    if high <= low:  # the loss only rose (a test of 2 steps, say) or never moved: show all of it
        high = max(result.losses + result.smoothed)
    span = high - low or abs(low) / 10 or 1.0  # (matplotlib warns of a range of zero height)
    ax.set_ylim(low - 0.05 * span, high + 0.1 * span)  # a divergence would flatten the rest
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return _save(fig, out_path)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def plot_sweep(sweep_dir: str, out_path: str) -> str:
    """A sweep's validation top-1 per epoch (the mean over seeds, a band from lowest to highest seed), and the
    final val top-1 of each run against each varied setting (log axis for a range spanning 10x or more), each
    run that diverged an x at 0 there."""
    plt = _pyplot()
    try:
        with open(os.path.join(sweep_dir, "sweep.json")) as f:
            varied = json.load(f)["varied"]
    except (OSError, ValueError, KeyError):
        raise cr.UserError(f"{sweep_dir} holds no sweep (sweep.json)") from None
    table = os.path.join(sweep_dir, "sweep.csv")
    every = read_metrics(table, columns=("run", "final_val_top1", *varied))
    rows = [r for r in every if r["final_val_top1"]]  # the runs with a curve (one that diverged late too)
    diverged = [r for r in every if r.get("status") == "diverged"]  # each an x at 0 against its settings
    if not rows:
        raise cr.UserError(f"every run of {sweep_dir} diverged in its first epoch (each folder's {DIVERGED_FILE} "
                           f"says where): nothing to plot" if every and len(diverged) == len(every) else
                           f"{sweep_dir} has no finished epochs to plot yet")
    if not all(isinstance(_number(r["final_val_top1"]), float) for r in rows):
        raise cr.UserError(f"{table}: a final_val_top1 is not a number")
    chosen = {r["setting"] for r in read_metrics(os.path.join(sweep_dir, "summary.csv"), ("setting", "chosen"))
              if r["chosen"]}
    groups: dict = {}
    for row in rows:
        groups.setdefault(setting_name({k: _number(row[k]) for k in varied}), []).append(row)
    curves_of = {m["run"]: [100 * r["val_top1"] for r in read_metrics(
        os.path.join(sweep_dir, "runs", m["run"], "metrics.csv"), numbers=("val_top1",))] for m in rows}

    shown = varied[:3]
    # more than 4 settings: their names go under the panels, where they cover no curve
    legend_columns, below = 3, len(groups) > 4
    legend_height = _names_height(len(groups), legend_columns) if below else 0.0
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(7 + 4.2 * len(shown), 4.8 + legend_height), squeeze=False)
    ax = axes[0][0]
    for setting, members in groups.items():
        curves = [curves_of[m["run"]] for m in members]
        length = min(len(c) for c in curves)
        epochs = list(range(1, length + 1))
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(length)]
        label = (setting if setting != "base" else "run") + (f" ({len(curves)} seeds)" if len(curves) > 1 else "") \
            + (" - chosen on val" if setting in chosen else "") \
            + (" - diverged" if any(m.get("status") == "diverged" for m in members) else "")
        (line,) = ax.plot(epochs, mean, linewidth=2.5 if setting in chosen else 1.5, label=label,
                          marker="o" if length == 1 else None)  # one point: a marker, as a line is not drawn
        if len(curves) > 1:
            ax.fill_between(epochs, [min(c[i] for c in curves) for i in range(length)],
                            [max(c[i] for c in curves) for i in range(length)], color=line.get_color(), alpha=0.2)
    ax.set(title="validation top-1 per epoch" + (" (mean over seeds, band: lowest to highest)"
                                                 if any(len(m) > 1 for m in groups.values()) else ""),
           xlabel="epoch", ylabel="val top-1 (%)")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax.get_legend_handles_labels()
    if not below:
        ax.legend(fontsize=8)
    scored = [r for r in rows if r.get("status") != "diverged"]  # a run's final top-1, or its x: never both
    for ax, name in zip(axes[0][1:], shown):
        values = [_number(r[name]) for r in scored + diverged]
        finals = [100 * float(r["final_val_top1"]) for r in scored]
        numeric = all(isinstance(v, float) for v in values)
        if not numeric:
            categories = sorted(set(map(str, values)))
            values = [categories.index(str(v)) for v in values]
            ax.set_xticks(range(len(categories)), categories)
        values, diverged_at = values[:len(scored)], values[len(scored):]
        ax.plot(values, finals, "o", alpha=0.6, label="each run")
        means = {}
        for v, final in zip(values, finals):
            means.setdefault(v, []).append(final)
        xs = sorted(means)
        ax.plot(xs, [sum(means[x]) / len(means[x]) for x in xs], "-", color="tab:red", label="mean over runs")
        if diverged:
            ax.plot(diverged_at, [0.0] * len(diverged), "x", color="black", markersize=8, label="diverged")
        swept = sorted(set(xs) | set(diverged_at))
        if numeric and min(swept) > 0 and max(swept) >= 10 * min(swept):
            ax.set_xscale("log")
        if numeric and len(swept) <= 8:  # the values swept, as written, instead of the axis' own ticks
            from matplotlib.ticker import NullFormatter
            ax.set_xticks(swept, [f"{x:g}" for x in swept])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=f"final val top-1 against {name}", xlabel=name + (" (log scale)" if ax.get_xscale() == "log"
                                                                       else ""), ylabel="final val top-1 (%)")
        ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.grid(alpha=0.3, which="both")
    _lay_out_above_names(fig, handles, labels, legend_columns, legend_height, fontsize=8)
    return _save(fig, out_path)


def _plot_schedule_main(argv: list) -> int:
    """`plot --schedule`: of train flags, or of a run folder."""
    parser = cr.command_parser("plot --schedule", "the learning rate a run with these train flags would set "
                               "at every step, before training; or the one a run folder's run sets",
                               train_flags=True)
    parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR", type=os.path.expanduser,
                        help="a run folder: the schedule of its own settings (with no train flags beside it), the "
                             "epochs it has trained marked")
    parser.add_argument("--out", type=os.path.expanduser,
                        help="PNG to write (default: schedule.png, in RUN_DIR with one)")
    args = parser.parse_args(argv)
    out, steps, trained = args.out, None, None
    if args.run_dir is None:
        config, out = cr.config_from_args(args), out or "schedule.png"
    else:
        flags = sorted({word.split("=")[0] for word in argv if word.startswith("-")} - {"--out"})
        if flags:
            raise cr.UserError(f"plot --schedule {args.run_dir} draws that run's own schedule: train flags beside "
                               f"it ({' '.join(flags)}) would not change it; drop them, or the folder")
        if not os.path.isdir(args.run_dir):
            raise cr.UserError(f"{args.run_dir} is not a run folder")
        settings = _run_settings(args.run_dir)
        if settings is None:
            raise cr.UserError(f"{args.run_dir} holds no run's settings (no config.json of version 0.3 or later)")
        config, _, steps = settings
        trained = max((int(r["epoch"]) for r in read_run_metrics(args.run_dir)), default=0)
        out = out or os.path.join(args.run_dir, "schedule.png")
    r = plot_schedule(config, check_png(out), steps, trained)
    where = (f"{r['into_cycle']:g} epoch{'s' * (r['into_cycle'] != 1)} into a {r['cycle']:g}-epoch cycle"
             if r["into_cycle"] > 1e-6 else "at the end of a cycle")
    restarts = ", ".join(f"{x:.4g}" for x in r["restarts"][:SCHEDULE_RESTARTS]) or "none"
    if len(r["restarts"]) > SCHEDULE_RESTARTS:
        restarts += f" and more (the first {SCHEDULE_RESTARTS} marked)"
    done = f"; trained so far: {trained} of {config.epochs} epochs" if trained is not None else ""
    print(f"wrote {out}: the run ends {where}, at {r['end_fraction']:.0%} of the peak rate; restarts at epochs "
          f"{restarts}{done}")
    return 0


def plot_main(argv: list) -> int:
    """`plot RUN_DIR [RUN_DIR ...] [--out FILE]`: learning curves of one run, or several compared; of a sweep
    when RUN_DIR is a sweep folder.
    `plot --schedule [train flags] [--out FILE]`: the learning rate those flags would set, before training.
    `plot --schedule RUN_DIR [--out FILE]`: the learning rate that run sets, the epochs it has trained marked."""
    if "--schedule" in argv:
        return _plot_schedule_main([a for a in argv if a != "--schedule"])
    p = cr.command_parser("plot", "learning curves of one run, or several compared; the runs of a sweep (a sweep "
                          "folder); or, with --schedule and train flags, the planned learning rate")
    p.add_argument("run_dirs", nargs="+", type=os.path.expanduser,
                   help="run folders holding metrics.csv, or one sweep folder")
    p.add_argument("--out", type=os.path.expanduser,
                   help="PNG to write (default: curves.png in the first run folder, sweep.png in a sweep folder)")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: the folder names)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.run_dirs):
        raise cr.UserError(f"--labels needs one label per run folder ({len(args.run_dirs)}), got {len(args.labels)}")
    if len(args.run_dirs) == 1 and os.path.exists(os.path.join(args.run_dirs[0], "sweep.json")):
        out = check_png(args.out or os.path.join(args.run_dirs[0], "sweep.png"))
        print(f"wrote {plot_sweep(args.run_dirs[0], out)}")
        return 0
    out = check_png(args.out or os.path.join(args.run_dirs[0], "curves.png"))
    print(f"wrote {plot_runs(args.run_dirs, out, args.labels)}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Understanding a run: what it gets wrong (report), what the network sees (preview-aug), what a convolution
# does (conv-demo). Numbers are computed without matplotlib; the figures need it.


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted] (int64)."""
    flat = labels.long().cpu() * num_classes + predictions.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_metrics(confusion: torch.Tensor) -> list:
    """For each class: support (its images), recall = accuracy on its images, precision = the share of the
    images predicted as it that are it (0 when never predicted)."""
    hits, support, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    recall = [float(hits[i] / max(int(support[i]), 1)) for i in range(len(confusion))]
    return [{"class": i, "support": int(support[i]), "accuracy": recall[i], "recall": recall[i],
             "precision": float(hits[i] / predicted[i]) if predicted[i] else 0.0} for i in range(len(confusion))]


def most_confused_pairs(confusion: torch.Tensor, k: int = 20) -> list:
    """The k largest off-diagonal counts: [(true class, predicted class, count)], most first."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(k, off.numel()))
    n = len(confusion)
    return [(int(i) // n, int(i) % n, int(c)) for c, i in zip(counts, flat) if c > 0]


def calibration(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Expected calibration error (Guo et al. 2017): images binned by their confidence (the top probability)
    into `bins` equal intervals of (0, 1]; ECE = sum over bins of (images in it / N) x |accuracy - mean
    confidence|. Returns {"ece", "bins": [{"low", "high", "count", "confidence", "accuracy"}]}."""
    confidence, predicted = probabilities.float().max(1)
    correct = (predicted == labels).float()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1  # (low, high]: 1.0 falls in the last bin
    table, ece, n = [], 0.0, len(labels)
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        row = {"low": b / bins, "high": (b + 1) / bins, "count": count, "confidence": float("nan"),
               "accuracy": float("nan")}
        if count:
            row.update(confidence=float(confidence[members].mean()), accuracy=float(correct[members].mean()))
            ece += count / n * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return {"ece": ece, "bins": table}


def analyse_predictions(logits: torch.Tensor, labels: torch.Tensor, data: cr.CifarData) -> dict:
    """Everything `report` shows, as numbers: top-1/top-5, per-class metrics, the confusion matrix and its
    most confused pairs, calibration, and for CIFAR-100 the superclass accuracy and the share of errors that
    stay inside the right superclass."""
    logits, labels = logits.float().cpu(), labels.cpu()
    probabilities = logits.softmax(1)
    predictions = logits.argmax(1)
    confusion = confusion_matrix(predictions, labels, len(data.classes))
    result = {"n": len(labels), **cr.classification_metrics(logits, labels), "per_class": per_class_metrics(confusion),
              "confusion": confusion, "confused_pairs": most_confused_pairs(confusion),
              "calibration": calibration(probabilities, labels), "predictions": predictions,
              "confidence": probabilities.max(1).values}
    if data.superclass_of is not None:
        true_super, predicted_super = data.superclass_of[labels], data.superclass_of[predictions]
        wrong = predictions != labels
        result["superclass_top1"] = float((true_super == predicted_super).float().mean())
        result["errors_in_right_superclass"] = (float((true_super == predicted_super)[wrong].float().mean())
                                                if wrong.any() else float("nan"))
        result["per_superclass"] = [
            {"superclass": s, "name": data.superclasses[s], "support": int((true_super == s).sum()),
             "top1": float((predictions == labels)[true_super == s].float().mean()) if (true_super == s).any()
             else float("nan"),
             "superclass_top1": float((predicted_super == s)[true_super == s].float().mean())
             if (true_super == s).any() else float("nan")}
            for s in range(len(data.superclasses))]
    return result


def _denormalize(x: torch.Tensor, data: cr.CifarData) -> torch.Tensor:
    """Normalised float images back to uint8-range floats (0..255) for display."""
    mean = torch.tensor(data.info.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(data.info.std, device=x.device).view(1, 3, 1, 1)
    return ((x.float() * std + mean) * 255).clamp(0, 255)


def _show_image(ax, image: torch.Tensor, title: str, fontsize: float = 7) -> None:
    """One (3, H, W) image, 0..255, with a title and no axes."""
    ax.imshow(image.detach().float().cpu().permute(1, 2, 0).numpy() / 255, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize)
    ax.axis("off")


def _report_figures(analysis: dict, images: torch.Tensor, labels: torch.Tensor, data: cr.CifarData, split: str,
                    folder: str, prefix: str) -> dict:
    """The figures of one split's analysis; returns {name: path}."""
    plt = _pyplot()
    classes, figures = data.classes, {}
    per_class = sorted(analysis["per_class"], key=lambda r: r["accuracy"], reverse=True)
    n = len(per_class)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * n + 1.5), 5.2))
    ax.bar(range(n), [100 * r["accuracy"] for r in per_class], color="tab:blue")
    ax.axhline(100 * analysis["top1"], color="tab:red", linestyle="--", label=f"overall {analysis['top1']:.1%}")
    ax.set_xticks(range(n), [classes[r["class"]] for r in per_class], rotation=90, fontsize=7)
    ax.set(xlim=(-0.7, n - 0.3), ylim=(0, 100), ylabel="top-1 on the class's images (%)",
           title=f"{split}: accuracy per class, best to worst ({analysis['n']} images)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    figures["per_class"] = _save(fig, os.path.join(folder, f"{prefix}per_class.png"))

    # the confusion matrix, rows normalised, classes ordered by superclass (blocks on the diagonal)
    order = list(range(len(classes)))
    if data.superclass_of is not None:
        order.sort(key=lambda c: (int(data.superclass_of[c]), c))
    confusion = analysis["confusion"][order][:, order].float()
    rates = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(11, 10))
    shown = ax.imshow(rates.sqrt().numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    bar = fig.colorbar(shown, ax=ax, fraction=0.04, pad=0.02)
    ticks = [0, 0.01, 0.05, 0.2, 0.5, 1]
    bar.set_ticks([math.sqrt(v) for v in ticks], labels=[f"{v:.0%}" for v in ticks])
    bar.set_label("share of the true class's images (square-root scale)")
    if data.superclass_of is not None:
        supers = [int(data.superclass_of[c]) for c in order]
        starts = [i for i in range(len(order)) if i == 0 or supers[i] != supers[i - 1]]
        for s in starts[1:]:
            ax.axhline(s - 0.5, color="white", linewidth=0.4)
            ax.axvline(s - 0.5, color="white", linewidth=0.4)
        centres = [(a + b - 1) / 2 for a, b in zip(starts, starts[1:] + [len(order)])]
        names = [data.superclasses[supers[s]].replace("_", " ") for s in starts]
        ax.set_yticks(centres, names, fontsize=7)
        ax.set_xticks(centres, names, fontsize=7, rotation=90)
        ax.set(xlabel="predicted class, grouped by superclass", ylabel="true class, grouped by superclass")
    else:
        ax.set_xticks(range(len(order)), [classes[c] for c in order], rotation=90, fontsize=7)
        ax.set_yticks(range(len(order)), [classes[c] for c in order], fontsize=7)
        ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(f"{split}: confusion matrix (each row: where that class's images went)")
    fig.tight_layout()
    figures["confusion"] = _save(fig, os.path.join(folder, f"{prefix}confusion.png"))

    # misclassified images: the first ones in test order, and the most confident mistakes
    predictions, confidence = analysis["predictions"], analysis["confidence"]
    wrong = (predictions != labels.cpu()).nonzero().flatten()
    by_confidence = wrong[confidence[wrong].argsort(descending=True)]
    for name, chosen, what in (("mistakes", wrong[:24], "misclassified images (the first 24)"),
                               ("confident_mistakes", by_confidence[:24], "the 24 most confident mistakes")):
        if len(chosen) == 0:
            continue
        fig, axes = plt.subplots(4, 6, figsize=(12, 11))
        for ax in axes.flat:
            ax.axis("off")
        for ax, i in zip(axes.flat, chosen.tolist()):
            _show_image(ax, images[i].float(), f"true: {classes[int(labels[i])]}\n"
                                               f"predicted: {classes[int(predictions[i])]}\n"
                                               f"confidence {float(confidence[i]):.0%}", fontsize=8)
        fig.suptitle(f"{split}: {what}", fontsize=12)
        fig.tight_layout()
        figures[name] = _save(fig, os.path.join(folder, f"{prefix}{name}.png"))

    bins = analysis["calibration"]["bins"]
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(6.4, 7.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1 / len(bins)
    filled = [b for b in bins if b["count"]]
    ax.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="black", color="tab:blue", label="accuracy of the images in the bin")
    ax.bar([b["low"] for b in filled], [abs(b["confidence"] - b["accuracy"]) for b in filled], width=width,
           bottom=[min(b["confidence"], b["accuracy"]) for b in filled], align="edge", fill=False, hatch="///",
           edgecolor="tab:red", label="gap to their mean confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
           title=f"{split}: reliability diagram, ECE {analysis['calibration']['ece']:.2%}")
    ax.legend(fontsize=8, loc="upper left")
    ax_count.bar([b["low"] for b in bins], [b["count"] for b in bins], width=width, align="edge",
                 edgecolor="black", color="grey")
    ax_count.set(xlabel="confidence (the top softmax probability)", ylabel="images")
    for a in (ax, ax_count):
        a.grid(alpha=0.3)
    fig.tight_layout()
    figures["calibration"] = _save(fig, os.path.join(folder, f"{prefix}calibration.png"))
    return figures


def _html_table(header: list, rows: list) -> str:
    import html

    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _report_html(title: str, sections: list, folder: str) -> str:
    """report.html: one self-contained page, every figure embedded as a data: URI."""
    import base64
    import html

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:right}img{max-width:100%;display:block;margin:1em 0}"
             ".wide{overflow-x:auto}.wide img{max-width:none}</style></head><body>"
             f"<h1>{html.escape(title)}</h1>"]
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for item in content:
            if isinstance(item, str) and item.endswith(".png") and os.path.exists(item):
                with open(item, "rb") as f:
                    encoded = base64.b64encode(f.read()).decode()
                image = f"<img alt='{html.escape(os.path.basename(item))}' src='data:image/png;base64,{encoded}'>"
                # a chart of 100 class names is read at its own size, scrolled sideways, not shrunk to the page
                parts.append(f"<div class='wide'>{image}</div>" if "per_class" in item else image)
            else:
                parts.append(item)
    parts.append("</body></html>")
    path = os.path.join(folder, "report.html")
    cr.atomic_save("\n".join(parts) + "\n", path)
    return path


def report(path: str, out_dir: Optional[str] = None, data: Optional[cr.CifarData] = None,
           data_dir: Optional[str] = None, device: str = "auto", download: bool = True, ema: bool = False) -> dict:
    """What a checkpoint gets right and wrong, on the test set (and on a --val-split run's validation images):
    per_class.csv, confused_pairs.csv, calibration.csv and summary.json always; with matplotlib also the
    figures (per-class accuracy, confusion matrix ordered by superclass, misclassified images, reliability
    diagram, the run's learning curves) and report.html, all in out_dir (default: report_best/ beside best.pt,
    report_best_ema/ for its --ema average, and so on). Returns the analyses and the paths written."""
    run = cr.load_run(path, data, data_dir, device, download=download, ema=ema)  # ema: the --ema average
    run_dir = os.path.dirname(os.path.abspath(run.path))
    if read_run_metrics(run_dir):  # the run's files checked before anything is written
        _run_schedule(run_dir, 1)
    # report_best/, report_last_ema/, ...: the reports of other weights never replace each other
    stem = os.path.splitext(os.path.basename(run.path))[0]
    folder = out_dir or os.path.join(run_dir, f"report_{stem}" + ("_ema" if ema else ""))
    cr.RunFolder(folder).check_writable()
    make_folder(folder)
    classes, written, analyses = run.data.classes, [], {}
    for split in ("test", "val") if run.config.val_split else ("test",):
        images, labels = run.splits[split]
        logits = cr.predict(run.model, images.to(run.device), run.normalize, run.config.eval_batch_size,
                         run.amp_dtype)[""]
        analyses[split] = analysis = analyse_predictions(logits, labels, run.data)
        prefix = "" if split == "test" else "val_"
        rows = [{**r, "name": classes[r["class"]],
                 **({"superclass": run.data.superclasses[int(run.data.superclass_of[r["class"]])]}
                    if run.data.superclass_of is not None else {})} for r in analysis["per_class"]]
        _write_csv(os.path.join(folder, f"{prefix}per_class.csv"), rows,
                   ["class", "name", "superclass", "support", "accuracy", "precision", "recall"]
                   if run.data.superclass_of is not None else
                   ["class", "name", "support", "accuracy", "precision", "recall"])
        _write_csv(os.path.join(folder, f"{prefix}confused_pairs.csv"),
                   [{"true": classes[a], "predicted": classes[b], "count": c,
                     "share_of_true_class": c / max(analysis["per_class"][a]["support"], 1)}
                    for a, b, c in analysis["confused_pairs"]], ["true", "predicted", "count", "share_of_true_class"])
        _write_csv(os.path.join(folder, f"{prefix}calibration.csv"), analysis["calibration"]["bins"],
                   ["low", "high", "count", "confidence", "accuracy"])
        written += [os.path.join(folder, f"{prefix}{n}.csv") for n in ("per_class", "confused_pairs", "calibration")]
    summary = {split: {k: a[k] for k in ("n", "top1", "top5", "loss", "superclass_top1", "errors_in_right_superclass")
                       if k in a} | {"ece": a["calibration"]["ece"]} for split, a in analyses.items()}
    summary = {split: {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in numbers.items()}
               for split, numbers in summary.items()}  # 0.06, not float32's 0.05999999865889549
    summary.update(checkpoint=os.path.abspath(run.path), epoch=run.ckpt["epoch"], weights="ema" if ema else "raw",
                   chosen_on_test=run.chosen_on_test)
    cr.atomic_save(json.dumps(summary, indent=2) + "\n", os.path.join(folder, "summary.json"))
    written.append(os.path.join(folder, "summary.json"))

    try:
        _pyplot()
    except cr.UserError as e:
        raise cr.UserError(f"wrote the numbers into {folder} (CSV files, summary.json); for the figures and "
                        f"report.html: {e}") from None
    figures = {split: _report_figures(analyses[split], *run.splits[split], run.data, split, folder,
                                      "" if split == "test" else "val_") for split in analyses}
    written += [p for f in figures.values() for p in f.values()]
    if read_metrics(os.path.join(run_dir, "metrics.csv")):
        figures["curves"] = plot_runs([run_dir], os.path.join(folder, "curves.png"))
        written.append(figures["curves"])
    sections = []
    for split, a in analyses.items():
        lines = [f"top-1 {a['top1']:.2%}", f"top-5 {a['top5']:.2%}", f"loss {a['loss']:.4f}",
                 f"expected calibration error {a['calibration']['ece']:.2%}"]
        if "superclass_top1" in a:
            lines += [f"superclass top-1 {a['superclass_top1']:.2%}",
                      f"errors inside the right superclass {a['errors_in_right_superclass']:.1%}"]
        pairs = _html_table(["true", "predicted as", "images", "share of the true class"],
                            [(classes[t], classes[p], c, f"{c / max(a['per_class'][t]['support'], 1):.0%}")
                             for t, p, c in a["confused_pairs"]])
        content = [f"<p>{a['n']} images: " + ", ".join(lines) + "</p>", figures[split]["per_class"],
                   figures[split]["confusion"], "<h3>The 20 most confused pairs</h3>", pairs]
        if split == "test" and summary["chosen_on_test"]:
            content.insert(0, "<p><strong>These weights are the epoch of the best test top-1 (the run had no "
                              "--val-split), so their test numbers are optimistic.</strong></p>")
        if "per_superclass" in a:
            content += ["<h3>Superclasses</h3>", _html_table(
                ["superclass", "images", "top-1 (class)", "top-1 (superclass)"],
                [(s["name"], s["support"], f"{s['top1']:.1%}", f"{s['superclass_top1']:.1%}")
                 for s in sorted(a["per_superclass"], key=lambda s: -s["top1"])])]
        content += [figures[split][k] for k in ("mistakes", "confident_mistakes", "calibration") if k in figures[split]]
        sections.append((f"{split} set", content))
    if "curves" in figures:
        sections.append(("learning curves", [figures["curves"]]))
    title = f"report: {run.path} (epoch {run.ckpt['epoch']}{', EMA weights' if ema else ''})"
    written.append(_report_html(title, sections, folder))
    return {"analyses": analyses, "summary": summary, "files": written, "folder": folder}


def preview_augmentation(config: cr.TrainConfig, data: cr.CifarData, batches: int = 2, per_batch: int = 8) -> list:
    """The first training batches of a run with these settings, through the very functions the training step
    uses (Trainer.augmented_epoch, draw_mix, apply_mix, the normaliser): for the first `batches` batches whose
    mixing differs (a MixUp and a CutMix one when both are on), `per_batch` images each. Returns one dict per
    batch: step, method, lam, box, and per image the original, its crop offsets and flip, the cropped and
    flipped image (and, with --aug advanced, the names of the operations that then ran on it), the mixed image
    the model sees (`inputs`: normalised, as fed) and both labels."""
    trainer = cr.Trainer(dataclasses.replace(config, out_dir=None), data, log=lambda message: None)
    images, labels, details = trainer.augmented_epoch(details=True)
    train_images = trainer.splits["train"][0]
    shown, methods = [], set()
    mixing = config if config.mix_off_epochs < config.epochs else trainer.unmixed  # (the epoch-1 rule of train_batch)
    for step, (first, last) in enumerate(trainer.batches):
        method, lam, box = cr.draw_mix(mixing, cr.IMAGE_SIZE, cr.IMAGE_SIZE, trainer.mix_rng)
        if method in methods:
            continue
        methods.add(method)
        x, labels_a, labels_b, lam = cr.apply_mix(trainer.normalize(images[first:last]), labels[first:last], method,
                                                  lam, box)
        k = min(per_batch, last - first)
        index = slice(first, first + k)
        shown.append({"step": step + 1, "method": method, "lam": lam, "box": box, "inputs": x,
                      "original": train_images[details["order"][index]], "augmented": images[index],
                      "dy": details["dy"][index] - cr.CROP_PADDING, "dx": details["dx"][index] - cr.CROP_PADDING,
                      "flipped": details["flipped"][index], "mixed": _denormalize(x[:k], data),
                      "operations": [[cr.ADVANCED_OPERATIONS[o] for o in row if o >= 0] for row in
                                     details["operations"][index].tolist()] if details["operations"] is not None
                      else [[] for _ in range(k)],
                      "labels_a": labels_a[:k], "labels_b": labels_b[:k]})
        if len(shown) == batches:
            break
    return shown


def plot_augmentation(shown: list, data: cr.CifarData, out_path: str) -> str:
    """preview_augmentation's batches as a grid: per image the original, after crop and flip, and mixed."""
    plt = _pyplot()
    columns = max(len(b["augmented"]) for b in shown)
    fig = plt.figure(figsize=(1.75 * columns, 1.95 * 3 * len(shown)), layout="constrained")
    advanced = " and the advanced policy's operations" if any(any(b["operations"]) for b in shown) else ""
    fig.suptitle(f"what the network sees, each column one image; top to bottom: the original, after random crop (the "
                 f"window's shift in rows, columns of pixels)\nand flip{advanced}, then mixed with its partner in the "
                 f"batch", fontsize=9)
    for batch, panel in zip(shown, fig.subfigures(len(shown), 1, squeeze=False)[:, 0]):
        box = batch["box"]
        how = (f"CutMix, lam {batch['lam']:.2f} (the partner's rows {box[0]}-{box[1] - 1}, columns {box[2]}-"
               f"{box[3] - 1} pasted)" if batch["method"] == "cutmix" else
               f"MixUp, lam {batch['lam']:.2f}" if batch["method"] == "mixup" else "no mixing")
        panel.suptitle(f"training step {batch['step']}: {how}", fontsize=9, fontweight="bold", x=0.01, ha="left")
        axes = panel.subplots(3, columns, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i in range(len(batch["augmented"])):
            a, c = int(batch["labels_a"][i]), int(batch["labels_b"][i])
            shift = f"shift {int(batch['dy'][i]):+d},{int(batch['dx'][i]):+d}" + (", flipped" if batch["flipped"][i]
                                                                                 else "")
            _show_image(axes[0][i], batch["original"][i].float(), f"original\n{data.classes[a]}")
            ran = batch["operations"][i]
            _show_image(axes[1][i], batch["augmented"][i].float(), f"crop {shift}" + (
                "\n" + ", ".join(o.replace("_", " ") for o in ran) if ran else "\n(no advanced operation)"
                if any(batch["operations"]) else ""))
            mixed = (f"{data.classes[a]} {batch['lam']:.0%}\n+ {data.classes[c]} {1 - batch['lam']:.0%}"
                     if batch["method"] != "none" else data.classes[a])
            _show_image(axes[2][i], batch["mixed"][i], mixed)
    return _save(fig, out_path)


CONV_FILTERS = ("edge", "blur", "sharpen", "emboss")


def conv_filter(name: str, size: int) -> torch.Tensor:
    """A size x size filter: edge (vertical edges: -1 left of the centre column, +1 right of it, scaled to a
    mean difference; Prewitt's at 3x3), blur (the mean), sharpen (twice the image minus its blur) or emboss (-1
    above the anti-diagonal, +1 below, 1 at the centre). At 1x1 every filter is the one weight 1: a single
    pixel has no neighbours to find an edge or a blur in (in a network, a 1x1 convolution mixes channels)."""
    if name not in CONV_FILTERS:
        raise cr.UserError(f"--filter must be one of {', '.join(CONV_FILTERS)}, got {name!r}")
    if size == 1:
        return torch.ones(1, 1)
    centre = torch.zeros(size, size)
    centre[size // 2, size // 2] = 1
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    if name == "edge":
        return torch.sign(j - size // 2).float() / (size * (size // 2))
    if name == "blur":
        return torch.full((size, size), 1 / size ** 2)
    if name == "sharpen":
        return 2 * centre - torch.full((size, size), 1 / size ** 2)
    return torch.sign(i + j - (size - 1)).float() + centre  # emboss


def conv_output_size(n: int, kernel: int, stride: int, padding: int) -> int:
    """The output size of a convolution: floor((n + 2p - k) / s) + 1."""
    return (n + 2 * padding - kernel) // stride + 1


def conv_demo(image: torch.Tensor, filter_name: str = "edge", kernel: Optional[torch.Tensor] = None) -> dict:
    """One image (uint8 (3, H, W)) through a filter, as its grey levels, with torch's conv2d: every kernel size
    1/3/5/7 x stride 1/2/3 x padding 0/1/2/"same". Returns {"grey": the input, "rows": [{k, s, p, n, formula,
    actual, output (None where torch refuses)}]}. kernel: your own square filter instead of the named one."""
    grey = (image.float() * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0) / 255  # ITU-R 601 luma
    n = grey.shape[-1]
    rows = []
    sizes = (kernel.shape[-1],) if kernel is not None else (1, 3, 5, 7)
    for k in sizes:
        weight = (kernel if kernel is not None else conv_filter(filter_name, k)).float().view(1, 1, k, k)
        for s in (1, 2, 3):
            for p in (0, 1, 2, "same"):
                row = {"k": k, "s": s, "p": p, "n": n, "kernel": weight[0, 0],
                       "formula": conv_output_size(n, k, s, (k - 1) // 2 if p == "same" else p) if s == 1 or
                       p != "same" else None, "actual": None, "output": None}
                try:
                    with warnings.catch_warnings():  # torch's note on "same" with an even kernel: the table says
                        warnings.simplefilter("ignore")
                        out = F.conv2d(grey.view(1, 1, n, n), weight, stride=s, padding=p)
                except (RuntimeError, ValueError) as e:
                    row["refused"] = str(e).splitlines()[0]
                else:
                    row["actual"], row["output"] = out.shape[-1], out[0, 0]
                rows.append(row)
    return {"grey": grey, "rows": rows}


def conv_table(demo: dict) -> str:
    """The printed table: input size, k, s, p, the formula's output size and the one torch produced."""
    lines = ["    n   k   s  p     floor((n + 2p - k) / s) + 1   conv2d's output"]
    for r in demo["rows"]:
        p = "same" if r["p"] == "same" else str(r["p"])
        formula = "-" if r["formula"] is None else str(r["formula"])
        if r["p"] == "same" and r["s"] == 1:
            p += f" ({(r['k'] - 1) // 2})"
        actual = str(r["actual"]) if r["actual"] is not None else "refused: " + r["refused"][:48]
        lines.append(f"{r['n']:>5} {r['k']:>3} {r['s']:>3}  {p:<9} {formula:>15}                {actual}")
    return "\n".join(lines)


def plot_conv_demo(demo: dict, filter_label: str, out_path: str) -> str:
    """Three rows, one thing varied in each: the kernel size (stride 1, padding 0), the stride (a 3x3 kernel,
    padding 1), the padding (a 3x3 kernel, stride 1). Each output is drawn where its pixels sit over the input
    (a dashed square marks the input's border: padding grows the output past it, a larger kernel shrinks it
    inside, a stride-s pixel covers s x s input pixels), with its kernel beside it."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle
    sizes = sorted({r["k"] for r in demo["rows"]})
    middle = 3 if 3 in sizes else sizes[len(sizes) // 2]
    pick = lambda k, s, p: next(r for r in demo["rows"] if (r["k"], r["s"], r["p"]) == (k, s, p))  # noqa: E731
    rows = [("kernel size (stride 1, padding 0)", [pick(k, 1, 0) for k in sizes]),
            (f"stride (kernel {middle}, padding 1)", [pick(middle, s, 1) for s in (1, 2, 3)]),
            (f"padding (kernel {middle}, stride 1)", [pick(middle, 1, p) for p in (0, 1, 2, "same")])]
    columns = 1 + max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns, 2.9 * len(rows)), squeeze=False)
    n = demo["grey"].shape[-1]
    for (label, panels), ax_row in zip(rows, axes):
        for ax in ax_row:
            ax.axis("off")
        ax_row[0].imshow(demo["grey"].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest",
                         extent=(0, n, n, 0))
        ax_row[0].set(xlim=(-4, 1.55 * n), ylim=(n + 4, -4))
        ax_row[0].set_title(f"input {n}x{n}\nvarying: {label}", fontsize=8)
        for ax, r in zip(ax_row[1:], panels):
            out, p = r["output"], "same" if r["p"] == "same" else r["p"]
            ax.set(xlim=(-4, 1.55 * n), ylim=(n + 4, -4))
            kernel = ax.inset_axes([0.7, 0.55, 0.28, 0.4])  # the kernel: blue below 0, red above
            scale = float(r["kernel"].abs().max()) or 1.0
            kernel.imshow(r["kernel"].numpy(), cmap="RdBu_r", vmin=-1.6 * scale, vmax=1.6 * scale,
                          interpolation="nearest")
            kernel.set_xticks([]), kernel.set_yticks([])
            kernel.set_title(f"kernel {r['k']}x{r['k']}" + (": one weight" if r["k"] == 1 else ""), fontsize=7)
            if r["k"] <= 3:
                for (y, x), v in np.ndenumerate(r["kernel"].numpy()):
                    kernel.text(x, y, f"{v:.2g}", ha="center", va="center", fontsize=6)
            if out is None:  # conv2d refused: a kernel larger than the padded image, or "same" with a stride
                ax.text(0.35, 0.5, "refused by conv2d:\n" + "\n".join(textwrap.wrap(r["refused"], 24)[:4]),
                        ha="center", va="center", fontsize=7, transform=ax.transAxes)
                ax.set_title(f"k {r['k']}, s {r['s']}, p {p}", fontsize=8)
                continue
            pad = (r["k"] - 1) // 2 if p == "same" else p
            start = r["k"] // 2 - pad - (r["s"] - 1) / 2  # output pixel i sits over input pixel i * s + start
            end = start + out.shape[-1] * r["s"]
            low, high = torch.quantile(out.flatten(), torch.tensor([0.02, 0.98])).tolist()  # a padded border's
            ax.imshow(out.numpy(), cmap="gray", interpolation="nearest", extent=(start, end, end, start),  # jump
                      vmin=low, vmax=max(high, low + 1e-6))  # would take the whole grey range otherwise
            ax.add_patch(Rectangle((0, 0), n, n, fill=False, edgecolor="tab:red", linestyle="--", linewidth=1))
            ax.set_title(f"k {r['k']}, s {r['s']}, p {p}: output {out.shape[0]}x{out.shape[1]}", fontsize=8)
    fig.suptitle(f"one image through the {filter_label} filter, its kernel beside each output (red above 0, blue "
                 f"below)\neach output drawn where its pixels sit over the input (dashed red: the input's border; a "
                 f"pixel of a stride-s output covers s x s of the input's pixels); grey levels: 2nd to 98th "
                 f"percentile of each output", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_path)


def feature_maps(model: cr.ResNet, image: torch.Tensor, normalize: cr.Normalizer) -> list:
    """[(stage name, its output for `image`)]: the stem and each of the four stages."""
    outputs = []
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name: outputs.append((name, o[0])))
             for name in ("relu", "layer1", "layer2", "layer3", "layer4")]
    try:
        with torch.no_grad():
            model.eval()(normalize(image[None]))
    finally:
        for hook in hooks:
            hook.remove()
    return [("stem (conv1, bn, relu)" if name == "relu" else name, out) for name, out in outputs]


def plot_network_view(model: cr.ResNet, image: torch.Tensor, normalize: cr.Normalizer, out_path: str,
                      channels: int = 8) -> str:
    """A trained model's first-layer filters (as colour patches) and the feature maps of `image` at the stem
    and each stage (the first `channels` channels)."""
    plt = _pyplot()
    weights = model.conv1.weight.detach().float().cpu()
    maps = feature_maps(model, image, normalize)
    shown = min(len(weights), 32)
    columns = max(channels, 8)
    rows = math.ceil(shown / columns) + len(maps)
    fig, axes = plt.subplots(rows, columns + 1, figsize=(1.45 * (columns + 1), 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    _show_image(axes[0][0], image.float(), "input", fontsize=8)
    for i in range(shown):
        w = weights[i]
        w = (w - w.min()) / (w.max() - w.min() + 1e-12) * 255  # each filter stretched to the full range
        _show_image(axes[i // columns][1 + i % columns], w, f"conv1 filter {i}\n{w.shape[1]}x{w.shape[2]}",
                    fontsize=6)
    for r, (name, out) in enumerate(maps, start=math.ceil(shown / columns)):
        axes[r][0].text(0, 0.5, f"{name}\n{out.shape[0]} maps\nof {out.shape[1]}x{out.shape[2]}", fontsize=7,
                        va="center")
        for c in range(min(channels, out.shape[0])):
            axes[r][1 + c].imshow(out[c].float().cpu().numpy(), cmap="viridis", interpolation="nearest")
            axes[r][1 + c].set_title(f"channel {c}", fontsize=6)
    fig.suptitle("a trained network: its first-layer filters, then the image's feature maps at each stage",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)


def report_main(argv: list) -> int:
    """`report CHECKPOINT|RUN_DIR [--out-dir DIR]`: what saved weights get right and wrong."""
    p = cr.command_parser("report", "What saved weights get right and wrong on the test set (and a --val-split "
                          "run's validation images): per-class accuracy, superclasses, the confusion matrix, "
                          "misclassified images, calibration and the learning curves, as CSV/JSON files, figures "
                          "and one self-contained report.html")
    p.add_argument("checkpoint", type=os.path.expanduser, help="a checkpoint, or a run folder (its last.pt)")
    p.add_argument("--out-dir", type=os.path.expanduser,
                   help="where to write (default: report_<checkpoint>/ beside it, e.g. report_best/ or, "
                        "with --ema, report_best_ema/)")
    cr.add_data_flags(p, "folder holding cifar-100-python/ (default: the run's --data-dir)")
    p.add_argument("--ema", action="store_true", help="the run's --ema average instead of its weights (default: off)")
    args = p.parse_args(argv)
    r = report(args.checkpoint, args.out_dir, data_dir=args.data_dir, device=args.device, download=args.download,
               ema=args.ema)
    for split, s in r["summary"].items():
        if isinstance(s, dict):
            print(f"{split} ({s['n']} images): top-1 {s['top1']:.2%}, top-5 {s['top5']:.2%}, calibration error "
                  f"{s['ece']:.2%}" + (f", superclass top-1 {s['superclass_top1']:.2%}, errors inside the right "
                                       f"superclass {s['errors_in_right_superclass']:.1%}"
                                       if "superclass_top1" in s else ""))
    if r["summary"]["chosen_on_test"]:
        print(f"note: {args.checkpoint} is the epoch of the best test top-1 (the run had no --val-split), so its "
              f"test numbers are optimistic")
    folder = os.path.relpath(r["folder"])  # as the other commands print paths: from here, unless above it
    folder = r["folder"] if folder.startswith(os.pardir) else folder
    print(f"wrote {len(r['files'])} files into {folder}; open {os.path.join(folder, 'report.html')}")
    return 0


def preview_aug_main(argv: list) -> int:
    """`preview-aug [train flags] [--out FILE] [--images N]`: what the network sees."""
    parser = cr.command_parser("preview-aug", "Draw the first training batches of a run with these flags through "
                               "the training step's own augmentation: each image's original, its random crop and "
                               "flip, and the MixUp or CutMix with its partner. Takes every train flag (--seed, "
                               "--no-mixup, ...).", train_flags=True)
    group = parser.add_argument_group("preview-aug")
    group.add_argument("--out", default="augmentation.png", type=os.path.expanduser,
                       help="PNG to write (default: augmentation.png)")
    group.add_argument("--images", type=int, default=8, help="images per batch shown (default: 8)")
    args = parser.parse_args(argv)
    if not 1 <= args.images <= 16:
        raise cr.UserError(f"--images must be in 1..16, got {args.images}")
    config = cr.config_from_args(args)
    _pyplot()  # before reading any data
    check_png(args.out)
    data = cr.load_dataset(config.data_dir, config.dataset, config.download)
    shown = preview_augmentation(config, data, per_batch=args.images)
    for batch in shown:
        box = batch["box"]  # (top, bottom, left, right), bottom and right excluded: the last row and column
        print(f"step {batch['step']}: {batch['method']}, lam {batch['lam']:.3f}"
              + (f", box rows {box[0]}-{box[1] - 1} columns {box[2]}-{box[3] - 1}" if box else ""))
    print(f"wrote {plot_augmentation(shown, data, args.out)}")
    return 0


def _read_image_file(path: str) -> torch.Tensor:
    """An image file as uint8 (3, S, S): the centre square, at most 128 pixels a side."""
    from PIL import Image  # Pillow: installed with torchvision

    try:
        with warnings.catch_warnings():  # a file that claims more pixels than Pillow decodes safely: refused
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as file:
                image = torch.from_numpy(np.array(file.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise cr.UserError(f"cannot read the image {path}: {(str(e).splitlines() or [''])[0][:120]}") from None
    side = min(image.shape[1:])
    top, left = (image.shape[1] - side) // 2, (image.shape[2] - side) // 2
    image = image[:, top:top + side, left:left + side]
    return _resize(image, 128) if side > 128 else image


def _resize(image: torch.Tensor, side: int) -> torch.Tensor:
    """A uint8 (3, H, W) image resized to side x side (bilinear, antialiased)."""
    return F.interpolate(image[None].float(), size=(side, side), mode="bilinear",
                         antialias=True)[0].round().clamp(0, 255).to(torch.uint8)


def conv_demo_main(argv: list) -> int:
    """`conv-demo [--image FILE | --index N] [--filter NAME | --kernel V,V,...] [--checkpoint CKPT]`."""
    p = cr.command_parser("conv-demo", "One image through a convolution filter at every kernel size 1/3/5/7, "
                          "stride 1/2/3 and padding 0/1/2/same: a figure of the outputs and a table of each output "
                          "size from floor((n + 2p - k) / s) + 1 beside the size torch's conv2d produced. With "
                          "--checkpoint, also a trained model's first-layer filters and the image's feature maps.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--image", type=os.path.expanduser,
                        help="an image file (PNG, JPEG): its centre square, at most 128 pixels a side")
    source.add_argument("--index", type=int, default=0, help="image N of the test set (default: 0)")
    kernel = p.add_mutually_exclusive_group()
    kernel.add_argument("--filter", default="edge", choices=CONV_FILTERS, help="the filter (default: edge)")
    kernel.add_argument("--kernel", help="your own square filter, row by row; write it with = when it starts "
                        "with a minus: --kernel=-1,0,1,-2,0,2,-1,0,1")
    p.add_argument("--checkpoint", type=os.path.expanduser,
                   help="a checkpoint or run folder: also draw its network's view of the image")
    p.add_argument("--out", default="conv_demo.png", type=os.path.expanduser,
                   help="PNG to write (default: conv_demo.png; with --checkpoint also network.png beside it)")
    p.add_argument("--dataset", default="cifar100", choices=tuple(cr.DATASETS), help="(default: cifar100)")
    cr.add_data_flags(p, "folder holding cifar-100-python/ (default: ./data, or the checkpoint's)")
    args = p.parse_args(argv)
    weight, label = None, f"{args.filter} ({', '.join(f'{k}x{k}' for k in (1, 3, 5, 7))})"
    if args.kernel:
        try:
            values = [float(v) for v in args.kernel.split(",")]
            if not all(map(math.isfinite, values)):
                raise ValueError
        except ValueError:
            raise cr.UserError(f"--kernel must be finite numbers separated by commas, got {args.kernel!r}") from None
        k = math.isqrt(len(values))
        if k * k != len(values):
            raise cr.UserError(f"--kernel needs a square number of values (9 for 3x3), got {len(values)}")
        weight, label = torch.tensor(values).view(k, k), f"given {k}x{k}"
    _pyplot()  # before reading any data
    check_png(args.out)
    run = cr.load_run(args.checkpoint, data_dir=args.data_dir, device=args.device, download=args.download) \
        if args.checkpoint else None
    if args.image:
        image, what = _read_image_file(args.image), args.image
    else:
        data = run.data if run else cr.load_dataset(args.data_dir or "./data", args.dataset, args.download)
        if not 0 <= args.index < len(data.test_images):
            raise cr.UserError(f"--index must be in 0..{len(data.test_images) - 1}, got {args.index}")
        image = data.test_images[args.index]
        what = f"test image {args.index} ({data.classes[int(data.test_labels[args.index])]})"
    demo = conv_demo(image, args.filter, weight)
    print(f"{what}, {image.shape[1]}x{image.shape[2]} pixels, through the {label} filter:")
    print(conv_table(demo))
    written = [plot_conv_demo(demo, label, args.out)]
    if run:
        if image.shape[1:] != (cr.IMAGE_SIZE, cr.IMAGE_SIZE):
            image = _resize(image, cr.IMAGE_SIZE)
        written.append(plot_network_view(run.model, image.to(run.device), run.normalize,
                                         os.path.join(os.path.dirname(args.out), "network.png")))
    print(f"wrote {' and '.join(written)}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# The commands: also reached through cifar100_resnet's command line (cifar100-resnet COMMAND)

COMMANDS = {"lr-find": lr_find_main, "sweep": sweep_main, "plot": plot_main, "report": report_main,
            "preview-aug": preview_aug_main, "conv-demo": conv_demo_main, "bench": bench_main}


def main(argv: Optional[list] = None) -> int:
    """`python cifar100_lab.py COMMAND ...`: the lab's commands, with cifar100_resnet's error handling."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__.split("\n\n")[1])
            return 0
        close = difflib.get_close_matches(argv[0].replace("_", "-"), COMMANDS, n=1, cutoff=0.65) if argv else []
        print(f"error: the lab's commands are {', '.join(COMMANDS)}; got {argv[0] if argv else 'none'}"
              + (f" (did you mean {close[0]}?)" if close else "") + " (training and eval: cifar100_resnet.py)",
              file=sys.stderr)
        return 2
    return cr.main(argv)


if __name__ == "__main__":
    import cifar100_lab  # the module as cifar100_resnet imports it, not this copy named __main__

    sys.exit(cifar100_lab.main())
