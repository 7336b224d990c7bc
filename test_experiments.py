"""Tests of the experiment commands: lr-find, sweep (grid, random, seeds, selection on validation, resume,
worker processes, Optuna) and their figures. Tiny models on synthetic data; CPU only.

Run: python -m pytest -q test_experiments.py
"""

import csv
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cifar100_resnet as cr
from test_cifar100_resnet import HERE, MODULE, stop_on_call, synthetic_data, write_official_layout


def tiny_config(**overrides) -> "cr.TrainConfig":
    """A run of a fraction of a second: resnet18 of width 4 on 256 synthetic CIFAR-10 images, 64 of them
    held out for validation."""
    values = dict(dataset="cifar10", arch="resnet18", width=4, epochs=2, batch_size=32, lr=0.05, val_split=64,
                  device="cpu", quiet=True, limit_train=256, limit_test=128)
    return cr.TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n_train=256, n_test=128)


def read_csv(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


DETERMINISTIC_COLUMNS = ["epoch", "lr", "train_loss", "test_loss", "test_top1", "val_loss", "val_top1"]


def deterministic(run_dir) -> list:
    return [[row[k] for k in DETERMINISTIC_COLUMNS] for row in read_csv(Path(run_dir) / "metrics.csv")]


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

    result = cr.lr_find(config, data, start=1e-4, end=1e3, steps=40, model=model, optimizer=optimizer)
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


def test_lr_find_stops_when_the_loss_diverges(data):
    result = cr.lr_find(tiny_config(label_smoothing=0.0), data, start=1e-2, end=1e6, steps=60)
    assert result.stopped_early and len(result.rates) < 60
    assert result.suggestion < result.rates[-1]


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
    plt = pytest.importorskip("matplotlib.pyplot")
    assert plt.imread(out / "lr_find.png").shape[:2] == (506, 880)  # 8 x 4.6 inches at 110 dpi
    assert cr.main(args) == 2 and "already holds an lr_find.csv" in capsys.readouterr().err
    # without matplotlib: the CSV still, then exit 2 with the install hint
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cr.main(args[:-4] + ["--out-dir", str(tmp_path / "bare"), "--steps", "4"]) == 2
    assert "pip install" in capsys.readouterr().err and (tmp_path / "bare" / "lr_find.csv").exists()


# ----------------------------------------------------------------------------------------------------------
# Settings of a sweep


def test_sweep_specs_parse_with_each_settings_type_and_bad_ones_are_one_message():
    grid = cr.parse_sweep_specs(["lr=0.05,0.1", "weight-decay=5e-4", "arch=resnet18,resnet34", "mixup=false,true",
                                 "t0=auto,50", "width=8,16"])
    assert grid == {"lr": [0.05, 0.1], "weight_decay": [5e-4], "arch": ["resnet18", "resnet34"],
                    "mixup": [False, True], "t0": [None, 50.0], "width": [8, 16]}
    space = cr.parse_sweep_specs(["lr=log:0.01:1", "momentum=0.8:0.95", "width=8:32", "stem=cifar,imagenet"],
                                 ranges=True)
    assert space == {"lr": ("log", 0.01, 1.0), "momentum": ("uniform", 0.8, 0.95), "width": ("uniform", 8, 32),
                     "stem": ["cifar", "imagenet"]}
    for bad, words in [(["lr"], "not NAME=VALUES"), (["lrr=0.1"], "did you mean lr"), (["seed=1,2"], "--seeds"),
                       (["width=8,x"], "cannot read"), (["lr=0.1,0.1"], "repeated"),
                       (["lr=0.1", "lr=0.2"], "given twice"), (["out_dir=a,b"], "not NAME=VALUES")]:
        with pytest.raises(cr.UserError, match=words):
            cr.parse_sweep_specs(bad)
    for bad in (["lr=log:0:1"], ["lr=1:0.1"], ["arch=a:b"]):
        with pytest.raises(cr.UserError, match="LOW < HIGH"):
            cr.parse_sweep_specs(bad, ranges=True)


def test_random_settings_stay_in_their_ranges_repeat_with_the_seed_and_grow_as_a_prefix():
    space = cr.parse_sweep_specs(["lr=log:0.01:1", "momentum=0.8:0.95", "width=8:32", "stem=cifar,imagenet"],
                                 ranges=True)
    points = cr.sample_settings(space, 400, seed=3)
    assert points == cr.sample_settings(space, 400, seed=3) != cr.sample_settings(space, 400, seed=4)
    assert cr.sample_settings(space, 10, seed=3) == points[:10]
    lrs = [p["lr"] for p in points]
    assert all(0.01 <= v <= 1 for v in lrs) and all(float(f"{v:.3g}") == v for v in lrs)
    below = sum(v < 0.1 for v in lrs) / len(lrs)  # log-uniform: half the draws below the geometric middle
    assert 0.4 < below < 0.6
    assert all(isinstance(p["width"], int) and 8 <= p["width"] <= 32 for p in points)
    assert {p["stem"] for p in points} == {"cifar", "imagenet"}
    assert cr.grid_settings({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 2, "b": 3},
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
    summary = {e["setting"]: e for e in cr.summarize_sweep(rows, ["lr"])}
    assert summary["lr=0.05"]["final_val_top1_mean"] == pytest.approx(statistics.mean([0.50, 0.54]))
    assert summary["lr=0.05"]["final_val_top1_std"] == pytest.approx(statistics.stdev([0.50, 0.54]))
    assert summary["lr=0.05"]["final_test_top1_std"] == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert summary["lr=0.2"]["done"] == 1 and summary["lr=0.2"]["runs"] == 2
    assert [s for s, e in summary.items() if e["chosen"]] == ["lr=0.1"]


# ----------------------------------------------------------------------------------------------------------
# Sweeps


@pytest.fixture(scope="module")
def grid_sweep(data, tmp_path_factory):
    """A 2 x 2 grid with 2 seeds: 8 tiny runs, trained once for the tests that read them."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    lines = []
    result = cr.sweep(tiny_config(), str(out), grid={"lr": [0.02, 0.1], "weight_decay": [5e-4, 1e-3]},
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
    result = cr.sweep(tiny_config(), str(out), grid={"lr": [0.02, 0.1], "weight_decay": [5e-4, 1e-3]},
                      seeds=(0, 1), data=data, log=lines.append)
    assert "8 already finished" in lines[0] and len(result.rows) == 8
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")}


def test_worker_processes_train_the_same_runs_as_one_process(grid_sweep, data, tmp_path):
    out, _, _ = grid_sweep
    result = cr.sweep(tiny_config(), str(tmp_path / "parallel"), grid={"lr": [0.02, 0.1], "weight_decay": [5e-4]},
                      seeds=(0,), devices=["cpu", "cpu"], data=data, log=lambda m: None)
    assert [r["status"] for r in result.rows] == ["done", "done"]
    # the workers ran with one thread each: the same runs in this process with one thread are bit-identical
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cr.sweep(tiny_config(), str(tmp_path / "serial"), grid={"lr": [0.02, 0.1], "weight_decay": [5e-4]},
                 seeds=(0,), data=data, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    for row in result.rows:
        assert deterministic(tmp_path / "parallel" / "runs" / row["run"]) == \
            deterministic(tmp_path / "serial" / "runs" / row["run"])


def test_a_sweep_refuses_to_choose_on_the_test_set_and_a_changed_base(grid_sweep, data):
    out, _, _ = grid_sweep
    with pytest.raises(cr.UserError, match="--val-split must be at least 1"):
        cr.sweep(tiny_config(val_split=0), str(out), grid={"lr": [0.1]}, data=data)
    with pytest.raises(cr.UserError, match=r"other settings: --epochs 3 \(the run has 2\)"):
        cr.sweep(tiny_config(epochs=3), str(out), grid={"lr": [0.02, 0.1], "weight_decay": [5e-4]}, data=data)
    with pytest.raises(cr.UserError, match="run lr=-1,seed=0: --lr must be positive"):
        cr.sweep(tiny_config(), str(out), grid={"lr": [-1.0]}, data=data)


def sweep_cli_args(data_dir, out, *grid) -> list:
    return ["sweep", "--data-dir", str(data_dir), "--arch", "resnet18", "--width", "4", "--batch-size", "32",
            "--epochs", "2", "--device", "cpu", "--no-download", "--quiet", "--val-split", "32", "--out-dir", str(out),
            "--seeds", "0,1", "--grid", *grid]


def sweep_cli(data_dir, out, *grid, env=None):
    return subprocess.Popen([sys.executable, MODULE, *sweep_cli_args(data_dir, out, *grid)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE, env={**os.environ, **(env or {})})


def test_a_killed_sweep_continues_where_it_stopped_and_a_larger_grid_trains_only_its_new_runs(tmp_path):
    data_dir = tmp_path / "data"
    write_official_layout(data_dir, n_train=128, n_test=32)
    out = tmp_path / "sweep"
    assert cr.main(sweep_cli_args(data_dir, out, "lr=0.05")) == 0
    kept = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}

    # a larger grid, killed (SIGKILL) inside the first of its new runs, after that run's first epoch
    second = sweep_cli(data_dir, out, "lr=0.05,0.2", env={cr.FAULT_PAUSE_ENV: "renamed metrics.csv"})
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
    # the killed run, continued, is the run a straight sweep trains
    assert cr.main(sweep_cli_args(data_dir, tmp_path / "straight", "lr=0.2")) == 0
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


def test_an_optuna_study_interrupted_and_continued_keeps_its_trials(data, tmp_path):
    optuna = pytest.importorskip("optuna", reason="Optuna is an optional extra (pip install optuna)")
    space = cr.parse_sweep_specs(["lr=log:0.01:0.3", "weight_decay=1e-4:1e-3"], ranges=True)
    out = str(tmp_path / "study")
    # stop inside the second trial: 2 epochs of 6 steps each = 12 calls per trial, so call 19 is trial 2's 7th
    first = cr.sweep(tiny_config(), out, space=space, trials=3, search="optuna", data=data, log=lambda m: None,
                     should_stop=stop_on_call(19))
    assert first.interrupted
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out}/optuna.db")
    done = [(t.number, t.params, t.value) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 1 and study.trials[1].state == optuna.trial.TrialState.FAIL
    assert len(read_csv(Path(out) / "runs" / "trial-0001" / "metrics.csv")) == 1

    second = cr.sweep(tiny_config(), out, space=space, trials=3, search="optuna", data=data, log=lambda m: None)
    assert not second.interrupted
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out}/optuna.db")
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 3
    assert [(t.number, t.params, t.value) for t in study.trials if t.number == 0] == done[:1]
    resumed = [t for t in study.trials if t.user_attrs.get("resumes") == 1]
    assert len(resumed) == 1 and resumed[0].params == study.trials[1].params
    assert resumed[0].user_attrs["run"] == "trial-0001"
    assert len(read_csv(Path(out) / "runs" / "trial-0001" / "metrics.csv")) == 2
    rows = read_csv(Path(out) / "sweep.csv")
    assert len(rows) == 3 and {r["status"] for r in rows} <= {"done", "pruned"}
    for row in rows:
        if row["status"] == "done":  # the study's value is the run's final val top-1
            trial = next(t for t in study.trials if t.number == int(row["trial"]))
            assert trial.value == pytest.approx(float(row["final_val_top1"]))
    assert (second.chosen is None) == all(r["status"] != "done" for r in rows)


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
    monkeypatch.setattr(cr, "_save", lambda fig, path: figures.append(fig) or path)
    cr.plot_sweep(str(tmp_path), str(tmp_path / "sweep.png"))
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
    plt = pytest.importorskip("matplotlib.pyplot")
    out, _, _ = grid_sweep
    figure = tmp_path / "sweep.png"
    assert cr.main(["plot", str(out), "--out", str(figure)]) == 0
    assert plt.imread(figure).shape[:2] == (528, 1694)  # (7 + 2 x 4.2) x 4.8 inches at 110 dpi
    assert cr.main(["plot", str(tmp_path)]) == 2
