"""Tests of bench/accuracy_runs.py at toy size on the CPU (--smoke): the script itself, not its numbers."""
import json
import sys
from pathlib import Path

import pytest

import cifar100_resnet as cr
from conftest import metric_rows, stop_on_call

HERE = Path(__file__).resolve().parent


def accuracy_runs():
    sys.path.insert(0, str(HERE))
    try:
        import accuracy_runs
    finally:
        sys.path.pop(0)
    return accuracy_runs


def test_accuracy_script_resumes_a_stopped_run_and_never_reruns_a_finished_one(tiny_data_dir, tmp_path):
    ar = accuracy_runs()
    (name, flags), = [(n, f) for part, n, f in ar.RUNS if part == "full400"]
    run_dir = tmp_path / "runs" / name
    cmd = ar.command(flags, str(run_dir), str(tiny_data_dir), smoke=True, resume=False)
    assert cmd[1] == ar.MODULE and "--compile" not in cmd and ar.planned_epochs(cmd) == ar.SMOKE_EPOCHS
    config = cr.config_from_args(cr.build_parser().parse_args(cmd[2:]))
    assert config.batch_size == 32 and config.lr == 0.4 and config.epochs == ar.SMOKE_EPOCHS and config.mixup
    assert cr.train(config, should_stop=stop_on_call(9)).interrupted  # as if stopped by --budget mid-epoch 2
    argv = ["full400", "--data-dir", str(tiny_data_dir), "--runs", str(tmp_path / "runs"), "--smoke"]
    assert ar.main(argv) == 0
    assert [int(r["epoch"]) for r in metric_rows(run_dir)] == [1, 2, 3]
    log = (run_dir / "train.log").read_text()
    assert log.count("$ ") == 1 and " --resume" in log
    (command,) = [json.loads(line) for line in (run_dir / "commands.jsonl").read_text().splitlines()]
    assert command["exit"] == 0 and (command["epochs_before"], command["epochs_after"]) == (1, 3)
    assert command["seconds"] > float(metric_rows(run_dir)[-1]["elapsed_seconds"]) - \
        float(metric_rows(run_dir)[0]["elapsed_seconds"])  # it trained epochs 2 and 3, and started up
    assert ar.main(argv) == 0  # finished: not run again
    assert (run_dir / "train.log").read_text() == log
    assert (tmp_path / "runs" / f"{name}_metrics.csv").read_text() == (run_dir / "metrics.csv").read_text()


