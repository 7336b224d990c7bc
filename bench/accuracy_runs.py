#!/usr/bin/env python3
"""Every training run behind the README's accuracy results, with its exact command, in one place.

    python bench/accuracy_runs.py PART [PART ...] --data-dir DIR [--runs DIR] [--results DIR] [--budget SECONDS]
                                  [--only NAME ...]

Parts, each sized for one 10-minute command on an H100 (batch 512, lr 0.4 = the notebook's 0.1 x 512/128):
  short    30-epoch runs at batch 512 (the target: >= 76 % top-1), and the time to 75 % top-1
  compare  the notebook's choices at 100 epochs each (--compare-epochs): MixUp/CutMix on vs off, its
           schedule (--t0 50 --t-mult 2) vs the default that fits whole cycles, --aug advanced, the
           notebook's own mixing with its bugs (bench/notebook_mixing.py), and the baseline's seed 1 (the
           run-to-run spread the others are read against)
  full400  the notebook's recipe for 400 epochs, the user's main job
  levers   what the 400-epoch curves ask for, at 100 epochs each, every run also evaluating its --ema average
           and re-estimated BatchNorm statistics (--bn-recal) beside its raw weights, with flip TTA: the
           main job's recipe; a warm-up after each restart and mixing off for the last 10 epochs; one cosine
           cycle and mixing off; weight decay 5e-4 without decay on BatchNorm and biases
  report   results.md (a table of every run with its command) and the learning curves of each part
  probe    whether training processes side by side on the one GPU train more images per second in all than one
           (1, 2 and 4 of them, PROBE_SECONDS each): probe.json in --results, read by --parallel auto

Runs live in --runs (checkpoints included: keep it on a disk with room). A run that would pass --budget
gets SIGTERM, which makes the training command finish its step, write last.pt and exit; running the same
part again resumes it with --resume, and a finished run is never run twice. So a part too long for one
command finishes over two. The small files of each run (metrics.csv, config.json, its log) are copied to
--results after every run.

--parallel N runs N runs of a part at once, each its own process (auto: as many as the probe found best, 1
without a probe.json). So `probe levers --parallel auto --budget 540` measures first, then trains that way.

--smoke runs every command at a toy size on the CPU (the test suite does this) to check the script itself;
its numbers mean nothing.
"""
import argparse
import concurrent.futures
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.normpath(os.path.join(HERE, "..", "cifar100_resnet.py"))

# batch 512 with the linearly scaled rate (0.1 x 512/128) and 2 warm-up epochs (Goyal et al.'s rule for
# scaling the batch), bf16 and CUDA graphs (the defaults on an H100)
B512 = ["--batch-size", "512", "--lr", "0.4", "--warmup-epochs", "2"]
# the plain short-budget recipe of ../shared/docs/gpu.md: Nesterov, weight decay 5e-4, no mixing; --tta
# adds the flip-TTA columns beside the plain ones (see the README's "Honest evaluation")
PLAIN = B512 + ["--nesterov", "--weight-decay", "5e-4", "--no-mixup", "--no-cutmix", "--tta", "--compile", "off"]
# the notebook's recipe (momentum 0.9, weight decay 1e-3 on every parameter, label smoothing 0.1,
# MixUp + CutMix with alpha 1, cosine warm restarts) at batch 512; compiled, since these runs are long
NOTEBOOK = B512 + ["--compile", "on"]
NOTEBOOK_MIXING = "bench/notebook_mixing.py"  # the notebook's MixUp-then-CutMix, its bugs kept
# levers: 100 epochs; --t0 14 gives the main job's three cycles at a quarter of their length (14 + 28 + 56
# after 2 warm-up epochs, as 57 + 114 + 227 in 400): --t0 auto would fit one cycle into 100 epochs
LEVERS = NOTEBOOK + ["--epochs", "100", "--ema", "0.999", "--bn-recal", "20", "--tta"]

