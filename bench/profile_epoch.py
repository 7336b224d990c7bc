#!/usr/bin/env python3
"""Where one training epoch's time goes, and how close it comes to the hardware: FLOPs, MFU, a profile.

    python bench/profile_epoch.py [any train flags of cifar100_resnet.py] [--epochs-timed N] [--no-profile]

Builds the same Trainer the training command builds (on random data of CIFAR's shape, or --data-dir's data
when given), trains one warm-up epoch (autotuning, compilation, graph capture), times N more, then:
  - counts the FLOPs of one training image with torch.utils.flop_counter (forward x 3 for the backward),
  - measures this device's matrix-product rate in the run's precision, and divides: MFU,
  - runs one more epoch under torch.profiler and sums the self time of each GPU kernel (CPU operator without
    CUDA) into kinds: BatchNorm, convolution/matmul, optimiser, kernels fused by compile, copies.
Prints a report and one PROFILE_JSON line. The training command's own `bench` only times epochs.
"""
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cifar100_lab as lab  # noqa: E402
import cifar100_resnet as cr  # noqa: E402

# Kernel (GPU) or operator (CPU) names -> what they do; the first group with a matching substring wins.
# BatchNorm comes first: cuDNN names both its convolution and its BatchNorm kernels "cudnn...".
PROFILE_GROUPS = [
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("convolution and matmul", ("conv", "xmma", "implicit", "wgrad", "dgrad", "gemm", "cutlass", "mm")),
    ("optimizer", ("multi_tensor", "sgd", "foreach")),
    ("fused by compile (triton)", ("triton",)),
    ("copy, index, fill", ("copy", "memcpy", "memset", "index", "gather", "cat", "fill")),
]


def profile_group(name: str) -> str:
    lowered = name.lower()
    return next((group for group, keys in PROFILE_GROUPS if any(k in lowered for k in keys)), "other")


def forward_flops(model: torch.nn.Module, image_size: int = cr.IMAGE_SIZE) -> int:
    """FLOPs of one image's forward pass, as torch counts them (convolutions and matrix products)."""
    device, was_training = next(model.parameters()).device, model.training
    model.eval()  # one image: batch statistics would be undefined
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on random data, the median of `repeats` after a warm-up."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def profile_epoch(trainer: cr.Trainer, top: int = 12) -> dict:
    """Run one training epoch under torch.profiler; returns where the time went: the self time of each GPU
    kernel (on CUDA) or CPU operator (elsewhere), summed into PROFILE_GROUPS, and the `top` largest."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        trainer.train_epoch()
    times = {}  # name -> self seconds
    for event in prof.key_averages():
        on_device = event.device_type != torch.autograd.DeviceType.CPU
        if on_device == cuda:
            seconds = (getattr(event, "self_device_time_total", 0) if cuda else event.self_cpu_time_total) / 1e6
            if seconds > 0:
                times[event.key] = times.get(event.key, 0.0) + seconds
    total = sum(times.values()) or 1.0
    groups = {}
    for name, seconds in times.items():
        groups[profile_group(name)] = groups.get(profile_group(name), 0.0) + seconds
    return {"measured": "GPU kernel time" if cuda else "CPU operator self time", "total_seconds": total,
            "groups": {g: {"seconds": t, "share": t / total} for g, t in sorted(groups.items(), key=lambda x: -x[1])},
            "top": [{"name": n, "group": profile_group(n), "seconds": t, "share": t / total}
                    for n, t in sorted(times.items(), key=lambda x: -x[1])[:top]]}


def measure(config: cr.TrainConfig, data: cr.CifarData, env: cr.Environment, epochs_timed: int = 1,
            profile: bool = True) -> dict:
    trainer = cr.Trainer(config, data, log=lambda message: None, env=env)
    trainer.train_epoch()  # warm-up: autotuning, compilation, capture
    seconds = [trainer.train_epoch()["train_seconds"] for _ in range(epochs_timed)]
    n_train = trainer.n_train
    images_per_s = n_train / sorted(seconds)[len(seconds) // 2]
    dtype = trainer.amp_dtype or torch.float32
    rate = measure_matmul_rate(trainer.device, dtype, 8192 if trainer.device.type == "cuda" else 1024)
    flops = forward_flops(cr.build_model(config).to(trainer.device))
    return {"device": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda"
            else str(trainer.device), "torch": torch.__version__, "batch_size": config.batch_size,
            "arch": config.arch, "width": config.width, "amp": str(dtype), "cuda_graphs": trainer.use_graphs,
            "compile": trainer.use_compile, "images_per_s": images_per_s,
            "forward_gflop_per_image": flops / 1e9, "train_gflop_per_image": 3 * flops / 1e9,
            "matmul_tflops": rate / 1e12, "mfu": 3 * flops * images_per_s / rate,
            "profile": profile_epoch(trainer) if profile else None}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    epochs_timed, profile = 1, "--no-profile" not in argv
    argv = [a for a in argv if a != "--no-profile"]
    if "--epochs-timed" in argv:
        at = argv.index("--epochs-timed")
        epochs_timed = int(argv[at + 1])
        del argv[at:at + 2]
    try:
        args = cr.build_parser().parse_args(argv)
        config = cr.TrainConfig.from_dict(vars(args))
        config.out_dir = None
        env = cr.resolve(config)
        if "--data-dir" in argv:
            data = cr.load_dataset(config.data_dir, config.dataset, config.download)
        else:
            data = lab.random_cifar(config.dataset, config.limit_train or 50_000, config.limit_test or 10_000)
    except cr.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # as the training command sets it
    r = measure(config, data, env, epochs_timed, profile)
    print(f"{r['arch']} width {r['width']} on {r['device']}, torch {r['torch']}, {r['amp']}, batch {r['batch_size']}, "
          f"cuda graphs {'on' if r['cuda_graphs'] else 'off'}, compile {'on' if r['compile'] else 'off'}")
    print(f"{r['train_gflop_per_image']:.2f} GFLOP per training image (3 x {r['forward_gflop_per_image']:.2f} forward) "
          f"x {r['images_per_s']:,.0f} images/s = {r['train_gflop_per_image'] * r['images_per_s'] / 1e3:.2f} "
          f"TFLOP/s: MFU {r['mfu']:.1%} of the {r['matmul_tflops']:.2f} TFLOP/s measured for matrix products here")
    if r["profile"]:
        prof = r["profile"]
        print(f"one epoch under the profiler, {prof['measured']}: {prof['total_seconds']:.3f} s")
        for group, g in prof["groups"].items():
            print(f"  {g['share']:6.1%} {g['seconds']:8.3f} s  {group}")
        print("  largest:")
        for k in prof["top"]:
            print(f"  {k['share']:6.1%} {k['seconds']:8.3f} s  [{k['group']}] {k['name'][:110]}")
    print("PROFILE_JSON " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
