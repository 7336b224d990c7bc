"""Tests of the lab (cifar100_lab.py): lr-find, sweeps (grid, random, seeds, selection on validation, resume,
worker processes, Optuna), the figures (learning curves, the planned schedule, sweeps), the bench command, and
the pictures for understanding a run (report, preview-aug, conv-demo). Each number is checked against a slow
count written here or against torch itself. Tiny models on synthetic data; CPU only. A test that needs an
optional extra (matplotlib, optuna) skips itself without it.

Run: python -m pytest -q test_cifar100_lab.py
"""

import ast
import csv
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cifar100_lab as lab
import cifar100_resnet as cr
from conftest import (FAULT_PAUSE_ENV, HERE, LAB, MODULE, SHARED, metric_rows, official_layout, read_csv, run_cli,
                      start_cli, stop_on_call, synthetic_data, tiny_args, trainers_alive_after, write_official_layout)


# ----------------------------------------------------------------------------------------------------------
# The lab: on the library's public API, its commands through either file


def assert_drawn_at(path, size: tuple) -> None:
    """The figure decodes at `size` (height, width) pixels, or one less: matplotlib before 3.10 truncated inches
    x dpi where later versions round (4.6 inches at 110 dpi: 505 pixels, not 506)."""
    drawn = pytest.importorskip("matplotlib.pyplot").imread(path).shape[:2]
    assert all(0 <= want - got <= 1 for got, want in zip(drawn, size)), (str(path), drawn, size)


def test_the_lab_uses_only_the_librarys_public_api():
    tree = ast.parse(Path(LAB).read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "cr"}
    assert used and used <= set(cr.__all__), sorted(used - set(cr.__all__))
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "cifar100_resnet"]
    assert imports == []  # only `import cifar100_resnet as cr`, so that every use reads cr.NAME


def test_a_misspelt_lab_command_gets_the_closest_one(capsys):
    assert lab.main(["lr_find"]) == 2
    assert capsys.readouterr().err.startswith("error: the lab's commands are lr-find, sweep, plot, report, "
                                              "preview-aug, conv-demo, bench; got lr_find (did you mean lr-find?)")


def test_the_lab_commands_run_from_either_file_and_import_matplotlib_and_optuna_only_when_used():
    # a fresh interpreter that runs the lab's file, its imports listed (-X importtime): not the optional extras
    r = subprocess.run([sys.executable, "-X", "importtime", LAB, "plot", "--help"], capture_output=True, text=True,
                       cwd=HERE, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: cifar100_lab.py plot ")
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "cifar100_resnet" in imported and not {"matplotlib", "optuna"} & imported
    r = run_cli("report", program=MODULE)
    assert r.returncode == 2 and r.stderr == ("error: the following arguments are required: checkpoint; see "
                                              "cifar100_resnet.py report --help\n")
    r = run_cli("eval", program=LAB)  # the lab's own file runs only its own commands
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "the lab's commands are lr-find, sweep" in r.stderr
    r = run_cli("--help", program=LAB)
    assert r.returncode == 0 and all(f"cifar100_lab.py {command}" in r.stdout for command in lab.COMMANDS)
    assert set(lab.COMMANDS) == set(cr.LAB_COMMANDS)


# ----------------------------------------------------------------------------------------------------------
# lr-find, sweeps and Optuna (tiny models on synthetic data)


def tiny_config(**overrides) -> "cr.TrainConfig":
    """A run of a fraction of a second: resnet18 of width 4 on 256 synthetic CIFAR-10 images, 64 of them
    held out for validation."""
    values = dict(dataset="cifar10", arch="resnet18", width=4, epochs=2, batch_size=32, lr=0.05, val_split=64,
                  device="cpu", quiet=True, limit_train=256, limit_test=128)
    return cr.TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def data():
    return synthetic_data(n_train=256, n_test=128)


SWEEP_COLUMNS = ["epoch", "lr", "train_loss", "test_loss", "test_top1", "val_loss", "val_top1"]  # all but times


def deterministic(run_dir) -> list:
    return [[row[k] for k in SWEEP_COLUMNS] for row in read_csv(Path(run_dir) / "metrics.csv")]


# ----------------------------------------------------------------------------------------------------------
# lr-find


def test_lr_find_grows_the_rate_suggests_one_inside_the_range_and_leaves_the_given_model_alone(data):
    config = tiny_config()
    torch.manual_seed(0)
    model = cr.build_model(config)
    optimizer = cr.build_optimizer(model, config)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers exist, and must stay as they are
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    before_momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    result = lab.lr_find(config, data, start=1e-4, end=1e3, steps=40, model=model, optimizer=optimizer)
    assert all(a < b for a, b in zip(result.rates, result.rates[1:]))
    assert result.rates[0] == pytest.approx(1e-4)
    assert len(result.losses) == len(result.smoothed) == len(result.rates) >= 2
    assert math.isfinite(result.suggestion) and 1e-4 <= result.suggestion <= 1e3
    lowest = result.rates[result.smoothed.index(min(result.smoothed))]
    assert result.suggestion == pytest.approx(max(lowest / 10, 1e-4)) and "tenth" in result.rule
    # the smoothed loss is the bias-corrected moving average, computed here the slow way
    for i in (0, 5, len(result.losses) - 1):
        weights = [0.02 * 0.98 ** (i - j) for j in range(i + 1)]
        expected = sum(w * x for w, x in zip(weights, result.losses)) / (1 - 0.98 ** (i + 1))
        assert result.smoothed[i] == pytest.approx(expected, rel=1e-9)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_weights[k]), k
    for p, m in zip(model.parameters(), before_momentum):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], m)


def test_lr_find_says_the_loss_still_fell_only_when_it_saw_no_rise_after_its_lowest(data, monkeypatch):
    def with_losses(losses):
        steps = iter(losses)
        monkeypatch.setattr(cr.Trainer, "train_batch", lambda self, x, y: (torch.tensor(next(steps)), len(x)))
        return lab.lr_find(tiny_config(), data, start=1e-3, end=1.0, steps=len(losses))

    falling = [4.6 - 0.01 * i for i in range(100)]
    assert "still fell at 1" in with_losses(falling).rule
    risen = falling[:95] + [3.9, 4.3, 4.6, 4.6, 4.6]  # lowest at step 95 of 100, then a rise of more than 0.5 %
    result = with_losses(risen)
    assert result.rule.startswith("a tenth of ") and "still fell" not in result.rule
    assert result.smoothed.index(min(result.smoothed)) >= 89
    # a loss that only rose from --start: the suggestion is --start, and says so (not "a tenth of" a rate)
    rising = with_losses([4.6 + 0.01 * i for i in range(20)])
    assert rising.suggestion == 1e-3 and rising.rule.startswith("--start itself: the smoothed loss was lowest there")


def test_lr_find_stops_when_the_loss_diverges(data):
    result = lab.lr_find(tiny_config(label_smoothing=0.0), data, start=1e-2, end=1e6, steps=60)
    assert result.stopped_early and len(result.rates) < 60
    assert result.suggestion < result.rates[-1]


@pytest.mark.parametrize("losses, smoothed", [([4.6, 4.7], [4.6, 4.65]), ([4.6, 4.6], [4.6, 4.6]), ([4.6], [4.6])],
                         ids=["rising", "flat", "one step"])
def test_the_lr_find_figure_of_a_loss_that_never_fell_shows_it_without_a_warning(tmp_path, monkeypatch, losses,
                                                                                 smoothed):
    pytest.importorskip("matplotlib")
    figures = []
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    result = lab.LRFindResult([1.0, 2.0][:len(losses)], losses, smoothed, 1.0, "", None)
    with warnings.catch_warnings():  # a range of zero height, or width (one step): matplotlib's UserWarning
        warnings.simplefilter("error")  # reached stderr
        warnings.simplefilter("ignore", DeprecationWarning)  # (matplotlib < 3.10 calls pyparsing 3.3's old names)
        lab.plot_lr_find(result, str(tmp_path / "lr_find.png"))
    ax = figures[0].axes[0]
    low, high = ax.get_ylim()
    assert low < min(losses) and max(losses) < high
    left, right = ax.get_xlim()
    assert left < 1.0 < right and left < result.rates[-1] < right
    if len(losses) == 1:  # a line of one point is not drawn: a marker is
        assert ax.get_lines()[1].get_marker() == "o" and "1 step," in ax.get_title()