RUNS = [  # (part, name, flags): the exact commands, in the order they run
    # short: no --compile, whose 30-75 s would count against the time to 75 %; the most telling runs first,
    # so that a --budget too short for all drops the least useful
    ("short", "plain30", PLAIN + ["--epochs", "30"]),
    ("short", "plain20", PLAIN + ["--epochs", "20"]),
    ("short", "plain30-nodecay-norm", PLAIN + ["--epochs", "30", "--no-decay-norm-bias"]),
    ("short", "plain30-smooth0.2", PLAIN + ["--epochs", "30", "--label-smoothing", "0.2"]),
    ("short", "plain30-wd1e-3", PLAIN + ["--epochs", "30", "--weight-decay", "1e-3"]),
    ("short", "plain30-zero-init", PLAIN + ["--epochs", "30", "--zero-init-residual"]),
    # compare: notebook{E} is the baseline of both comparisons; E is --compare-epochs (100 unless given)
    ("compare", "notebook{E}", NOTEBOOK + ["--epochs", "{E}"]),
    ("compare", "notebook{E}-nomix", NOTEBOOK + ["--epochs", "{E}", "--no-mixup", "--no-cutmix"]),
    ("compare", "notebook{E}-t0-50", NOTEBOOK + ["--epochs", "{E}", "--t0", "50", "--t-mult", "2"]),
    ("compare", "notebook{E}-advanced", NOTEBOOK + ["--epochs", "{E}", "--aug", "advanced"]),
    # a run whose flags start with a script runs that script (the same train flags) instead of the module
    ("compare", "notebook{E}-notebook-mixing", [NOTEBOOK_MIXING, *NOTEBOOK, "--epochs", "{E}"]),
    ("compare", "notebook{E}-seed1", NOTEBOOK + ["--epochs", "{E}", "--seed", "1"]),
    # full400: the main job at batch 512
    ("full400", "notebook400", NOTEBOOK + ["--epochs", "400"]),
    # levers: each run measures its raw weights, their EMA and their re-estimated BatchNorm statistics at every
    # epoch (the last two change nothing in training); one cycle is --t0 98: the epochs after 2 of warm-up
    ("levers", "levers-base", LEVERS + ["--t0", "14"]),
    ("levers", "levers-restart-warmup-mixoff", LEVERS + ["--t0", "14", "--restart-warmup", "2", "--mix-off-epochs", "10"]),
    ("levers", "levers-one-cycle-mixoff", LEVERS + ["--t0", "98", "--mix-off-epochs", "10"]),
    ("levers", "levers-wd5e-4", LEVERS + ["--t0", "14", "--weight-decay", "5e-4", "--no-decay-norm-bias"]),
]
PARTS = ("short", "compare", "full400", "levers")
COMPARE_EPOCHS = 100
# probe: the levers recipe, without compiling (its 30-75 s would fill the window; compiled steps use the GPU
# better, so they may gain less from sharing it), for as long as each count of processes trains side by side
PROBE_FLAGS = B512 + ["--compile", "off", "--epochs", "10000", "--ema", "0.999", "--bn-recal", "20", "--tta"]
PROBE_PROCESSES, PROBE_SECONDS = (1, 2, 4), 30.0
SMOKE_PROBE_PROCESSES, SMOKE_PROBE_SECONDS = (1, 2), 12.0


def planned_runs(compare_epochs: int = COMPARE_EPOCHS) -> list:
    """RUNS with the compare part's epoch count filled in (in its run names too, so runs of different
    lengths never share a folder)."""
    def fill(text: str) -> str:
        return text.replace("{E}", str(compare_epochs))

    return [(part, fill(name), [fill(a) for a in flags]) for part, name, flags in RUNS]


# --smoke: the same commands on a toy problem (flags given later win in argparse)
SMOKE = ["--device", "cpu", "--arch", "resnet18", "--width", "4", "--limit-train", "256", "--limit-test", "128",
         "--batch-size", "32", "--eval-batch-size", "128", "--log-every", "0"]
SMOKE_EPOCHS = 3
KEPT_FILES = ("metrics.csv", "config.json", "train.log", "eval_tta.json", "commands.jsonl")


def program(flags: list) -> tuple:
    """(the script a run's flags name, relative to the repository, and the train flags)."""
    if flags and flags[0].endswith(".py"):
        return flags[0], list(flags[1:])
    return "cifar100_resnet.py", list(flags)


