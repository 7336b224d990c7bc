#!/usr/bin/env python3
"""Training speed on one CUDA GPU, measured beside the original notebook's pipeline in the same command.

    python bench/gpu_speed.py [--data-dir DIR] [--out results.jsonl] [--budget SECONDS]

Each measurement runs in its own process, most important first, so that a time budget drops the least useful:
  1. the notebook's pipeline (bench/notebook_pipeline.py: torchvision resnet34, DataLoader, fp16, batch 128)
  2. `cifar100_resnet.py bench` at batch 512 (lr 0.4 = 0.1 x 512/128) and at the notebook's 128: eager,
     CUDA graphs, torch.compile, compile + graphs
  3. with --data-dir: short real-data runs of the training command with and without the speed features (do
     the loss curves agree?), and the training command at its defaults (wall time with checkpoints), beside
     the same run through train() without a run folder (so without checkpoints): their difference is what
     checkpointing costs per epoch
  4. bench/profile_epoch.py at batch 512 (compile + graphs) and at the defaults: MFU, and GPU time by kind of kernel
Prints a markdown table at the end; each result is also appended to --out as one JSON line as soon as it exists.
bench/notebook_pipeline.py is an unchanged copy of the team's shared/bench/notebook_pipeline.py.
"""
import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "..", "cifar100_resnet.py")
NOTEBOOK = os.path.join(HERE, "notebook_pipeline.py")

# (name, extra flags); batch 512 uses the linearly scaled rate 0.4
BENCH_VARIANTS = [
    ("b512 eager", ["--batch-size", "512", "--lr", "0.4", "--cuda-graphs", "off", "--compile", "off"]),
    ("b512 graphs", ["--batch-size", "512", "--lr", "0.4", "--cuda-graphs", "on", "--compile", "off"]),
    ("b128 eager", ["--batch-size", "128", "--cuda-graphs", "off", "--compile", "off", "--bench-epochs", "1"]),
    ("b128 graphs", ["--batch-size", "128", "--cuda-graphs", "on", "--compile", "off"]),
]
# one epoch under torch.profiler each: where the GPU time of the fastest batch-512 setting and of the defaults goes
# (--epochs 400 at the defaults resolves to batch 128, CUDA graphs and compile: --compile auto)
PROFILE_VARIANTS = [
    ("profile b512 compile+graphs", ["--batch-size", "512", "--lr", "0.4", "--cuda-graphs", "on", "--compile"]),
    ("profile b128 compile+graphs (the 400-epoch defaults)", ["--batch-size", "128", "--cuda-graphs", "on",
                                                              "--compile"]),
]
PROFILE = os.path.join(HERE, "profile_epoch.py")
COMPILE_VARIANTS = [
    ("b512 compile", ["--batch-size", "512", "--lr", "0.4", "--cuda-graphs", "off", "--compile"]),
    ("b512 compile+graphs", ["--batch-size", "512", "--lr", "0.4", "--cuda-graphs", "on", "--compile"]),
    ("b128 compile+graphs", ["--batch-size", "128", "--cuda-graphs", "on", "--compile"]),
]


def run(cmd, timeout):
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, code = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, code = e.stdout or "", f"timeout after {timeout:.0f} s"
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
    return out, code, time.perf_counter() - start


def record(path, result):
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)


def notebook():
    out, code, wall = run([sys.executable, NOTEBOOK, "--steps", "150"], 300)
    m = re.search(r"([\d.]+) images/s, ([\d.]+) s per 50,000-image epoch", out)
    if not m:
        return {"name": "notebook pipeline", "error": f"exit {code}: {out[-800:]}"}
    return {"name": "notebook pipeline", "images_per_s": float(m[1]), "train_epoch_seconds": float(m[2]),
            "wall_seconds": wall}