def test_lr_find_command_writes_csv_and_figure_and_refuses_to_overwrite(tmp_path, capsys, monkeypatch):
    data_dir = tmp_path / "data"
    write_official_layout(data_dir, n_train=96, n_test=32)
    out = tmp_path / "lrf"
    args = ["lr-find", "--data-dir", str(data_dir), "--arch", "resnet18", "--width", "4", "--batch-size", "32",
            "--device", "cpu", "--no-download", "--out-dir", str(out), "--steps", "12"]
    assert cr.main(args) == 0
    printed = capsys.readouterr().out
    assert "suggested peak learning rate" in printed
    rows = read_csv(out / "lr_find.csv")
    assert len(rows) == 12 and [float(r["lr"]) for r in rows] == sorted(float(r["lr"]) for r in rows)
    pytest.importorskip("matplotlib.pyplot")
    assert_drawn_at(out / "lr_find.png", (506, 880))  # 8 x 4.6 inches at 110 dpi
    assert cr.main(args) == 2 and "already holds a finished lr-find" in capsys.readouterr().err
    # without matplotlib: the CSV still, then exit 2 with the install hint
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cr.main(args[:-4] + ["--out-dir", str(tmp_path / "bare"), "--steps", "4"]) == 2
    assert "pip install" in capsys.readouterr().err and (tmp_path / "bare" / "lr_find.csv").exists()


def test_a_read_only_folder_is_one_line_for_a_sweep_and_a_figure(tmp_path, capsys, monkeypatch):
    # (as root a folder is never read-only to its owner: access() is what the commands ask, so ask it to refuse)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real(path, mode) and os.path.abspath(path) != str(locked))
    for argv in (["sweep", "--out-dir", str(locked / "sweep"), "--grid", "lr=0.1", "--device", "cpu"],
                 ["plot", "--schedule", "--out", str(locked / "schedule.png")]):
        assert cr.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{locked} is not a writable folder" in err, err
    assert list(locked.iterdir()) == []