def command(flags: list, run_dir: str, data_dir: str, smoke: bool, resume: bool) -> list:
    script, flags = program(flags)
    if smoke:  # fewer epochs (and warm-up to match), no compilation, a toy model and data
        if "--compile" in flags:
            at = flags.index("--compile")
            del flags[at:at + 2]
        for flag, value in (("--epochs", SMOKE_EPOCHS), ("--warmup-epochs", 1), ("--mix-off-epochs", 1)):
            if flag in flags:
                flags[flags.index(flag) + 1] = str(value)
        flags += SMOKE
    return [sys.executable, os.path.normpath(os.path.join(HERE, "..", script)), *flags, "--data-dir", data_dir,
            "--no-download", "--out-dir", run_dir, *(["--resume"] if resume else [])]


def planned_epochs(cmd: list) -> int:
    return int(cmd[cmd.index("--epochs") + 1])


def read_rows(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_one(name: str, flags: list, args, deadline: float) -> str:
    """Start, resume or skip one run; returns 'done', 'stopped' (resumable), 'skipped' or 'failed: ...'."""
    run_dir = os.path.join(args.runs, name)
    resume = os.path.exists(os.path.join(run_dir, "last.pt"))
    cmd = command(flags, run_dir, args.data_dir, args.smoke, resume)
    if len(read_rows(run_dir)) >= planned_epochs(cmd):
        return "done"
    if time.monotonic() > deadline - args.min_start:
        return "skipped"
    os.makedirs(run_dir, exist_ok=True)
    if not resume:  # stopped before its first checkpoint: nothing to resume, so start afresh (the log stays)
        for stale in ("config.json", "metrics.csv", "commands.jsonl"):
            if os.path.exists(os.path.join(run_dir, stale)):
                os.remove(os.path.join(run_dir, stale))
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    epochs_before = len(read_rows(run_dir))
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        log.write(f"$ {' '.join(cmd[1:])}\n")
        log.flush()
        started, started_at = time.monotonic(), time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.join(HERE, ".."))
        try:
            proc.wait(timeout=None if deadline == float("inf") else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # finish the step, write last.pt, exit 143
            proc.wait()
        seconds = time.monotonic() - started
    with open(os.path.join(run_dir, "commands.jsonl"), "a") as f:  # the wall time of each command, startup too
        f.write(json.dumps({"started": started_at, "seconds": seconds, "exit": proc.returncode,
                            "epochs_before": epochs_before, "epochs_after": len(read_rows(run_dir))}) + "\n")
    if proc.returncode == 0 and "--tta" not in flags:  # the final weights with flip TTA (a few seconds)
        ev = subprocess.run([sys.executable, MODULE, "eval", run_dir, "--tta", "--no-download", "--data-dir",
                             args.data_dir, *(["--device", "cpu"] if args.smoke else [])],
                            capture_output=True, text=True)
        line = next((l for l in ev.stdout.splitlines() if l.startswith("EVAL_JSON ")), None)
        if line:
            with open(os.path.join(run_dir, "eval_tta.json"), "w") as f:
                f.write(line[len("EVAL_JSON "):] + "\n")
    keep(name, run_dir, args.results)
    if proc.returncode == 0:
        return "done"
    if proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM):  # the latter: stopped before training began
        return "stopped"
    return f"failed: exit {proc.returncode}, see {os.path.join(run_dir, 'train.log')}"


def keep(name: str, run_dir: str, results: str) -> None:
    os.makedirs(results, exist_ok=True)
    for file in KEPT_FILES:
        if os.path.exists(os.path.join(run_dir, file)):
            shutil.copyfile(os.path.join(run_dir, file), os.path.join(results, f"{name}_{file}"))


# ----------------------------------------------------------------------------------------------------------
# Probe: how many processes at once


