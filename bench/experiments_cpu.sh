#!/usr/bin/env bash
# The README's "Experiments", "Understanding a run" and "Advanced augmentation" figures, made by the commands themselves on the CPU,
# on the first 5,000 training and 1,000 test images of the real CIFAR-100 (a CPU-sized subset).
#   bash bench/experiments_cpu.sh DATA OUT
# DATA: a folder holding cifar-100-python/ (with ../shared beside the clone:
#   python ../shared/tools/cifar100_to_official_layout.py DATA --limit-train 5000 --limit-test 1000)
# OUT: a new folder for the results. About 25 minutes on a 2-core CPU.
set -euo pipefail
DATA=$1
OUT=$2
run() { echo "+ $*"; python cifar100_resnet.py "$@"; }
SUBSET=(--data-dir "$DATA" --no-download --arch resnet18 --width 16 --limit-train 5000 --val-split 1000)

# 1. the learning-rate range test, then 3 rates x 2 seeds around its suggestion, chosen on validation
run lr-find "${SUBSET[@]}" --steps 300 --start 1e-4 --end 10 --out-dir "$OUT/lr_find"
run sweep "${SUBSET[@]}" --epochs 15 --grid lr=0.03,0.1,0.3 --seeds 0,1 --out-dir "$OUT/sweep" --quiet
run plot "$OUT/sweep"
run plot --schedule --epochs 400 --t0 50 --t-mult 2 --out "$OUT/schedule_notebook400.png"

# 2. understanding the chosen run: its report, the augmentation it trained with, a convolution
CHOSEN=$(python -c "import csv,sys; print(next(r['setting'] for r in csv.DictReader(open(sys.argv[1])) if r['chosen']))" "$OUT/sweep/summary.csv")
run report "$OUT/sweep/runs/$CHOSEN,seed=0" --out-dir "$OUT/report"
run preview-aug "${SUBSET[@]}" --out "$OUT/augmentation.png"
run preview-aug "${SUBSET[@]}" --aug advanced --seed 1 --out "$OUT/augmentation_advanced.png"
run conv-demo --data-dir "$DATA" --no-download --index 3 --filter edge --checkpoint "$OUT/sweep/runs/$CHOSEN,seed=0" \
    --out "$OUT/conv_demo.png"