def test_an_lr_find_killed_between_its_two_files_is_finished_by_the_same_command(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    data_dir = tmp_path / "data"
    write_official_layout(data_dir, n_train=96, n_test=32)
    out = tmp_path / "lrf"
    args = ["lr-find", "--data-dir", str(data_dir), "--arch", "resnet18", "--width", "4", "--batch-size", "32",
            "--device", "cpu", "--no-download", "--out-dir", str(out), "--steps", "8"]
    process = start_cli(*args, env={FAULT_PAUSE_ENV: "written lr_find.png"})
    killed_at(process, "written lr_find.png")
    assert (out / "lr_find.csv").exists() and not (out / "lr_find.png").exists()
    assert cr.main(args) == 0 and (out / "lr_find.png").exists()  # finished, not refused
    assert not list(out.glob(f"*{cr.TEMP_SUFFIX}"))
    # a Ctrl-C during the steps says so, and that nothing was written
    monkeypatch.setattr(lab, "lr_find", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    capsys.readouterr()
    assert cr.main([*args[:-3], str(tmp_path / "other"), "--steps", "8"]) == 130
    assert capsys.readouterr().err == f"error: lr-find stopped by Ctrl-C before it wrote anything into " \
                                      f"{tmp_path / 'other'}\n" and not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------------------------------------
# Settings of a sweep


def test_sweep_specs_parse_with_each_settings_type_and_bad_ones_are_one_message():
    grid = lab.parse_sweep_specs(["lr=0.05,0.1", "weight-decay=5e-4", "arch=resnet18,resnet34", "mixup=false,true",
                                 "t0=auto,50", "width=8,16"])
    assert grid == {"lr": [0.05, 0.1], "weight_decay": [5e-4], "arch": ["resnet18", "resnet34"],
                    "mixup": [False, True], "t0": [None, 50.0], "width": [8, 16]}
    space = lab.parse_sweep_specs(["lr=log:0.01:1", "momentum=0.8:0.95", "width=8:32", "stem=cifar,imagenet"],
                                 ranges=True)
    assert space == {"lr": ("log", 0.01, 1.0), "momentum": ("uniform", 0.8, 0.95), "width": ("uniform", 8, 32),
                     "stem": ["cifar", "imagenet"]}
    for bad, words in [(["lr"], "gives lr no values: lr=V1,V2"), (["=0.1"], "not NAME=VALUES"),
                       (["lrr=0.1"], "did you mean lr"), (["seed=1,2"], "--seeds"),
                       (["width=8,x"], "cannot read"), (["lr=0.1,0.1"], "repeated"),
                       (["lr=0.1", "lr=0.2"], "given twice"), (["out_dir=a,b"], "not NAME=VALUES"),
                       (["lr="], "gives lr no values"), (["width=8.5"], "width takes whole numbers, got '8.5'"),
                       (["lr=0.1,x"], "lr takes numbers, got 'x'")]:
        with pytest.raises(cr.UserError, match=words):
            lab.parse_sweep_specs(bad)
    for bad in (["lr=log:0:1"], ["lr=1:0.1"], ["arch=a:b"]):
        with pytest.raises(cr.UserError, match="LOW < HIGH"):
            lab.parse_sweep_specs(bad, ranges=True)
    for bad in (["lr=log:0.1"], ["lr=0.1:0.2:0.3"], ["lr=log:0.1:0.2:0.3"]):
        with pytest.raises(cr.UserError, match="a range is LOW:HIGH or log:LOW:HIGH"):
            lab.parse_sweep_specs(bad, ranges=True)


def test_random_settings_stay_in_their_ranges_repeat_with_the_seed_and_grow_as_a_prefix():
    space = lab.parse_sweep_specs(["lr=log:0.01:1", "momentum=0.8:0.95", "width=8:32", "stem=cifar,imagenet"],
                                 ranges=True)
    points = lab.sample_settings(space, 400, seed=3)
    assert points == lab.sample_settings(space, 400, seed=3) != lab.sample_settings(space, 400, seed=4)
    assert lab.sample_settings(space, 10, seed=3) == points[:10]
    lrs = [p["lr"] for p in points]
    assert all(0.01 <= v <= 1 for v in lrs) and all(float(f"{v:.3g}") == v for v in lrs)
    below = sum(v < 0.1 for v in lrs) / len(lrs)  # log-uniform: half the draws below the geometric middle
    assert 0.4 < below < 0.6
    assert all(isinstance(p["width"], int) and 8 <= p["width"] <= 32 for p in points)
    assert {p["stem"] for p in points} == {"cifar", "imagenet"}
    assert lab.grid_settings({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 2, "b": 3},
                                                            {"a": 2, "b": 4}]


def test_summary_is_the_mean_and_sample_std_and_the_choice_is_made_on_validation_even_when_test_disagrees():
    rows = []
    values = {("0.05", 0): (0.50, 0.70), ("0.05", 1): (0.54, 0.74),  # best on test, not on validation
              ("0.1", 0): (0.60, 0.40), ("0.1", 1): (0.62, 0.44),
              ("0.2", 0): (0.90, 0.95)}  # best on both, but its second seed has not finished
    for (lr, seed), (val, test) in values.items():
        rows.append({"run": f"lr={lr},seed={seed}", "lr": lr, "seed": seed, "status": "done",
                     "final_val_top1": val, "final_test_top1": test})
    rows.append({"run": "lr=0.2,seed=1", "lr": "0.2", "seed": 1, "status": "partial"})
    summary = {e["setting"]: e for e in lab.summarize_sweep(rows, ["lr"])}
    assert summary["lr=0.05"]["final_val_top1_mean"] == pytest.approx(statistics.mean([0.50, 0.54]))
    assert summary["lr=0.05"]["final_val_top1_std"] == pytest.approx(statistics.stdev([0.50, 0.54]))
    assert summary["lr=0.05"]["final_test_top1_std"] == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert summary["lr=0.2"]["done"] == 1 and summary["lr=0.2"]["runs"] == 2
    assert [s for s, e in summary.items() if e["chosen"]] == ["lr=0.1"]


# ----------------------------------------------------------------------------------------------------------
# Sweeps


@pytest.fixture(scope="session")
def grid_sweep(data, tmp_path_factory):
    """A 2 x 2 grid with 2 seeds: 8 tiny runs, trained once for the tests that read them."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    lines = []
    result = lab.sweep(tiny_config(), str(out), grid={"lr": [0.02, 0.1], "weight_decay": [5e-4, 1e-3]},
                      seeds=(0, 1), data=data, log=lines.append)
    return out, result, lines


def test_a_2x2_grid_with_2_seeds_writes_8_rows_and_a_4_row_summary_matching_a_hand_computation(grid_sweep):
    out, result, lines = grid_sweep
    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 8 and {r["status"] for r in rows} == {"done"}
    assert {(r["lr"], r["weight_decay"], r["seed"]) for r in rows} == {
        (lr, wd, s) for lr in ("0.02", "0.1") for wd in ("0.0005", "0.001") for s in ("0", "1")}
    for row in rows:  # each row is its run folder's last epoch
        metrics = read_csv(out / "runs" / row["run"] / "metrics.csv")
        assert len(metrics) == 2 and float(row["final_val_top1"]) == pytest.approx(float(metrics[-1]["val_top1"]))
        assert float(row["final_test_top1"]) == pytest.approx(float(metrics[-1]["test_top1"]))
        assert float(row["best_val_top1"]) == pytest.approx(max(float(m["val_top1"]) for m in metrics))
        config = cr.RunFolder(str(out / "runs" / row["run"])).saved_config()
        assert (config["lr"], config["weight_decay"], config["seed"], config["val_split"]) == (
            float(row["lr"]), float(row["weight_decay"]), int(row["seed"]), 64)
    summary = read_csv(out / "summary.csv")
    assert len(summary) == 4
    for entry in summary:
        members = [r for r in rows if (r["lr"], r["weight_decay"]) == (entry["lr"], entry["weight_decay"])]
        val = [float(r["final_val_top1"]) for r in members]
        test = [float(r["final_test_top1"]) for r in members]
        assert float(entry["final_val_top1_mean"]) == pytest.approx(statistics.mean(val), abs=1e-6)
        assert float(entry["final_val_top1_std"]) == pytest.approx(statistics.stdev(val), abs=1e-6)
        assert float(entry["final_test_top1_mean"]) == pytest.approx(statistics.mean(test), abs=1e-6)
    best = max(summary, key=lambda e: float(e["final_val_top1_mean"]))
    assert [e["setting"] for e in summary if e["chosen"] == "yes"] == [best["setting"]] == [result.chosen["setting"]]
    assert any("chosen on validation" in line for line in lines)
    assert "choosing on the last 64 training images" in lines[0]


def test_the_same_sweep_again_trains_nothing(grid_sweep, data, monkeypatch):
    out, _, _ = grid_sweep
    before = {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")}
    monkeypatch.setattr(cr, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    lines = []
    result = lab.sweep(tiny_config(), str(out), grid={"lr": [0.02, 0.1], "weight_decay": [5e-4, 1e-3]},
                      seeds=(0, 1), data=data, log=lines.append)
    assert "8 already finished" in lines[0] and len(result.rows) == 8
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")}


def test_a_second_sweep_in_the_same_folder_is_one_line_that_names_the_run_and_the_way(data, tmp_path):
    out = tmp_path / "sweep"
    first = cr.RunFolder(str(out / "runs" / "lr=0.05,seed=0"))
    first.open()  # as the first sweep's process holds the run it trains
    try:
        with pytest.raises(cr.UserError, match=r"^another process is training run lr=0.05,seed=0 \(.*\): a second "
                                               r"sweep in the same --out-dir\? .* --devices spreads its runs"):
            lab.sweep(tiny_config(), str(out), grid={"lr": [0.05, 0.1]}, data=data, log=lambda m: None)
    finally:
        first.close()
    assert not (out / "runs" / "lr=0.1,seed=0").exists()  # no other run started


def test_a_run_that_diverges_is_marked_the_sweep_goes_on_and_its_figure_marks_it(data, tmp_path, monkeypatch):
    out, lines = tmp_path / "sweep", []
    result = lab.sweep(tiny_config(), str(out), grid={"lr": [0.05, 1e30]}, data=data, log=lines.append)
    status = {r["run"]: r["status"] for r in read_csv(out / "sweep.csv")}
    assert status == {"lr=0.05,seed=0": "done", "lr=1e+30,seed=0": "diverged"}
    diverged = out / "runs" / "lr=1e+30,seed=0"
    assert "the loss became non-finite at epoch 1, step" in (diverged / lab.DIVERGED_FILE).read_text()
    assert not (diverged / "last.pt").exists()  # no checkpoint holds the non-finite values
    assert result.chosen["setting"] == "lr=0.05" and [e["done"] for e in result.summary] == [1, 0]
    # the same sweep again trains neither: the diverged run stays marked
    monkeypatch.setattr(cr, "train", lambda *a, **k: pytest.fail("a finished or diverged run was trained again"))
    lines.clear()
    lab.sweep(tiny_config(), str(out), grid={"lr": [0.05, 1e30]}, data=data, log=lines.append)
    assert "2 already finished" in lines[0]
    if importlib.util.find_spec("matplotlib") is None:
        return
    figures = []  # the figure: the diverged run an x at 0 where its rate is, the axis ticked at both rates
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    lab.plot_sweep(str(out), str(out / "sweep.png"))
    (fig,) = figures
    against_lr = fig.axes[1]
    (cross,) = [line for line in against_lr.get_lines() if line.get_label() == "diverged"]
    assert cross.get_marker() == "x" and list(cross.get_xdata()) == [1e30] and list(cross.get_ydata()) == [0.0]
    assert [t.get_text() for t in against_lr.get_xticklabels()] == ["0.05", "1e+30"]
    import matplotlib.pyplot as plt

    plt.close(fig)
    # a run that diverges after finished epochs keeps its curve, and is an x only, not a point at its last top-1
    late = out / "runs" / "lr=0.05,seed=0"
    (late / lab.DIVERGED_FILE).write_text("the loss became non-finite at epoch 3, step 1\n")
    lab.sweep(tiny_config(), str(out), grid={"lr": [0.05, 1e30]}, data=data, log=lines.append)
    figures.clear()
    lab.plot_sweep(str(out), str(out / "sweep.png"))
    curves, against_lr = figures[0].axes[:2]
    assert [(line.get_label(), list(line.get_xdata())) for line in curves.get_lines()] == [("lr=0.05 - diverged",
                                                                                            [1, 2])]
    lines_by_label = {line.get_label(): line for line in against_lr.get_lines()}
    assert list(lines_by_label["each run"].get_xdata()) == []
    assert list(lines_by_label["diverged"].get_xdata()) == [0.05, 1e30]
    plt.close(figures[0])
    # every run diverged in its first epoch: one line that says so, not "no finished epochs yet"
    (late / "metrics.csv").unlink()
    lab.sweep(tiny_config(), str(out), grid={"lr": [0.05, 1e30]}, data=data, log=lines.append)
    with pytest.raises(cr.UserError, match=r"every run of .* diverged in its first epoch \(each folder's "
                                           r"diverged.txt says where\): nothing to plot"):
        lab.plot_sweep(str(out), str(out / "sweep.png"))


def test_a_run_that_fails_in_a_worker_ends_the_sweep_at_once_and_no_other_run_starts(data, tmp_path):
    # width 10^6 cannot be allocated (36 TB): its runs, first in the grid, fail at once in both workers. The
    # sweep ended only after the workers had trained every width-4 run, which are later in the grid
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        lab.sweep(tiny_config(epochs=20), str(tmp_path / "sweep"), grid={"width": [1_000_000, 4]}, seeds=(0, 1, 2),
                  devices=["cpu", "cpu"], data=data, log=lambda m: None)
    assert list((tmp_path / "sweep" / "runs").iterdir()) == []


def test_worker_processes_train_the_same_runs_as_one_process(grid_sweep, data, tmp_path):
    out, _, _ = grid_sweep
    result = lab.sweep(tiny_config(), str(tmp_path / "parallel"), grid={"lr": [0.02, 0.1], "weight_decay": [5e-4]},
                      seeds=(0,), devices=["cpu", "cpu"], data=data, log=lambda m: None)
    assert [r["status"] for r in result.rows] == ["done", "done"]
    # the workers ran with one thread each: the same runs in this process with one thread are bit-identical
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lab.sweep(tiny_config(), str(tmp_path / "serial"), grid={"lr": [0.02, 0.1], "weight_decay": [5e-4]},
                 seeds=(0,), data=data, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    for row in result.rows:
        assert deterministic(tmp_path / "parallel" / "runs" / row["run"]) == \
            deterministic(tmp_path / "serial" / "runs" / row["run"])


def test_a_sweep_refuses_to_choose_on_the_test_set_and_a_changed_base(grid_sweep, data):
    out, _, _ = grid_sweep
    with pytest.raises(cr.UserError, match="--val-split must be at least 1"):
        lab.sweep(tiny_config(val_split=0), str(out), grid={"lr": [0.1]}, data=data)
    with pytest.raises(cr.UserError, match=r"other settings: --epochs 3 \(the run has 2\)"):
        lab.sweep(tiny_config(epochs=3), str(out), grid={"lr": [0.02, 0.1], "weight_decay": [5e-4]}, data=data)
    with pytest.raises(cr.UserError, match="run lr=-1,seed=0: --lr must be positive"):
        lab.sweep(tiny_config(), str(out), grid={"lr": [-1.0]}, data=data)


def sweep_cli_args(data_dir, out, *grid) -> list:
    return ["sweep", "--data-dir", str(data_dir), "--arch", "resnet18", "--width", "4", "--batch-size", "32",
            "--epochs", "2", "--device", "cpu", "--no-download", "--quiet", "--val-split", "32", "--out-dir", str(out),
            "--seeds", "0,1", "--grid", *grid]


def sweep_cli(data_dir, out, *grid, env=None):
    return start_cli(*sweep_cli_args(data_dir, out, *grid), env=env)


def test_a_killed_sweep_continues_where_it_stopped_and_a_larger_grid_trains_only_its_new_runs(tmp_path):
    data_dir = tmp_path / "data"
    write_official_layout(data_dir, n_train=128, n_test=32)
    out = tmp_path / "sweep"
    assert cr.main(sweep_cli_args(data_dir, out, "lr=0.05")) == 0
    kept = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}

    # a larger grid, killed (SIGKILL) inside the first of its new runs, after that run's first epoch
    second = sweep_cli(data_dir, out, "lr=0.05,0.2", env={FAULT_PAUSE_ENV: "renamed metrics.csv"})
    assert second.stderr.readline().startswith("fault point: renamed metrics.csv")
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=30)
    assert len(read_csv(out / "runs" / "lr=0.2,seed=0" / "metrics.csv")) == 1
    assert not (out / "runs" / "lr=0.2,seed=1").exists()

    third = sweep_cli(data_dir, out, "lr=0.05,0.2")
    stdout, stderr = third.communicate(timeout=120)
    assert third.returncode == 0, stderr
    assert "4 runs (2 settings x 2 seeds), 2 already finished" in stdout
    assert kept == {p: p.stat().st_mtime_ns for p in kept}  # the finished runs were not touched
    rows = read_csv(out / "sweep.csv")
    assert [(r["run"], r["status"], r["epochs"]) for r in rows] == [
        (f"lr={lr},seed={s}", "done", "2") for lr in ("0.05", "0.2") for s in (0, 1)]
    # the killed run, continued, is the run a straight sweep trains (with one thread, as the sweeps above)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cr.main(sweep_cli_args(data_dir, tmp_path / "straight", "lr=0.2")) == 0
    finally:
        torch.set_num_threads(threads)
    assert deterministic(out / "runs" / "lr=0.2,seed=0") == deterministic(tmp_path / "straight" / "runs" /
                                                                           "lr=0.2,seed=0")


def test_sweep_command_errors_are_one_message(tmp_path, capsys):
    base = ["sweep", "--data-dir", str(tmp_path), "--no-download", "--device", "cpu"]
    for extra, words in [([], "needs --out-dir"), (["--out-dir", "x"], "--grid NAME=V1,V2 ... or --random"),
                         (["--out-dir", "x", "--grid", "lr=1", "--random", "2", "lr=0:1"], "one of the two"),
                         (["--out-dir", "x", "--random", "lr=0:1"], "the number of settings first"),
                         (["--out-dir", "x", "--grid", "lr=1", "--seeds", "a"], "--seeds must be integers"),
                         (["--out-dir", "x", "--grid", "lr=1", "--search", "optuna"], "samples ranges"),
                         (["--out-dir", "x", "--grid", "lr=1", "--storage", "sqlite://"], "for --search optuna"),
                         (["--out-dir", "x", "--grid", "lr=1", "--resume"], "same command runs again")]:
        assert cr.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (extra, err)
    assert not (Path(HERE) / "x").exists()


# ----------------------------------------------------------------------------------------------------------
# Optuna


def study_rows(out) -> list:
    """Each run of a study, in the order they began: its setting and its final val top-1."""
    return [(r["lr"], r["weight_decay"], r["status"], r["final_val_top1"]) for r in read_csv(Path(out) / "sweep.csv")]


def test_an_optuna_study_stopped_or_grown_proposes_and_trains_what_an_uninterrupted_one_does(data, tmp_path, capfd):
    optuna = pytest.importorskip("optuna", reason="Optuna is an optional extra (pip install optuna)")
    space = lab.parse_sweep_specs(["lr=log:0.01:0.3", "weight_decay=1e-4:1e-3"], ranges=True)

    def study(out, trials, **kwargs):
        return lab.sweep(tiny_config(), str(out), space=space, trials=trials, search="optuna", data=data,
                         log=lambda m: None, **kwargs)

    study(tmp_path / "straight", 3)
    study(tmp_path / "grown", 2)  # then one trial more
    study(tmp_path / "grown", 3)
    out = tmp_path / "stopped"
    # stop inside the second trial: 2 epochs of 6 steps each = 12 calls per trial, so call 19 is trial 2's 7th
    first = study(out, 3, should_stop=stop_on_call(19))
    assert first.interrupted
    db = f"sqlite:///{out}/optuna.db"
    trials = optuna.load_study(study_name="stopped", storage=db).trials
    done = [(t.number, t.params, t.value) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 1 and trials[1].state == optuna.trial.TrialState.FAIL
    assert len(read_csv(out / "runs" / "trial-0001" / "metrics.csv")) == 1
    second = study(out, 3)
    assert not second.interrupted
    # the same settings, trained to the same numbers, whichever way the study got there; each trial a new one
    assert study_rows(out) == study_rows(tmp_path / "grown") == study_rows(tmp_path / "straight")
    assert len({lr for lr, *_ in study_rows(out)}) == 3
    trials = optuna.load_study(study_name="stopped", storage=db).trials
    assert [(t.number, t.params, t.value) for t in trials if t.number == 0] == done[:1]
    resumed = [t for t in trials if t.user_attrs.get("resumes") == 1]
    assert len(resumed) == 1 and resumed[0].params == trials[1].params and resumed[0].user_attrs["run"] == "trial-0001"
    assert len(read_csv(out / "runs" / "trial-0001" / "metrics.csv")) == 2
    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 3 and {r["status"] for r in rows} <= {"done", "pruned"}
    for row in rows:
        if row["status"] == "done":  # the study's value is the run's final val top-1
            trial = next(t for t in trials if t.number == int(row["trial"]))
            assert trial.value == pytest.approx(float(row["final_val_top1"]))
    assert (second.chosen is None) == all(r["status"] != "done" for r in rows)
    assert "Trial" not in capfd.readouterr().err  # Optuna's own notes (a traceback of the stopped trial) are off


def study_cli(data_dir, out, trials: int, env=None):
    return start_cli("sweep", "--data-dir", data_dir, "--arch", "resnet18", "--width", "4", "--batch-size", "32",
                     "--epochs", "2", "--device", "cpu", "--no-download", "--quiet", "--val-split", "32", "--out-dir",
                     out, "--search", "optuna", "--random", trials, "lr=log:0.01:0.3", env=env)


def killed_at(process, point: str) -> None:
    """Wait until the process pauses at the fault point, then kill it (SIGKILL: nothing runs after)."""
    line = process.stderr.readline()
    assert line.startswith(f"fault point: {point}"), line + process.stderr.read()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_a_killed_study_continues_its_trial_from_last_pt_and_leaves_no_temporary_file(tmp_path):
    optuna = pytest.importorskip("optuna", reason="Optuna is an optional extra (pip install optuna)")
    data_dir = tmp_path / "data"
    write_official_layout(data_dir, n_train=128, n_test=32)
    out = tmp_path / "study"
    # killed after trial 0's first epoch (it stays "running" in the study), then killed while writing sweep.json
    killed_at(study_cli(data_dir, out, 2, {FAULT_PAUSE_ENV: "renamed metrics.csv"}), "renamed metrics.csv")
    epoch_1 = read_csv(out / "runs" / "trial-0000" / "metrics.csv")
    killed_at(study_cli(data_dir, out, 2, {FAULT_PAUSE_ENV: "written sweep.json"}), "written sweep.json")
    assert list(out.glob(f".sweep.json.*{cr.TEMP_SUFFIX}"))
    rerun = study_cli(data_dir, out, 2)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and err == "", err
    rows = read_csv(out / "runs" / "trial-0000" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == epoch_1[0]  # continued, not trained again
    assert not list(out.rglob(f"*{cr.TEMP_SUFFIX}"))
    trials = optuna.load_study(study_name="study", storage=f"sqlite:///{out}/optuna.db").trials
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    runs = read_csv(out / "sweep.csv")
    assert [r["status"] for r in runs] == ["done", "done"] and runs[0]["lr"] != runs[1]["lr"]


def test_two_processes_started_at_once_share_one_new_study(tmp_path):
    optuna = pytest.importorskip("optuna", reason="Optuna is an optional extra (pip install optuna)")
    data_dir = tmp_path / "data"
    write_official_layout(data_dir, n_train=128, n_test=32)
    out = tmp_path / "study"
    processes = [study_cli(data_dir, out, 3) for _ in range(2)]  # both create the study's database
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0 and err == "", err
    trials = optuna.load_study(study_name="study", storage=f"sqlite:///{out}/optuna.db").trials
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    runs = [t.user_attrs["run"] for t in trials]
    assert len(finished) >= 3 and len(set(runs)) == len(runs)  # each trial its own run folder
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(runs)


def workers_of(pid: int) -> list:
    """The worker processes (multiprocessing's spawn_main) whose parent is `pid` (Linux: /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in command:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes through /proc (Linux)")
def test_sweep_workers_end_with_their_parent_and_a_lost_worker_is_one_line(tmp_path):
    data_dir = tmp_path / "data"
    write_official_layout(data_dir, n_train=128, n_test=32)
    out = tmp_path / "sweep"
    devices = ["--devices", "cpu,cpu"]
    parent = sweep_cli(data_dir, out, "lr=0.05,0.2", *devices, env={FAULT_PAUSE_ENV: "renamed metrics.csv"})
    assert parent.stderr.readline().startswith("fault point: renamed metrics.csv")  # a worker, after an epoch
    workers = workers_of(parent.pid)
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)  # the sweep's own process, however it ends: its workers end too
    parent.wait(timeout=30)
    deadline = time.time() + 60
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers)
    # at once the same command continues, and a worker killed under it ends the sweep with one line
    again = sweep_cli(data_dir, out, "lr=0.05,0.2", *devices, env={FAULT_PAUSE_ENV: "renamed metrics.csv"})
    assert again.stderr.readline().startswith("fault point: renamed metrics.csv")
    os.kill(workers_of(again.pid)[0], signal.SIGKILL)
    _, err = again.communicate(timeout=120)  # (the other worker may announce its own pause first)
    assert again.returncode == 1 and [line for line in err.splitlines() if not line.startswith("fault point")] == [
        "error: a worker process of the sweep ended before its run did (killed, or out of memory); each run folder "
        "keeps its last checkpoint, and the same command continues the sweep"], err


# ----------------------------------------------------------------------------------------------------------
# Figures


def test_a_sweep_of_many_settings_names_them_under_the_panels(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import json

    rates = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]  # a sweep folder written by hand: plot_sweep only reads files
    (tmp_path / "sweep.json").write_text(json.dumps({"varied": ["lr"]}))
    with open(tmp_path / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["run", "lr", "final_val_top1"])
        writer.writeheader()
        for i, lr in enumerate(rates):
            writer.writerow({"run": f"lr={lr},seed=0", "lr": lr, "final_val_top1": 0.1 * i})
            (tmp_path / "runs" / f"lr={lr},seed=0").mkdir(parents=True)
            (tmp_path / "runs" / f"lr={lr},seed=0" / "metrics.csv").write_text(
                "epoch,val_top1\n" + "".join(f"{e},{0.01 * e * i}\n" for e in (1, 2, 3)))
    (tmp_path / "summary.csv").write_text("setting,chosen\nlr=0.5,yes\n")
    figures = []
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    lab.plot_sweep(str(tmp_path), str(tmp_path / "sweep.png"))
    (fig,) = figures
    curves, against_lr = fig.axes
    assert curves.get_legend() is None  # six names would cover the curves: they are under the panels
    (names,) = fig.legends
    assert [t.get_text() for t in names.get_texts()] == [f"lr={lr}" for lr in rates[:-1]] + ["lr=0.5 - chosen on val"]
    assert fig.get_size_inches()[1] == pytest.approx(4.8 + 0.1 + 0.25 * 2)  # two rows of three names
    assert all(float(t).is_integer() for t in curves.get_xticks())  # whole epochs
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plot_of_a_sweep_folder_draws_its_curves_and_final_accuracy_per_setting(grid_sweep, tmp_path, capsys):
    pytest.importorskip("matplotlib.pyplot")
    out, _, _ = grid_sweep
    figure = tmp_path / "sweep.png"
    assert cr.main(["plot", str(out), "--out", str(figure)]) == 0
    assert_drawn_at(figure, (528, 1694))  # (7 + 2 x 4.2) x 4.8 inches at 110 dpi
    assert cr.main(["plot", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------------------------------------
# Learning curves, the planned schedule, and the bench command


def test_bench_command_times_training_and_evaluation_on_cpu(capsys, monkeypatch):
    code = cr.main(["bench", "--device", "cpu", "--arch", "resnet18", "--width", "4", "--limit-train", "256",
                    "--limit-test", "64", "--batch-size", "64", "--bench-epochs", "2", "--log-every", "2"])
    out = capsys.readouterr().out
    assert code == 0
    # it says first what it times, its step lines count its own 3 epochs (not the run's 400), then how long
    assert out.startswith("bench: times 2 training epochs of 256 images after one warm-up epoch, then 3 "
                          "evaluations"), out
    steps = [line for line in out.splitlines() if re.match(r"epoch \d+/\d+ step ", line)]
    assert steps and all(line.startswith(("epoch 1/3 ", "epoch 2/3 ", "epoch 3/3 ")) for line in steps), steps
    assert "/400" not in out and re.search(r"warm-up done in \d+m\d\ds; the 2 timed epochs and 3 evaluations "
                                          r"take at most about \d+m\d\ds more", out), out
    for text in ("warm-up (one epoch and one evaluation)", "s per epoch of 256 images", "scaled to 50,000 images",
                 "s for 64 images; scaled to 10,000", "random data"):
        assert text in out, text
    assert "TFLOP" not in out and "capture" not in out  # nothing claimed that a CPU run does not do
    r = json.loads(out.split("BENCH_JSON ")[1])
    assert len(r["train_epoch_seconds_each"]) == 2 and r["warmup_seconds"] > 0
    assert r["images_per_s"] == pytest.approx(256 / r["measured_train_epoch_seconds"])
    assert r["train_epoch_seconds"] == pytest.approx(r["measured_train_epoch_seconds"] * 50_000 / 256)
    assert r["eval_seconds_per_10k"] == pytest.approx(r["measured_eval_seconds"] * 10_000 / 64)
    assert r["epoch_with_eval_seconds"] == pytest.approx(r["train_epoch_seconds"] + r["eval_seconds_per_10k"])
    assert r["cuda_graphs"] is False and r["peak_memory_gib"] is None


def test_lr_find_and_bench_leave_no_trainer_waiting_for_the_garbage_collector(data, monkeypatch):
    # each Trainer (the data, the optimiser, captured graphs on the device) goes when the function returns, as
    # train()'s does, not at the next full garbage collection
    with trainers_alive_after(monkeypatch) as alive:
        lab.lr_find(tiny_config(), data, steps=4)
        lab.benchmark(tiny_config(), data, epochs=1, eval_repeats=1)
    assert alive == [False, False]


def test_bench_stopped_by_ctrl_c_says_it_writes_nothing(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lab, "benchmark", interrupted)
    assert cr.main(["bench", "--device", "cpu", "--limit-train", "64", "--limit-test", "16"]) == 130
    assert capsys.readouterr().err == "error: bench stopped by Ctrl-C; it writes no file, so nothing is lost\n"


def test_bench_reads_real_data_when_given(tiny_data_dir, capsys):
    code = cr.main(["bench", "--device", "cpu", "--arch", "resnet18", "--width", "4", "--data-dir", str(tiny_data_dir),
                    "--no-download", "--batch-size", "64", "--bench-epochs", "1", "--epochs", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "real data" in out and re.search(r" \(scaled\); 1 epoch: \d+m\d\ds\n", out), out


def test_plot_draws_learning_curves_of_several_runs(tiny_data_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    for name, epochs in (("a", "3"), ("b", "1")):
        assert cr.main(tiny_args(tiny_data_dir, tmp_path / name, "--epochs", epochs, "--seed", str(ord(name)))) == 0
    assert cr.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "first", "second"]) == 0
    png = tmp_path / "a" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(png)).shape
    assert (width, height) == (1760, 533)  # 16 x (4.5 + 0.35 for one row of run names) inches at 110 dpi
    # the one-epoch run is drawn as markers in every panel (a line of one point is not drawn), from epoch 0
    figures = []
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    lab.plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "c.png"))
    loss, accuracy, rate = figures[0].axes[:3]
    for ax in (loss, accuracy):
        drawn = [(len(line.get_xdata()), line.get_marker()) for line in ax.get_lines()]
        assert drawn[:2] == [(3, "None"), (3, "None")] and [n for n, _ in drawn[2:]] == [1, 1], drawn
        assert "None" not in {marker for _, marker in drawn[2:]} and drawn[2][1] != drawn[3][1], drawn
        assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > 3
    assert all(len(line.get_xdata()) > 1 for line in rate.get_lines())  # the rate: per step, a line
    assert rate.get_xlim() == loss.get_xlim()  # its last step starts before epoch 3, but the epochs line up


def test_plot_draws_the_other_top1_curves_each_run_measured(tiny_data_dir, tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    run = tmp_path / "measured"
    assert cr.main(tiny_args(tiny_data_dir, run, "--ema", "0.5", "--tta", "--val-split", "32", "--bn-recal", "1")) == 0
    figures = []
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    lab.plot_runs([str(run), str(tiny_run)], str(tmp_path / "curves.png"))
    accuracy = figures[0].axes[1]
    assert accuracy.get_title() == "accuracy"  # not only the test set's
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == [
        "top-1", "top-5", "val top-1", "EMA top-1", "flip-TTA top-1", "BN-recal top-1"]
    rows = metric_rows(run)
    columns = ("test_top1", "test_top5", "val_top1", "test_ema_top1", "test_tta_top1", "test_bnrecal_top1")
    drawn = [list(line.get_ydata()) for line in accuracy.get_lines()]
    assert drawn[:6] == [[100 * float(row[c]) for row in rows] for c in columns]
    assert [line.get_marker() for line in accuracy.get_lines()[:6]] == ["None", "None", "s", "D", "v", "P"]
    assert len(drawn) == 8  # the plain run: its top-1 and top-5 only


@pytest.mark.parametrize("runs", [1, 6])
def test_plot_names_each_run_once_under_the_panels_whatever_their_number(tiny_run, tmp_path, monkeypatch, runs):
    pytest.importorskip("matplotlib")
    figures = []
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    labels = [f"run {i}" for i in range(runs)]
    lab.plot_runs([str(tiny_run)] * runs, str(tmp_path / "curves.png"), labels)
    (fig,) = figures
    (names,) = fig.legends  # the runs, once each, in their colours
    assert [t.get_text() for t in names.get_texts()] == labels
    loss, accuracy, lr = fig.axes
    assert [line.get_color() for line in names.get_lines()] == [line.get_color() for line in loss.lines[::2]]
    # each panel's own legend says what its line styles mean, not which run is which
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["test", "train"]
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["top-1", "top-5"]
    assert lr.get_legend() is None  # every rate is per step (each run has its config.json)
    assert fig.get_size_inches()[1] == pytest.approx(4.5 + 0.1 + 0.25 * (1 if runs <= 4 else 2))
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plot_of_a_run_without_config_json_draws_its_rate_at_each_epoch_start(tiny_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    bare = tmp_path / "bare"  # a run folder put together by hand: metrics.csv without config.json
    bare.mkdir()
    (bare / "metrics.csv").write_text((tiny_run / "metrics.csv").read_text())
    figures = []
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    without = "at epoch starts (a run without config.json)"
    for runs, title, key in (([bare], "learning rate (at epoch starts)", [without]),
                             ([tiny_run, bare], "learning rate (per step)", ["per step", without])):
        lab.plot_runs([str(r) for r in runs], str(tmp_path / "curves.png"))
        rate = figures[-1].axes[2]
        assert rate.get_title() == title and [t.get_text() for t in rate.get_legend().get_texts()] == key
        epoch_starts = rate.get_lines()[-1]
        assert list(epoch_starts.get_ydata()) == [float(r["lr"]) for r in metric_rows(tiny_run)]
        assert epoch_starts.get_marker() == "o"
    import matplotlib.pyplot as plt

    plt.close("all")


def test_plotted_schedule_is_the_rate_of_every_step(tiny_data_dir, tiny_run):
    # the tiny run: 192 images in batches of 32, 2 epochs, one cycle (t0 auto = 2): 12 steps, the cosine
    points, rates = lab._run_schedule(str(tiny_run), 2)
    assert points == [i / 6 for i in range(12)]  # every step, not the epoch's end (it belongs to the next cycle)
    assert rates == [pytest.approx(0.05 * (1 + math.cos(math.pi * x / 2))) for x in points]
    assert [float(r["lr"]) for r in metric_rows(tiny_run)] == [pytest.approx(rates[0]), pytest.approx(rates[6])]


def test_plot_schedule_shows_that_the_notebooks_400_epochs_end_at_96_percent_of_the_peak(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "schedule.png"
    assert cr.main(["plot", "--schedule", "--epochs", "400", "--t0", "50", "--t-mult", "2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote {out}: the run ends 50 epochs into a 400-epoch cycle, at "
                                               f"96% of the peak rate; restarts at epochs 50, 150, 350")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    notebook = lab.plot_schedule(cr.TrainConfig(epochs=400, t0=50), str(out))
    assert notebook["end_fraction"] == pytest.approx((1 + math.cos(math.pi * 50 / 400)) / 2)  # 0.962
    auto = lab.plot_schedule(cr.TrainConfig(epochs=400, warmup_epochs=2, lr=0.4, batch_size=512), str(out))
    assert auto["end_fraction"] == 0 and auto["restarts"] == pytest.approx([2 + 398 / 7, 2 + 3 * 398 / 7])
    assert cr.main(["plot", "--schedule", "--epochs", "0"]) == 2  # the same checks as the training flags


def test_plot_schedule_of_a_run_folder_draws_its_own_steps_and_the_epochs_it_has_trained(tiny_run, tmp_path,
                                                                                         capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"  # the tiny run, stopped (as metrics.csv says) after its first of 2 epochs
    run.mkdir()
    (run / "config.json").write_bytes((tiny_run / "config.json").read_bytes())
    (run / "metrics.csv").write_text("".join((tiny_run / "metrics.csv").read_text().splitlines(True)[:2]))
    figures = []
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    assert cr.main(["plot", "--schedule", str(run)]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote {run / 'schedule.png'}: the run ends at the end of a cycle, "
                                               f"at 0% of the peak rate; restarts at epochs none; trained so far: 1 "
                                               f"of 2 epochs")
    ax = figures[0].axes[0]
    points, rates = lab._run_schedule(str(run), 2)  # its own 6 steps per epoch (flags alone: 50,000 images')
    assert list(ax.get_lines()[0].get_xdata()) == points == [i / 6 for i in range(12)]
    assert list(ax.get_lines()[0].get_ydata()) == rates
    assert "trained so far: 1 epochs" in [t.get_text() for t in ax.get_legend().texts]
    assert ax.patches[0].get_x() == 0 and ax.patches[0].get_width() == 1  # the span of the epochs trained
    # a run extended by --resume --epochs 20 from 12: the extension's own cycle is a restart, and the run ends
    # at its bottom, not 5.5 epochs into the 8-epoch cycle where the plan of 12 epochs ended
    extended = lab.plot_schedule(cr.TrainConfig(epochs=20, t0=2, warmup_epochs=0.5, extended_from=(12,)), "x.png")
    assert extended == {"end_fraction": 0.0, "restarts": [2.5, 6.5, 12], "into_cycle": 0.0, "cycle": 8}
    assert figures[-1].axes[0].get_title().endswith("peak 0.1 (extended from 12)")
    capsys.readouterr()
    for argv, message in [([str(run), "--lr", "0.2"], "train flags beside it (--lr) would not change it"),
                          ([str(tmp_path / "none")], "is not a run folder"),
                          ([str(tmp_path)], "holds no run's settings (no config.json")]:
        assert cr.main(["plot", "--schedule", *argv]) == 2
        assert message in capsys.readouterr().err


def test_plot_schedule_of_an_endless_run_draws_a_bounded_number_of_points_and_restarts(tmp_path, capsys,
                                                                                        monkeypatch):
    pytest.importorskip("matplotlib")
    # 10^8 epochs of 391 steps were 4e10 points, and the command was killed for memory
    points, rates = lab.schedule_per_step(cr.TrainConfig(epochs=10 ** 8, t0=50), 50.0, 391, 10 ** 8)
    assert lab.SCHEDULE_POINTS // 2 <= len(points) <= lab.SCHEDULE_POINTS and points[-1] > 0.99 * 10 ** 8
    assert rates[0] == 0.1 and len(lab.schedule_per_step(cr.TrainConfig(epochs=2), 2.0, 391, 2)[0]) == 782
    out = tmp_path / "schedule.png"  # 399 restarts, of which the first 100 are marked and listed
    assert cr.main(["plot", "--schedule", "--epochs", "400", "--t0", "1", "--t-mult", "1", "--batch-size", "25000",
                    "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert "restarts at epochs 1, 2, 3, 4," in printed and printed.endswith(", 99, 100 and more (the first 100 marked)")
    figures = []  # the figure's legend says so too: the lines stop at epoch 100
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    lab.plot_schedule(cr.TrainConfig(epochs=400, t0=1, t_mult=1, batch_size=25000), str(out))
    assert "warm restart (the first 100 marked)" in [t.get_text() for t in figures[0].axes[0].get_legend().texts]


def test_the_labs_path_flags_expand_a_tilde_that_the_shell_left(tiny_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").symlink_to(tiny_run)
    assert cr.main(["plot", "~/run", "--out=~/curves.png"]) == 0
    assert cr.main(["plot", "--schedule", "~/run", "--out=~/schedule.png"]) == 0
    assert (tmp_path / "curves.png").exists() and (tmp_path / "schedule.png").exists()
    assert f"wrote {tmp_path / 'curves.png'}" in capsys.readouterr().out


def test_plot_errors_are_one_message(tmp_path, capsys, monkeypatch):
    assert cr.main(["plot", str(tmp_path)]) == 2
    assert "has no metrics.csv rows" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    (tmp_path / "metrics.csv").write_text("epoch,lr,train_loss,test_loss,test_top1,test_top5\n1,0.1,4,4,0.1,0.2\n")
    assert cr.main(["plot", str(tmp_path)]) == 2
    assert "figures need matplotlib" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Understanding a run: report, preview-aug, conv-demo


@pytest.fixture(scope="session")
def tiny_cifar100(tmp_path_factory) -> Path:
    return official_layout(tmp_path_factory, 256, 128)


@pytest.fixture(scope="session")
def tiny_val_run(tiny_cifar100, tmp_path_factory) -> Path:
    """A 2-epoch tiny CIFAR-100 run that holds out 64 training images, and keeps an --ema average."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert cr.main(tiny_args(tiny_cifar100, out, "--val-split", "64", "--ema", "0.9")) == 0
    return out


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
    confusion = lab.confusion_matrix(predictions, labels, 7)
    for t in range(7):
        for p in range(7):
            assert confusion[t, p] == sum(1 for a, b in zip(labels.tolist(), predictions.tolist()) if (a, b) == (t, p))
    for row in lab.per_class_metrics(confusion):
        c = row["class"]
        mine = [(a, b) for a, b in zip(labels.tolist(), predictions.tolist()) if a == c]
        predicted_as = [(a, b) for a, b in zip(labels.tolist(), predictions.tolist()) if b == c]
        assert row["support"] == len(mine)
        assert row["recall"] == row["accuracy"] == pytest.approx(sum(a == b for a, b in mine) / len(mine))
        assert row["precision"] == pytest.approx(sum(a == b for a, b in predicted_as) / len(predicted_as)
                                                 if predicted_as else 0.0)
    pairs = lab.most_confused_pairs(confusion, k=5)
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
    assert lab.calibration(probabilities, labels)["ece"] < 0.01

    # over-confident: every image at confidence 0.9, right 60 % of the time: ECE = |0.6 - 0.9| = 0.3
    probabilities = torch.full((1000, k), 0.1 / (k - 1))
    probabilities[:, 0] = 0.9
    labels = torch.tensor([0] * 600 + [1] * 400)
    result = lab.calibration(probabilities, labels, bins=15)
    assert result["ece"] == pytest.approx(0.3, abs=1e-6)
    filled = [b for b in result["bins"] if b["count"]]
    assert len(filled) == 1 and filled[0]["low"] < 0.9 <= filled[0]["high"] and filled[0]["count"] == 1000


def test_superclass_accuracy_and_the_share_of_errors_inside_the_right_superclass():
    data = synthetic_data(n_train=10, n_test=10, dataset="cifar100")
    data.superclass_of, data.superclasses = torch.arange(100) // 5, [f"s{i}" for i in range(20)]
    labels = torch.tensor([0, 1, 2, 3, 10, 11, 50, 99])
    predicted = torch.tensor([0, 2, 4, 7, 10, 30, 51, 99])  # wrong: 1->2, 2->4 (same), 3->7, 11->30, 50->51 (same)
    logits = F.one_hot(predicted, 100).float() * 5
    result = lab.analyse_predictions(logits, labels, data)
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
    a = lab.analyse_predictions(logits, labels, data)
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
        self.sources, self.links, self.scrolled, self.names, self.open_div = [], [], [], [], None

    def handle_endtag(self, tag):
        if tag == "div":
            self.open_div = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src", ""))
            self.scrolled.append(self.open_div == "wide")
            self.names.append(attrs.get("alt", ""))
        if tag == "div":
            self.open_div = attrs.get("class")
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])


def page_text(folder) -> str:
    return (folder / "report.html").read_text()


def report_pages(monkeypatch) -> list:
    """report() without drawing: its figures stubbed, and each page it would write kept as (title, sections,
    folder) in the list returned."""
    pages = []
    monkeypatch.setattr(lab, "_pyplot", lambda: None)
    monkeypatch.setattr(lab, "_report_figures", lambda *a: {"per_class": "p.png", "confusion": "c.png"})
    monkeypatch.setattr(lab, "plot_runs", lambda *a: "curves.png")
    monkeypatch.setattr(lab, "_report_html", lambda *page: pages.append(page) or "report.html")
    return pages


def test_report_writes_what_the_run_measured_and_a_self_contained_page(tiny_val_run, capsys, monkeypatch):
    pytest.importorskip("matplotlib.pyplot")
    monkeypatch.chdir(tiny_val_run.parent)
    assert cr.main(["report", tiny_val_run.name, "--device", "cpu"]) == 0
    folder = tiny_val_run / "report_last"  # a run folder's last.pt
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
        assert_drawn_at(folder / name, size)
    # the page: parses, and every image is embedded
    page = _Images()
    page.feed((folder / "report.html").read_text())
    assert len(page.sources) >= 11 and all(s.startswith("data:image/png;base64,") for s in page.sources)
    assert page.links == []
    # the chart of 100 class names keeps its size (scrolled sideways, so its names stay readable); the rest fit
    assert [name for name, wide in zip(page.names, page.scrolled) if wide] == ["per_class.png", "val_per_class.png"]
    assert ".wide img{max-width:none}" in (folder / "report.html").read_text()
    assert summary["test"]["loss"] == float(f"{summary['test']['loss']:.6g}")  # no float32 noise
    assert "<h1>report: " in page_text(folder) and "EMA weights" not in page_text(folder)
    # --ema: the same report of the run's averaged weights, which measure what the run wrote for them (its
    # numbers only: the figures are drawn by the code drawn above, of other weights)
    def no_matplotlib():
        raise cr.UserError("the figures need matplotlib")

    monkeypatch.setattr(lab, "_pyplot", no_matplotlib)
    with pytest.raises(cr.UserError, match="wrote the numbers into report_ema"):
        lab.report(tiny_val_run.name, out_dir="report_ema", device="cpu", ema=True)
    # by default beside the checkpoint, named after the weights (no report replaces another's), the page
    # saying which (its figures not drawn again here)
    pages = report_pages(monkeypatch)
    lab.report(f"{tiny_val_run.name}/best.pt", device="cpu", ema=True)
    epoch = json.loads((tiny_val_run / "report_best_ema" / "summary.json").read_text())["epoch"]
    assert [(title, where) for title, _, where in pages] == [
        (f"report: {tiny_val_run.name}/best.pt (epoch {epoch}, EMA weights)", str(tiny_val_run / "report_best_ema"))]
    assert (folder / "report.html").exists()
    averaged = json.loads((tiny_val_run.parent / "report_ema" / "summary.json").read_text())
    last = metric_rows(tiny_val_run)[-1]
    assert averaged["weights"] == "ema" and summary["weights"] == "raw"
    assert averaged["test"]["top1"] == pytest.approx(float(last["test_ema_top1"]), abs=1e-6)
    report_dir = os.path.join(tiny_val_run.name, "report_last")  # a path from here, as the other commands print
    assert printed.endswith(f"into {report_dir}; open {os.path.join(report_dir, 'report.html')}\n"), printed


def test_a_report_of_a_test_chosen_best_pt_says_its_numbers_are_optimistic(tiny_run, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setattr(lab, "_pyplot", lambda: (_ for _ in ()).throw(cr.UserError("no matplotlib here")))
    for name, chosen in (("best.pt", True), ("last.pt", False)):  # a run without --val-split
        with pytest.raises(cr.UserError, match="wrote the numbers"):
            lab.report(str(tiny_run / name), out_dir=str(tmp_path / name), device="cpu")
        assert json.loads((tmp_path / name / "summary.json").read_text())["chosen_on_test"] is chosen
    # the page says so first in its test section (its figures not drawn here)
    pages = report_pages(monkeypatch)
    lab.report(str(tiny_run / "best.pt"), out_dir=str(tmp_path / "page"), device="cpu")
    assert "so their test numbers are optimistic" in dict(pages[0][1])["test set"][0]
    # the command says so, beside its numbers
    summary = {"test": {"n": 64, "top1": 0.1, "top5": 0.3, "ece": 0.05}, "chosen_on_test": True}
    monkeypatch.setattr(lab, "report", lambda *a, **k: {"summary": summary, "files": [], "folder": str(tmp_path)})
    assert lab.report_main([str(tiny_run / "best.pt")]) == 0
    assert "best.pt is the epoch of the best test top-1 (the run had no --val-split), so its test numbers are " \
           "optimistic" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# preview-aug


@pytest.mark.parametrize("aug", ["basic", "advanced"])
def test_the_preview_shows_exactly_what_the_trainer_feeds_the_model(monkeypatch, aug):
    data = synthetic_data(n_train=256, n_test=32, dataset="cifar100")
    config = cr.TrainConfig(dataset="cifar100", arch="resnet18", width=4, batch_size=32, device="cpu", seed=3,
                            quiet=True, epochs=1, aug=aug)
    shown = lab.preview_augmentation(config, data, batches=2, per_batch=8)
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
        assert torch.allclose(batch["mixed"], lab._denormalize(x[:8], data), atol=1e-4)
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


def test_the_preview_of_a_run_whose_mixing_is_off_from_its_first_epoch_shows_no_mixing(monkeypatch):
    data = synthetic_data(n_train=64, n_test=32, dataset="cifar100")
    config = cr.TrainConfig(arch="resnet18", width=4, batch_size=32, device="cpu", epochs=2, mix_off_epochs=2)
    shown = lab.preview_augmentation(config, data)  # it showed a MixUp and a CutMix batch the run never trains
    fed = []
    monkeypatch.setattr(cr.Trainer, "_step", lambda self, x, a, b, lam, weight=1.0:
                        fed.append((x, float(lam))) or torch.zeros(()))
    cr.Trainer(config, data, log=lambda m: None).train_epoch()
    assert [b["method"] for b in shown] == ["none"] and fed[0][1] == 1.0
    assert torch.equal(shown[0]["inputs"], fed[0][0])


def test_preview_command_draws_the_grid(tiny_cifar100, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib.pyplot")
    out = tmp_path / "aug.png"
    assert cr.main(["preview-aug", "--data-dir", str(tiny_cifar100), "--no-download", "--batch-size", "32",
                    "--out", str(out), "--images", "6"]) == 0
    printed = capsys.readouterr().out
    assert "step 1:" in printed
    assert_drawn_at(out, (1287, 1155))  # 6 columns x 1.75 in, 6 rows x 1.95 in, at 110 dpi
    # the CutMix box printed is the one drawn: first and last row and column, both included
    boxes = re.findall(r"box rows (\d+)-(\d+) columns (\d+)-(\d+)", printed)
    assert len(boxes) == 1, printed  # one batch of each method is shown
    figures = []
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    assert cr.main(["preview-aug", "--data-dir", str(tiny_cifar100), "--no-download", "--batch-size", "32",
                    "--out", str(out), "--images", "6"]) == 0
    titles = [panel._suptitle.get_text() for panel in figures[0].subfigs]
    (top, bottom, left, right), = boxes
    assert any(f"rows {top}-{bottom}, columns {left}-{right} pasted" in title for title in titles), titles


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
                    assert lab.conv_output_size(n, k, s, p) == actual, (n, k, s, p)
    demo = lab.conv_demo(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert len(demo["rows"]) == 4 * 3 * 4
    for row in demo["rows"]:
        if row["p"] == "same" and row["s"] > 1:
            assert row["actual"] is None and "same" in row["refused"]  # torch refuses it
        else:
            assert row["formula"] == row["actual"] == row["output"].shape[-1], row
    table = lab.conv_table(demo)
    assert "   32   3   2  1                      16                16" in table


def test_the_named_filters_do_what_they_say():
    flat = torch.full((1, 1, 9, 9), 0.7)
    vertical = torch.zeros(1, 1, 9, 9)
    vertical[..., 5:] = 1.0  # dark left, bright right
    for name in lab.CONV_FILTERS:  # one pixel has no neighbours: at 1x1 each filter is the weight 1
        assert torch.equal(lab.conv_filter(name, 1), torch.ones(1, 1))
    for k in (3, 5, 7):  # the edge filter finds a vertical edge at every size, a horizontal one not at all
        edge = lab.conv_filter("edge", k).view(1, 1, k, k)
        assert F.conv2d(vertical, edge).max() == pytest.approx(1.0)  # right half bright, left half dark
        assert F.conv2d(vertical.transpose(2, 3), edge).abs().max() < 1e-6
    for k in (3, 5, 7):
        assert torch.allclose(F.conv2d(flat, lab.conv_filter("edge", k).view(1, 1, k, k)), torch.zeros(1), atol=1e-5)
        assert torch.allclose(F.conv2d(flat, lab.conv_filter("blur", k).view(1, 1, k, k)), torch.tensor(0.7))
        assert torch.allclose(F.conv2d(flat, lab.conv_filter("sharpen", k).view(1, 1, k, k)), torch.tensor(0.7))
        relief = lab.conv_filter("emboss", k) - lab.conv_filter("emboss", k)[k // 2, k // 2] * (
            torch.arange(k * k).view(k, k) == (k * k) // 2)  # without its centre: -1 above, +1 below the diagonal
        assert torch.equal(relief, -relief.flip(0, 1)) and relief.sum() == 0 and relief[-1, -1] == 1
        assert F.conv2d(flat, lab.conv_filter("emboss", k).view(1, 1, k, k)).allclose(torch.tensor(0.7))


def test_conv_demo_draws_what_conv2d_refuses_as_refused_and_says_nothing_of_torch_warnings(tmp_path, capsys):
    plt = pytest.importorskip("matplotlib.pyplot")
    small = tmp_path / "small.png"
    plt.imsave(small, np.random.default_rng(0).random((4, 4, 3)))  # kernels 5 and 7 are larger than it
    photo = tmp_path / "photo.png"
    plt.imsave(photo, np.random.default_rng(1).random((40, 40, 3)))
    for image, kernel in ((small, []), (photo, ["--kernel=" + ",".join(["0.01"] * 100 ** 2)]),
                          (photo, ["--kernel=1,0,0,-1"])):  # the last: even, which torch warns about with "same"
        out = tmp_path / f"{image.stem}{len(kernel)}.png"
        assert cr.main(["conv-demo", "--image", str(image), "--out", str(out), *kernel]) == 0
        printed = capsys.readouterr()
        assert printed.err == "" and out.exists(), printed.err
        assert ("refused: Calculated padded input size" in printed.out) == (image == small or
                                                                         len(kernel[0]) > 100)


def test_conv_demo_command_prints_the_table_and_draws_the_figures(tiny_cifar100, tiny_val_run, tmp_path, capsys,
                                                                  monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    out = tmp_path / "conv" / "conv_demo.png"
    assert cr.main(["conv-demo", "--index", "5", "--filter", "blur", "--out", str(out), "--checkpoint",
                    str(tiny_val_run), "--device", "cpu", "--data-dir", str(tiny_cifar100), "--no-download"]) == 0
    printed = capsys.readouterr().out
    assert "test image 5 (class_" in printed and "floor((n + 2p - k) / s) + 1" in printed
    assert printed.endswith(f"wrote {out} and {out.parent / 'network.png'}\n")  # both paths as --out was given
    assert_drawn_at(out, (957, 1760))
    # each output with its kernel beside it and the input's border drawn over it
    figures = []
    monkeypatch.setattr(lab, "_save", lambda fig, path: figures.append(fig) or path)
    assert cr.main(["conv-demo", "--index", "5", "--out", str(tmp_path / "again.png"), "--data-dir",
                    str(tiny_cifar100), "--no-download"]) == 0
    outputs = [ax for ax in figures[0].axes if ax.get_title().startswith("k ")]
    assert len(outputs) == 11  # 4 kernel sizes, 3 strides, 4 paddings
    for ax in outputs:
        assert len(ax.child_axes) == 1 and ax.child_axes[0].get_title().startswith("kernel ")
        assert [p.get_linestyle() for p in ax.patches] == ["--"]
    # a row of its 4 first-layer filters and one per stage (5), 1.6 inches each; 9 columns of 1.45 inches
    assert_drawn_at(tmp_path / "conv" / "network.png", (1056, 1435))
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


# ----------------------------------------------------------------------------------------------------------
# The README's first screens: every command of "Run it", at a tiny size


def test_readme_first_screens_commands_run(tiny_data_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    readme = (HERE / "README.md").read_text()
    screens = readme[readme.index("## Run it"):readme.index("## Continue a run")]
    blocks = re.findall(r"```bash\n(.*?)```", screens, flags=re.S)
    commands = [shlex.split(line.split("  #")[0]) for block in blocks for line in block.splitlines()
                if line.startswith("cifar100-resnet ")]
    assert len(commands) == 8, commands  # the two main jobs, the first run, and the five after it
    monkeypatch.chdir(tmp_path)
    data = ["--data-dir", str(tiny_data_dir), "--no-download", "--device", "cpu"]
    tiny = [*data, "--arch", "resnet18", "--width", "4", "--limit-train", "96", "--limit-test", "32",
            "--batch-size", "32", "--quiet"]
    for i, words in enumerate(commands):
        argv = [str(tiny_data_dir) if word == "DATA" else word for word in words[1:]]
        command = argv[0] if argv[0] in ("eval", "plot", "lr-find", "bench") else "train"
        if command == "train" and "--resume" in argv:
            argv += [*data, "--quiet"]
        elif command == "train":  # the main jobs at their own settings, then as small as a test takes
            argv += [*tiny, *(["--epochs", "3", "--out-dir", f"main{i}"] if "DATA" not in words else [])]
        elif command == "eval":
            argv += data
        elif command == "lr-find":
            argv += [*tiny, "--steps", "8", "--out-dir", "lrf"]
        elif command == "bench":
            argv += [*tiny, "--bench-epochs", "1"]
        assert cr.main(argv) == 0, (words, capsys.readouterr())
    assert len(metric_rows(tmp_path / "runs" / "first")) == 5 and (tmp_path / "runs" / "first" / "curves.png").exists()