def steady_images_per_s(run_dir: str) -> "float | None":
    """A run's images per second over its epochs after the first (CUDA-graph capture, cuDNN's autotuning), each
    epoch's evaluation included: its training images over the median epoch_seconds; None with fewer than 2."""
    seconds = sorted(float(r["epoch_seconds"]) for r in read_rows(run_dir)[1:])
    if not seconds:
        return None
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)["train_images"] / seconds[len(seconds) // 2]


def probe(args) -> int:
    """For each count of PROBE_PROCESSES, that many runs of PROBE_FLAGS train side by side for PROBE_SECONDS
    (then SIGTERM); their total is the sum of each one's steady_images_per_s. Writes probe.json in --results
    and returns the count with the most images per second in all (1 unless another is measured higher)."""
    counts, window = (SMOKE_PROBE_PROCESSES, SMOKE_PROBE_SECONDS) if args.smoke else (PROBE_PROCESSES, PROBE_SECONDS)
    trials = []
    for count in counts:
        folders = [os.path.join(args.runs, f"probe-{count}x-{i}") for i in range(count)]
        for folder in folders:  # each trial from scratch
            shutil.rmtree(folder, ignore_errors=True)
        commands = [command(PROBE_FLAGS, folder, args.data_dir, args.smoke, resume=False) for folder in folders]
        for cmd in commands:  # (--smoke sets few epochs: the window, not the epochs, ends a trial)
            cmd[cmd.index("--epochs") + 1] = "10000"
        print(f"\nprobe: {count} process(es) side by side for {window:g} s", flush=True)
        procs = []
        for folder, cmd in zip(folders, commands):
            os.makedirs(folder)
            with open(os.path.join(folder, "train.log"), "w") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.join(HERE, "..")))
        time.sleep(window)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait()
        rates = [steady_images_per_s(folder) for folder in folders]
        total = sum(rates) if all(r is not None for r in rates) else None
        trials.append({"processes": count, "images_per_s": total, "each": rates,
                       "epochs": [len(read_rows(folder)) for folder in folders]})
    one = trials[0]["images_per_s"]
    measured = [t for t in trials if t["images_per_s"] is not None]
    best = max(measured, key=lambda t: t["images_per_s"])["processes"] if one else 1
    for t in trials:
        shown = (f"{t['images_per_s']:,.0f} images/s in all ({t['images_per_s'] / one:.2f}x one)" if t["images_per_s"]
                 and one else f"not measured (epochs done: {t['epochs']}; a window too short)")
        print(f"probe: {t['processes']} at once: {shown}", flush=True)
    print(f"probe: best {best} at once" + ("" if args.smoke else f" (each trial {window:g} s)"), flush=True)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "probe.json"), "w") as f:
        json.dump({"best": best, "seconds": window, "flags": PROBE_FLAGS, "smoke": args.smoke, "trials": trials}, f,
                  indent=2)
        f.write("\n")
    return best


def parallel_runs(args) -> int:
    """--parallel: a number, or auto (the probe's best in --results, 1 without one)."""
    if args.parallel != "auto":
        return int(args.parallel)
    path = os.path.join(args.results, "probe.json")
    if not os.path.exists(path):
        print("--parallel auto: no probe.json in --results (run the probe part first): one run at a time")
        return 1
    with open(path) as f:
        return int(json.load(f)["best"])


# ----------------------------------------------------------------------------------------------------------
# Report


def first_reaching(rows: list, column: str, threshold: float):
    """(epoch, elapsed seconds) of the first epoch whose `column` is at least `threshold`, else (None, None)."""
    for r in rows:
        if r.get(column) not in (None, "") and float(r[column]) >= threshold:
            return int(r["epoch"]), float(r["elapsed_seconds"])
    return None, None


def from_command_start(rows: list, commands: list, epoch) -> "float | None":
    """Seconds from the start of the training command to the end of `epoch`, for a run that one command
    trained from its first epoch to its last: the epoch's elapsed_seconds (counted from the first step) plus
    what the command spent outside its epochs (startup, reading the data, the last checkpoint's write, exiting;
    the last two make it an upper bound). None for a run trained over several commands, or not finished."""
    if epoch is None or len(commands) != 1 or commands[0]["epochs_before"] != 0 or commands[0]["exit"] != 0:
        return None
    outside = max(0.0, commands[0]["seconds"] - float(rows[-1]["elapsed_seconds"]))
    return outside + float(rows[epoch - 1]["elapsed_seconds"])


