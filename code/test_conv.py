"""Check CustomConv2DFunction / CustomConv2d (student_code.py) against PyTorch.

    cd code && python test_conv.py        (or: python code/test_conv.py)

Forward against torch.nn.functional.conv2d (max abs error < 1e-5 times the largest
output, at least 1: float32 sums in another order differ by a few rounding steps),
backward by torch.autograd.gradcheck in double precision (eps 1e-4, atol 1e-5), then
the nn.Module wrapper against nn.Conv2d with the same weights. Runs on CUDA when it
is available, else on the CPU. Exits with status 1 if any check fails.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck

# import student_code from this file's folder, wherever we are run from
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from student_code import CustomConv2DFunction, CustomConv2d  # noqa: E402

custom_conv2d = CustomConv2DFunction.apply

# (N, C_i, H, W, C_o, K, stride, padding, bias): the handout's usual 3x3 case,
# then stride > kernel, uneven sizes, no bias, 1x1 convs, batch and channel of 1.
# Small, because gradcheck perturbs every input element one at a time.
CASES = [
    (2, 4, 8, 8, 6, 3, 1, 1, True),
    (2, 3, 9, 7, 4, 3, 2, 0, True),
    (1, 1, 8, 11, 3, 2, 3, 1, False),
    (2, 3, 7, 7, 2, 5, 2, 2, True),
    (2, 5, 5, 4, 3, 1, 1, 0, False),
    (2, 2, 7, 6, 3, 1, 2, 1, True),
]
# forward and module checks are cheap: add a larger, typical layer
BIG_CASES = CASES + [(4, 16, 32, 24, 32, 3, 1, 1, True), (4, 3, 32, 32, 16, 7, 2, 3, True)]


def make_inputs(case, device, dtype):
    N, C_i, H, W, C_o, K, S, P, with_bias = case
    x = torch.randn(N, C_i, H, W, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(C_o, C_i, K, K, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(C_o, device=device, dtype=dtype, requires_grad=True) if with_bias else None
    return x, w, b, S, P


def check_fprop(device):
    for case in BIG_CASES:
        x, w, b, S, P = make_inputs(case, device, torch.float32)
        out = custom_conv2d(x, w, b, S, P)
        ref = F.conv2d(x, w, b, S, P)
        if out.shape != ref.shape:
            return f"case {case}: output shape {tuple(out.shape)} != {tuple(ref.shape)}"
        # relative to the outputs' scale (up to about 60 here, where one float32 step
        # is 4e-6): another valid summation order (cuDNN against cuBLAS on a GPU, or
        # float64 rounded to float32) differs by a few such steps
        err, scale = (out - ref).abs().max().item(), max(1.0, ref.abs().max().item())
        if err >= 1e-5 * scale:
            return f"case {case}: max abs error {err:.3g} >= 1e-5 x {scale:.3g}"
    return None


def check_bprop(device):
    # gradcheck makes thousands of calls on tiny tensors: on a CPU, threads only
    # add synchronisation overhead there (a lot of it on a busy machine)
    threads = torch.get_num_threads()
    if device.type == 'cpu':
        torch.set_num_threads(1)
    try:
        for case in CASES:
            # gradcheck needs double precision
            x, w, b, S, P = make_inputs(case, device, torch.float64)
            if not gradcheck(custom_conv2d, (x, w, b, S, P), eps=1e-4, atol=1e-5,
                             raise_exception=False):
                return f"case {case}: gradcheck failed"
    finally:
        torch.set_num_threads(threads)
    return None


def check_module(device):
    for case in BIG_CASES:
        N, C_i, H, W, C_o, K, S, P, with_bias = case
        ref = nn.Conv2d(C_i, C_o, K, stride=S, padding=P, bias=with_bias).to(device)
        ours = CustomConv2d(C_i, C_o, K, stride=S, padding=P, bias=with_bias).to(device)
        ours.load_state_dict(ref.state_dict())   # same parameter names: weight, bias
        x = torch.randn(N, C_i, H, W, device=device)
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, out_ours = ref(x_ref), ours(x_ours)
        grad = torch.randn_like(out_ref)
        out_ref.backward(grad)
        out_ours.backward(grad)
        pairs = [("output", out_ours, out_ref), ("input grad", x_ours.grad, x_ref.grad),
                 ("weight grad", ours.weight.grad, ref.weight.grad)]
        if with_bias:
            pairs.append(("bias grad", ours.bias.grad, ref.bias.grad))
        for what, a, r in pairs:
            # float32 sums over thousands of terms: compare relative to the scale
            err, scale = (a - r).abs().max().item(), max(1.0, r.abs().max().item())
            if err > 1e-5 * scale:
                return f"case {case}: {what} differs by {err:.3g} (scale {scale:.3g})"
    return None


def main():
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    print("Using device: {}".format(device))
    # compare with full float32 precision (cuDNN may otherwise use TF32 on GPUs)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    checks = [("Check Fprop ...", check_fprop, "Fprop testing passed"),
              ("Check Bprop ...", check_bprop, "Bprop testing passed"),
              ("Check nn.module wrapper ...", check_module, None)]
    for start, check, passed in checks:
        print(start)
        try:
            error = check(device)
        except Exception as exc:   # a crash is a failed check, reported in one line
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            print(f"FAILED: {error}")
            return 1
        if passed:
            print(passed)
    print("All passed! End of testing.")
    return 0


if __name__ == '__main__':
    sys.exit(main())