def test_accuracy_script_report_tables_every_run_with_its_command(tiny_data_dir, tmp_path):
    ar = accuracy_runs()
    only = ["notebook100-notebook-mixing"]  # a run through another script (the module's own: the test above)
    assert ar.main(["compare", "report", "--data-dir", str(tiny_data_dir), "--runs", str(tmp_path / "runs"),
                    "--results", str(tmp_path / "results"), "--smoke", "--only", *only]) == 0
    table = (tmp_path / "results" / "results.md").read_text()
    results = [json.loads(line) for line in (tmp_path / "results" / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in results] == [name for _, name, _ in ar.planned_runs()]
    assert "notebook100-nomix" in table and "--epochs 100 --no-mixup" in table
    assert "`python bench/notebook_mixing.py --batch-size 512" in table
    log = (tmp_path / "runs" / "notebook100-notebook-mixing" / "train.log").read_text()
    assert "notebook_mixing.py" in log.splitlines()[0] and "mixing: the original notebook's" in log
    for r in results:
        assert f"`{r['command']}`" in table
        if r["name"] in only:
            rows = metric_rows(tmp_path / "runs" / r["name"])
            assert r["epochs_done"] == len(rows) == ar.SMOKE_EPOCHS and r["device"] == "cpu"
            assert r["top1"] == float(rows[-1]["test_top1"]) and r["wall_seconds"] == float(rows[-1]["elapsed_seconds"])
            assert r["best_top1"] == max(float(row["test_top1"]) for row in rows)
            assert r["command_seconds"] > r["wall_seconds"]  # startup and data loading too
            final = json.loads((tmp_path / "results" / f"{r['name']}_eval_tta.json").read_text())
            assert final["epoch"] == ar.SMOKE_EPOCHS and r["tta_top1"] == final["test"]["tta_top1"]
            assert final["test"]["top1"] == pytest.approx(r["top1"], rel=1e-7)  # eval agrees with the run
        else:
            assert r["epochs_done"] == 0 and f"| {r['name']} | 0/" in table
    assert (tmp_path / "results" / "compare_curves.png").stat().st_size > 10_000
    assert not (tmp_path / "results" / "short_curves.png").exists()


def test_accuracy_script_compare_epochs_sets_epochs_and_names():
    ar = accuracy_runs()
    runs = ar.planned_runs(60)
    compare = [(name, flags) for part, name, flags in runs if part == "compare"]
    assert [name for name, _ in compare] == ["notebook60", "notebook60-nomix", "notebook60-t0-50",
                                             "notebook60-advanced", "notebook60-notebook-mixing", "notebook60-seed1"]
    assert all(flags[flags.index("--epochs") + 1] == "60" for _, flags in compare)
    # each differs from the baseline in one thing only
    baseline = compare[0][1]
    assert compare[3][1] == baseline + ["--aug", "advanced"] and compare[5][1] == baseline + ["--seed", "1"]
    assert compare[4][1] == [ar.NOTEBOOK_MIXING] + baseline
    assert [r for r in runs if r[0] != "compare"] == [r for r in ar.planned_runs() if r[0] != "compare"]
    assert not any("{E}" in name or "{E}" in " ".join(flags) for _, name, flags in runs)


def test_accuracy_script_time_to_target_is_the_first_epoch_reaching_it():
    ar = accuracy_runs()
    rows = [{"epoch": "1", "test_top1": "0.5", "elapsed_seconds": "10"},
            {"epoch": "2", "test_top1": "0.76", "elapsed_seconds": "20"},
            {"epoch": "3", "test_top1": "0.74", "elapsed_seconds": "30"},
            {"epoch": "4", "test_top1": "0.80", "elapsed_seconds": "40"}]
    assert ar.first_reaching(rows, "test_top1", 0.75) == (2, 20.0)
    assert ar.first_reaching(rows, "test_top1", 0.9) == (None, None)
    assert ar.first_reaching(rows, "test_tta_top1", 0.75) == (None, None)
    # from the command's start: what the one command spent outside its 40 s of epochs comes first
    whole = [{"seconds": 47.5, "exit": 0, "epochs_before": 0, "epochs_after": 4}]
    assert ar.from_command_start(rows, whole, 2) == pytest.approx(7.5 + 20)
    assert ar.from_command_start(rows, whole, None) is None
    resumed = [{**whole[0], "exit": 143, "epochs_after": 2}, {"seconds": 30, "exit": 0, "epochs_before": 2,
                                                              "epochs_after": 4}]
    for commands in (resumed, [{**whole[0], "exit": 1}], []):  # several commands, a failed one, or none known
        assert ar.from_command_start(rows, commands, 2) is None


def test_the_levers_part_runs_the_four_recipes_of_issue_26_each_measuring_ema_and_bn_recal(tiny_data_dir):
    ar = accuracy_runs()
    levers = [(name, flags) for part, name, flags in ar.planned_runs() if part == "levers"]
    assert [name for name, _ in levers] == ["levers-base", "levers-restart-warmup-mixoff", "levers-one-cycle-mixoff",
                                            "levers-wd5e-4"]
    for name, flags in levers:  # each a valid run, at its size and at the smoke test's
        for smoke in (False, True):
            cmd = ar.command(flags, "/tmp/unused", str(tiny_data_dir), smoke=smoke, resume=False)
            config = cr.config_from_args(cr.build_parser().parse_args(cmd[2:]))
            config.validate()
            assert config.ema == 0.999 and config.bn_recal == 20 and config.tta, name
            assert (config.epochs, config.batch_size, config.lr) == ((3, 32, 0.4) if smoke else (100, 512, 0.4))
            if not smoke:  # three cycles (14 + 28 + 56) or one, each run ends annealed: no mid-cycle warning
                assert cr.schedule_end_warning(config, cr.resolve_t0(98, config.t_mult, config.t0)) is None, name
    base = dict(levers)["levers-base"]
    main_like = cr.config_from_args(cr.build_parser().parse_args(base))  # 14 epochs after warm-up: a restart
    assert base[-2:] == ["--t0", "14"] and cr.learning_rate(2 + 14, main_like) == pytest.approx(0.4)
    assert dict(levers)["levers-restart-warmup-mixoff"] == base + ["--restart-warmup", "2", "--mix-off-epochs", "10"]
    assert dict(levers)["levers-wd5e-4"] == base + ["--weight-decay", "5e-4", "--no-decay-norm-bias"]


@pytest.mark.slow
def test_accuracy_script_probe_measures_processes_side_by_side_and_parallel_auto_follows_it(tiny_data_dir, tmp_path,
                                                                                           monkeypatch):
    ar = accuracy_runs()
    monkeypatch.setattr(ar, "SMOKE_PROBE_SECONDS", 10.0)
    monkeypatch.chdir(tmp_path)  # relative folders: those here, not the repository's (where the runs start)
    results = tmp_path / "results"
    argv = ["--data-dir", str(tiny_data_dir), "--runs", "runs", "--results", "results", "--smoke"]
    assert ar.main(["probe", *argv]) == 0
    probe = json.loads((results / "probe.json").read_text())
    assert [t["processes"] for t in probe["trials"]] == list(ar.SMOKE_PROBE_PROCESSES) == [1, 2]
    for trial in probe["trials"]:  # each process's epochs after its first, timed: images over the median epoch
        for i, rate in enumerate(trial["each"]):
            folder = tmp_path / "runs" / f"probe-{trial['processes']}x-{i}"
            rows, images = metric_rows(folder), json.loads((folder / "config.json").read_text())["train_images"]
            seconds = sorted(float(r["epoch_seconds"]) for r in rows[1:])
            assert len(rows) >= 2 and images == 192 and rate == pytest.approx(images / seconds[len(seconds) // 2])
        assert trial["images_per_s"] == pytest.approx(sum(trial["each"]))
    assert probe["best"] == max(probe["trials"], key=lambda t: t["images_per_s"])["processes"]
    # --parallel 2: two runs of a part at once, each its own process, both finished
    only = ["levers-base", "levers-wd5e-4"]
    assert ar.main(["levers", *argv, "--parallel", "2", "--only", *only]) == 0
    spans = []
    for name in only:
        lines = (tmp_path / "runs" / name / "commands.jsonl").read_text().splitlines()
        (command,) = [json.loads(line) for line in lines]
        assert command["exit"] == 0 and command["epochs_after"] == ar.SMOKE_EPOCHS
        spans.append((command["started"], command["started"] + command["seconds"]))
    assert spans[1][0] < spans[0][1] and spans[0][0] < spans[1][1]  # side by side
    assert ar.parallel_runs(ar.argparse.Namespace(parallel="auto", results=str(results))) == probe["best"]
    assert ar.parallel_runs(ar.argparse.Namespace(parallel="auto", results=str(tmp_path))) == 1  # no probe.json