def summarize(part: str, name: str, flags: list, args) -> dict:
    run_dir = os.path.join(args.runs, name)
    rows = read_rows(run_dir)
    cmd = command(flags, run_dir, args.data_dir, args.smoke, resume=False)
    script, train_flags = program(flags)
    result = {"part": part, "name": name, "command": f"python {script} " + " ".join(train_flags),
              "epochs_planned": planned_epochs(cmd), "epochs_done": len(rows)}
    if not rows:
        return result
    config_path = os.path.join(run_dir, "config.json")
    config = {}
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    last = rows[-1]
    best = max(rows, key=lambda r: float(r["test_top1"]))
    eval_path = os.path.join(run_dir, "eval_tta.json")
    final = {}
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            final = json.load(f)["test"]
    epoch75, seconds75 = first_reaching(rows, "test_top1", 0.75)
    tta_epoch75, tta_seconds75 = first_reaching(rows, "test_tta_top1", 0.75)
    commands_path = os.path.join(run_dir, "commands.jsonl")
    commands = []
    if os.path.exists(commands_path):
        with open(commands_path) as f:
            commands = [json.loads(line) for line in f if line.strip()]
    result.update(
        device=config.get("device_name", config.get("device_resolved")), torch=config.get("torch_version"),
        wall_seconds=float(last["elapsed_seconds"]), first_epoch_seconds=float(rows[0]["epoch_seconds"]),
        top1=float(last["test_top1"]), top5=float(last["test_top5"]),
        best_top1=float(best["test_top1"]), best_epoch=int(best["epoch"]),
        tta_top1=float(last["test_tta_top1"]) if last.get("test_tta_top1") else final.get("tta_top1"),
        tta_top5=float(last["test_tta_top5"]) if last.get("test_tta_top5") else final.get("tta_top5"),
        ema_top1=float(last["test_ema_top1"]) if last.get("test_ema_top1") else None,
        bnrecal_top1=float(last["test_bnrecal_top1"]) if last.get("test_bnrecal_top1") else None,
        epoch_to_75=epoch75, seconds_to_75=seconds75, tta_epoch_to_75=tta_epoch75, tta_seconds_to_75=tta_seconds75,
        command_seconds=sum(c["seconds"] for c in commands) or None,
        start_to_75=from_command_start(rows, commands, epoch75),
        tta_start_to_75=from_command_start(rows, commands, tta_epoch75))
    return result


def pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def report(args) -> None:
    runs = planned_runs(args.compare_epochs)
    results = [summarize(part, name, flags, args) for part, name, flags in runs]
    kind = "--smoke: toy size, numbers mean nothing" if args.smoke else "real data"
    lines = [f"Runs of `bench/accuracy_runs.py` ({kind}), "
             f"report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| part | run | epochs | device | wall s | command s | top-1 % | top-5 % | best top-1 % (epoch) | "
             "TTA top-1 % | EMA top-1 % | BN-recal top-1 % | s to 75 % (epoch) | s to 75 % with TTA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if not r["epochs_done"]:
            lines.append(f"| {r['part']} | {r['name']} | 0/{r['epochs_planned']} | not run |")
            continue
        def to75(seconds, epoch, from_start):
            if not epoch:
                return "not reached"
            return f"{seconds:.1f} ({epoch})" + (f", {from_start:.1f} from start" if from_start is not None else "")

        tta75 = to75(r["tta_seconds_to_75"], r["tta_epoch_to_75"], r["tta_start_to_75"]) \
            if r["tta_top1"] is not None else ""
        command_s = f"{r['command_seconds']:.0f}" if r["command_seconds"] else ""
        lines.append(f"| {r['part']} | {r['name']} | {r['epochs_done']}/{r['epochs_planned']} | {r['device']} | "
                     f"{r['wall_seconds']:.0f} | {command_s} | {pct(r['top1'])} | {pct(r['top5'])} | "
                     f"{pct(r['best_top1'])} ({r['best_epoch']}) | {pct(r['tta_top1'])} | {pct(r.get('ema_top1'))} | "
                     f"{pct(r.get('bnrecal_top1'))} | "
                     f"{to75(r['seconds_to_75'], r['epoch_to_75'], r['start_to_75'])} | {tta75} |")
    lines += ["", "wall s: the run's elapsed_seconds (training and per-epoch evaluation from its first step, "
              "first-epoch compilation and CUDA-graph capture included; startup and data loading before it not "
              "included). command s: the wall time of the training commands that ran it, startup, data loading and "
              "exit included. s to 75 %: the wall s at the end of the first epoch reaching 75 % top-1; \"from start\" "
              "adds what its one training command spent outside its epochs (startup and data loading, but also the "
              "last checkpoint's write and exit: an upper bound), for a run one command trained whole. "
              "top-1/top-5: the last epoch; best: chosen on the test set, so optimistic. TTA top-1: with "
              "flip test-time augmentation, from the run's --tta columns or, for a run without them, from "
              "`cifar100_resnet.py eval --tta` of its final weights. EMA and BN-recal top-1: the last epoch's "
              "--ema average and its raw weights with BatchNorm statistics re-estimated on clean images "
              "(--bn-recal), for the runs that measured them.", "",
              "Commands (each also takes --data-dir DIR --no-download --out-dir DIR):", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in results]
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.results, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    print("\n".join(lines))
    for part in PARTS:  # one figure per part, of the runs it has
        names = [name for p, name, _ in runs if p == part and read_rows(os.path.join(args.runs, name))]
        if names:
            out = os.path.join(args.results, f"{part}_curves.png")
            p = subprocess.run([sys.executable, MODULE, "plot", *[os.path.join(args.runs, n) for n in names],
                                "--labels", *names, "--out", out], capture_output=True, text=True)
            print(p.stdout.strip() or p.stderr.strip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="+", choices=[*PARTS, "report", "probe"])
    ap.add_argument("--data-dir", required=True, help="folder holding cifar-100-python/")
    ap.add_argument("--runs", default="runs/accuracy", help="where the run folders go (checkpoints: 170 MB each)")
    ap.add_argument("--results", default=None, help="where the small files and the report go (default: --runs)")
    ap.add_argument("--budget", type=float, default=float("inf"),
                    help="seconds; a run still going then is stopped with last.pt written, to resume later")
    ap.add_argument("--compare-epochs", type=int, default=COMPARE_EPOCHS,
                    help="epochs of each compare run (fewer, to fit beside the short part in one session)")
    ap.add_argument("--min-start", type=float, default=60, help="start no run with fewer seconds of --budget left")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these runs of the parts (names as in "
                    "the report); the report still lists every run")
    ap.add_argument("--parallel", default="1", type=lambda v: v if v == "auto" or (v.isdigit() and int(v) >= 1) else
                    ap.error(f"--parallel: a number of runs at once, or auto; got {v!r}"),
                    help="runs of a part at once, each its own process; auto: the probe's best (default: 1)")
    ap.add_argument("--smoke", action="store_true", help="toy size on the CPU, to test this script")
    args = ap.parse_args(argv)
    args.results = args.results or args.runs
    # the runs' commands start in the repository's folder: a relative --runs (or --data-dir) named a folder there,
    # where this script, started elsewhere, then found no metrics.csv to read or keep
    args.runs, args.results, args.data_dir = map(os.path.abspath, (args.runs, args.results, args.data_dir))
    unknown = set(args.only or ()) - {name for _, name, _ in planned_runs(args.compare_epochs)}
    if unknown:
        ap.error(f"--only: no run named {', '.join(sorted(unknown))}")
    deadline = time.monotonic() + args.budget
    status = {}
    for part in args.parts:
        if part == "probe":
            probe(args)
        if part in ("report", "probe"):
            continue
        runs = [(name, flags) for run_part, name, flags in planned_runs(args.compare_epochs)
                if run_part == part and (args.only is None or name in args.only)]
        with concurrent.futures.ThreadPoolExecutor(parallel_runs(args)) as pool:  # each thread waits on its run
            for (name, _), result in zip(runs, pool.map(lambda run: run_one(*run, args, deadline), runs)):
                status[name] = result
                print(f"{name}: {result}", flush=True)
    if "report" in args.parts:
        report(args)
    unfinished = [name for name, s in status.items() if s in ("stopped", "skipped")]
    if unfinished:
        print(f"not finished within --budget: {', '.join(unfinished)}; the same command again continues them")
    failed = [name for name, s in status.items() if s.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