def bench(name, flags, timeout):
    out, code, wall = run([sys.executable, MODULE, "bench", *flags], timeout)
    line = next((l for l in out.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None:
        return {"name": name, "error": f"exit {code}: {out[-1500:]}"}
    return {"name": name, "wall_seconds": wall, **json.loads(line[len("BENCH_JSON "):])}


def profile(name, flags, timeout):
    out, code, wall = run([sys.executable, PROFILE, *flags], timeout)
    line = next((l for l in out.splitlines() if l.startswith("PROFILE_JSON ")), None)
    if line is None:
        return {"name": name, "error": f"exit {code}: {out[-1500:]}"}
    return {"name": name, "wall_seconds": wall, **json.loads(line[len("PROFILE_JSON "):])}


def training_run(name, data_dir, flags, timeout):
    """The real training command; returns its per-epoch metrics and wall time."""
    folder = tempfile.mkdtemp(prefix="run-")
    out, code, wall = run([sys.executable, MODULE, "--data-dir", data_dir, "--no-download", "--out-dir", folder,
                           "--quiet", *flags], timeout)
    path = os.path.join(folder, "metrics.csv")
    if code != 0 or not os.path.exists(path):
        return {"name": name, "error": f"exit {code}: {out[-1500:]}"}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {"name": name, "flags": flags, "wall_seconds": wall, **per_epoch(rows)}


def per_epoch(rows):
    """The columns a real-data run reports, from its metrics rows (metrics.csv or train()'s history)."""
    column = {k: [float(r[k]) for r in rows] for k in ("train_loss", "test_top1", "epoch_seconds", "elapsed_seconds")}
    elapsed = column.pop("elapsed_seconds")
    # steady state: from the end of epoch 1 (warm-up, capture) to the end, checkpoints included (if written)
    column["steady_epoch_seconds"] = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1) if len(elapsed) > 1 else None
    return column


NO_FOLDER_RUN = """
import json, sys
sys.path.insert(0, sys.argv[3])
import cifar100_resnet as cr
config = cr.TrainConfig(epochs=int(sys.argv[2]), data_dir=sys.argv[1], download=False, quiet=True, compile="on")
result = cr.train(config)
print("RUN_JSON " + json.dumps([{k: row[k] for k in ("train_loss", "test_top1", "epoch_seconds", "elapsed_seconds")}
                                for row in result.history]))
"""


def run_without_folder(name, data_dir, epochs, timeout):
    """train() as --epochs 400 runs at the defaults (compile on), with no run folder: the same loop, no
    metrics.csv and no checkpoints."""
    repo = os.path.dirname(MODULE)
    out, code, wall = run([sys.executable, "-c", NO_FOLDER_RUN, data_dir, str(epochs), repo], timeout)
    line = next((l for l in out.splitlines() if l.startswith("RUN_JSON ")), None)
    if line is None:
        return {"name": name, "error": f"exit {code}: {out[-1500:]}"}
    return {"name": name, "wall_seconds": wall, **per_epoch(json.loads(line[len("RUN_JSON "):]))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", help="folder holding cifar-100-python/ (enables the real-data runs)")
    ap.add_argument("--out", default="gpu_speed_results.jsonl")
    ap.add_argument("--budget", type=float, default=480, help="start no new measurement after this many seconds")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--extra", default="", help="flags added to every bench command (e.g. for a CPU dry run)")
    ap.add_argument("--train-extra", default="", help="flags added to every training run (e.g. for a CPU dry run)")
    args = ap.parse_args()
    started = time.perf_counter()
    results = []

    def left():  # seconds of the budget left; a measurement that starts gets at most that (and 30 s more)
        return args.budget - (time.perf_counter() - started)

    def add(result):
        results.append(result)
        record(args.out, result)

    add(notebook())
    for name, flags in BENCH_VARIANTS:
        if left() > 20:
            add(bench(name, flags + args.extra.split(), min(240, left() + 30)))
    if args.data_dir:
        agree = ["--epochs", "4", "--batch-size", "512", "--lr", "0.4", "--seed", "0", "--compile", "off"]
        for name, flags in (("real b512 eager", agree + ["--cuda-graphs", "off"]),
                            ("real b512 eager again", agree + ["--cuda-graphs", "off"]),
                            ("real b512 graphs", agree + ["--cuda-graphs", "on"]),
                            # 6 epochs of what --epochs 400 runs at the defaults (compile is auto: on for 400)
                            ("real defaults (b128, graphs, compile)", ["--epochs", "6", "--compile", "on"])):
            if left() > 20:
                add(training_run(name, args.data_dir, flags + args.train_extra.split(), min(240, left() + 30)))
        if left() > 20 and not args.train_extra:
            add(run_without_folder("real defaults (b128, graphs, compile), no run folder", args.data_dir, 6,
                                   min(240, left() + 30)))
    if not args.no_compile:
        for name, flags in COMPILE_VARIANTS:
            if left() > 20:
                add(bench(name, flags + args.extra.split(), min(420, left() + 30)))

    for name, flags in PROFILE_VARIANTS:
        compiles = "--compile" in flags and flags[flags.index("--compile") + 1:][:1] != ["off"]
        if left() > 20 and not (args.no_compile and compiles):
            add(profile(name, flags + args.extra.split(), min(420, left() + 30)))

    base = next((r["train_epoch_seconds"] for r in results if r["name"] == "notebook pipeline" and "error" not in r),
                None)
    print("\n| variant | train s/epoch | + eval s | images/s | x notebook | warm-up s | peak GiB | 400 epochs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'][-200:]!r} |")
        elif "train_loss" in r or r.get("profile"):
            continue
        elif r["name"] == "notebook pipeline":
            print(f"| notebook pipeline (batch 128) | {r['train_epoch_seconds']:.2f} | | "
                  f"{r['images_per_s']:,.0f} | 1.0 |")
        else:
            ratio = base / r["epoch_with_eval_seconds"] if base else float("nan")
            print(f"| {r['name']} | {r['train_epoch_seconds']:.3f} | {r['eval_seconds_per_10k']:.3f} | "
                  f"{r['images_per_s']:,.0f} | {ratio:.1f} | {r['warmup_seconds']:.1f} | "
                  f"{r['peak_memory_gib'] or 0:.2f} | {400 * r['epoch_with_eval_seconds'] / 60:.1f} min |")
    runs = [r for r in results if "train_loss" in r]
    if runs:
        print("\n| real-data run | train_loss per epoch | test_top1 per epoch | steady s/epoch (with eval, checkpoints) |")
        print("| --- | --- | --- | --- |")
        for r in runs:
            print(f"| {r['name']} | {', '.join(f'{v:.4f}' for v in r['train_loss'])} | "
                  f"{', '.join(f'{v:.4f}' for v in r['test_top1'])} | {r['steady_epoch_seconds']} |")
    for r in results:
        if r.get("profile"):
            prof = r["profile"]
            print(f"\n{r['name']}: MFU {r['mfu']:.1%} ({r['images_per_s']:,.0f} images/s, "
                  f"{r['matmul_tflops']:.0f} TFLOP/s matmul rate); {prof['measured']} {prof['total_seconds']:.3f} s "
                  f"in one epoch under the profiler")
            for group, g in prof["groups"].items():
                print(f"  {g['share']:6.1%} {g['seconds']:7.3f} s  {group}")
            for k in prof["top"]:
                print(f"  {k['share']:6.1%} {k['seconds']:7.3f} s  [{k['group']}] {k['name'][:100]}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
