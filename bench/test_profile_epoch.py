"""Tests of bench/profile_epoch.py: the FLOP count against a hand count, MFU's arithmetic, the profile groups."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import cifar100_resnet as cr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_epoch as pe  # noqa: E402


def hand_count(model: nn.Module) -> int:
    """2 x multiply-adds of every Conv2d (output elements x in_channels x kernel area) and Linear for one
    32x32 image: the count this project used before torch's counter."""
    flops, size = 0, 32
    for m in model.modules():
        if isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features
    outputs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: outputs.__setitem__(mod, o.shape))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    for m, shape in outputs.items():
        flops += 2 * shape.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    return flops


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_flop_count_matches_a_hand_count_of_convolutions_and_classifier(stem):
    model = cr.resnet34(num_classes=100, stem=stem)
    flops = pe.forward_flops(model)
    assert model.training is True  # restored
    assert flops == hand_count(model)
    if stem == "cifar":  # the figure in the README's speed section: 6.96 GFLOP per training image
        assert round(3 * pe.forward_flops(model) / 1e9, 2) == 6.96


def test_profile_script_reports_mfu_and_splits_one_epoch_by_kind_of_work(capsys):
    code = pe.main(["--device", "cpu", "--arch", "resnet18", "--width", "4", "--limit-train", "128",
                    "--limit-test", "32", "--batch-size", "64"])
    out = capsys.readouterr().out
    assert code == 0 and "one epoch under the profiler, CPU operator self time" in out
    r = json.loads(out.split("PROFILE_JSON ")[1])
    assert r["mfu"] == pytest.approx(r["train_gflop_per_image"] * 1e9 * r["images_per_s"] / (r["matmul_tflops"] * 1e12))
    assert r["train_gflop_per_image"] == pytest.approx(3 * r["forward_gflop_per_image"])
    prof = r["profile"]
    assert sum(g["seconds"] for g in prof["groups"].values()) == pytest.approx(prof["total_seconds"])
    assert sum(g["share"] for g in prof["groups"].values()) == pytest.approx(1.0)
    assert prof["groups"]["convolution and matmul"]["share"] > 0.05 and "batchnorm" in prof["groups"]
    shares = [k["share"] for k in prof["top"]]
    assert shares == sorted(shares, reverse=True) and len(shares) == 12


def test_profile_script_errors_are_one_line(capsys):
    assert pe.main(["--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --epochs must be at least 1, got 0"]


@pytest.mark.parametrize("name,group", [
    ("cudnn::bn_fw_tr_1C11_kernel_NCHW<__nv_bfloat16, float, 512, true, 1>", "batchnorm"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution and matmul"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel", "other"),
    ("triton_per_fused__native_batch_norm_legit_functional_relu_12", "batchnorm"),
    ("triton_poi_fused_add_relu_7", "fused by compile (triton)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedSgdMathFunctor>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copy, index, fill"),
    ("aten::mkldnn_convolution", "convolution and matmul"),
    ("aten::native_batch_norm_backward", "batchnorm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor>", "other"),
])
def test_profile_groups_kernel_names(name, group):
    assert pe.profile_group(name) == group
