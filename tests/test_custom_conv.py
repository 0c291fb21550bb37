"""Part I: CustomConv2DFunction / CustomConv2d against torch.nn.functional.conv2d,
the default CNN (ResNet10) and code/test_conv.py."""
import os
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import student_code
from student_code import CustomConv2d, CustomConv2DFunction, custom_conv2d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# tiny models: one thread each (on a shared 2-core machine a second only waits)
pytestmark = pytest.mark.usefixtures('one_thread')


def conv_and_grads(conv, x, w, b, stride, padding, grad_out=None):
    """Output and (input, weight, bias) gradients of conv for one upstream gradient."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    out = conv(x, w, b, stride, padding)
    grads = torch.autograd.grad(out, [x, w] + ([b] if b is not None else []), grad_out)
    return (out,) + tuple(grads)


def assert_matches_reference(x, w, b, stride, padding, atol=1e-10, rtol=1e-7):
    ref_out = F.conv2d(x, w, b, stride, padding)
    grad_out = torch.randn_like(ref_out)
    ours = conv_and_grads(custom_conv2d, x, w, b, stride, padding, grad_out)
    ref = conv_and_grads(F.conv2d, x, w, b, stride, padding, grad_out)
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for name, a, r in zip(names, ours, ref):
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        torch.testing.assert_close(a, r, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- correctness
@pytest.mark.parametrize("K", range(1, 8))
@pytest.mark.parametrize("S", range(1, 5))
def test_grid_forward_and_gradients_match_conv2d(K, S):
    """Every K 1-7, S 1-4, P 0-3, bias on/off, on a non-square input; C_i/C_o and
    the batch vary with the case (including single channels and a batch of 1)."""
    g = torch.Generator().manual_seed(100 * K + S)
    for P in range(4):
        for with_bias in (True, False):
            N, C_i, C_o = (1, 1, 2) if with_bias else (2, 3, 1)
            H, W = 9, 12
            x = torch.randn(N, C_i, H, W, generator=g, dtype=torch.float64)
            w = torch.randn(C_o, C_i, K, K, generator=g, dtype=torch.float64)
            b = torch.randn(C_o, generator=g, dtype=torch.float64) if with_bias else None
            assert_matches_reference(x, w, b, S, P)


def test_float32_matches_conv2d_at_handout_tolerance():
    x = torch.randn(4, 8, 16, 20)
    w = torch.randn(16, 8, 3, 3)
    b = torch.randn(16)
    for S, P in [(1, 1), (2, 0), (3, 2)]:
        err = (custom_conv2d(x, w, b, S, P) - F.conv2d(x, w, b, S, P)).abs().max()
        assert err < 1e-5


@pytest.mark.parametrize("images_per_chunk", [1, 2])
@pytest.mark.parametrize("K, S, P", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3),
                                     (2, 3, 0), (3, 1, 0), (4, 1, 3)])
def test_chunked_batch_matches_conv2d(monkeypatch, images_per_chunk, K, S, P):
    """On the CPU the batch is unfolded and multiplied a few images at a time (one
    reused cols buffer, weight gradient accumulated over chunks): with a budget of
    1 or 2 images per chunk, a batch of 5 runs in several chunks, the last one
    shorter, through every path (forward, weight gradient, stride-1 input gradient
    as a convolution, fold), and still matches F.conv2d."""
    N, C_i, C_o, H, W = 5, 3, 4, 9, 8
    H_o, W_o = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    # bytes of one image's cols (float64) in the forward pass and the weight gradient
    # (the input gradient's cols, with C_o >= C_i channels, come in chunks as small)
    image_bytes = 8 * H_o * W_o * K * K * C_i
    monkeypatch.setattr(student_code, "_CPU_COLS_CHUNK_BYTES", images_per_chunk * image_bytes)
    chunks, _ = student_code._batch_chunks(torch.empty(N, C_i, H, W, dtype=torch.float64),
                                        H_o * W_o, K * K * C_i)
    assert len(chunks) > 1 and chunks[-1][1] == N
    g = torch.Generator().manual_seed(7 * K + S)
    x = torch.randn(N, C_i, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(C_o, C_i, K, K, generator=g, dtype=torch.float64)
    b = torch.randn(C_o, generator=g, dtype=torch.float64)
    assert_matches_reference(x, w, b, S, P)
    assert_matches_reference(x.contiguous(memory_format=torch.channels_last), w, None, S, P)


def test_input_pixels_never_used_get_zero_gradient():
    # K=2, S=3: rows/columns 2, 5, 8 are skipped, and (9 - 2) % 3 != 0 leaves row 8 out
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    custom_conv2d(x, w, None, 3, 0).sum().backward()
    used = torch.zeros(9, dtype=torch.bool)
    used[[0, 1, 3, 4, 6, 7]] = True
    assert (x.grad[..., ~used, :] == 0).all() and (x.grad[..., :, ~used] == 0).all()
    assert (x.grad[..., used, :][..., used] != 0).all()


def test_memory_layouts_channels_last_and_non_contiguous_input():
    base = torch.randn(2, 6, 10, 14, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    sliced = base[:, ::2, :, 1:13]                          # non-contiguous view
    channels_last = base[:, :3].contiguous(memory_format=torch.channels_last)
    for x in (sliced, channels_last):
        assert_matches_reference(x, w, b, 1, 1)
        assert_matches_reference(x, w, b, 2, 0)
    # 1x1 stride-1 on channels-last input takes the no-unfold path
    assert_matches_reference(channels_last, torch.randn(5, 3, 1, 1, dtype=torch.float64),
                             None, 1, 0)


@pytest.mark.parametrize("case", [
    (2, 3, 7, 6, 4, 3, 1, 1, True),
    (1, 2, 8, 7, 3, 2, 3, 2, False),
    (2, 4, 5, 5, 2, 1, 2, 0, True),
])
def test_gradcheck(case):
    N, C_i, H, W, C_o, K, S, P, with_bias = case
    x = torch.randn(N, C_i, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C_o, C_i, K, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C_o, dtype=torch.float64, requires_grad=True) if with_bias else None
    assert gradcheck(custom_conv2d, (x, w, b, S, P), eps=1e-4, atol=1e-5)


def test_output_can_be_modified_in_place():
    # ReLU(inplace=True) right after the conv, as in SimpleNet
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.relu_(custom_conv2d(x, w, None, 1, 1)).sum().backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    torch.relu_(F.conv2d(x2, w2, None, 1, 1)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("stride", [1, 2])   # stride 1: conv-form input grad; 2: fold
def test_only_requested_gradients_are_computed(monkeypatch, stride):
    """ctx.needs_input_grad is honoured: no input-gradient work for a frozen input,
    no re-unfold of the input for a frozen weight."""
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    b = torch.randn(4)
    unfolded, gemms, folds = [], [], []
    real_im2col = student_code._im2col
    real_gemm = student_code._conv2d_gemm
    real_col2im = student_code._col2im
    monkeypatch.setattr(student_code, "_im2col",
                        lambda t, *a: unfolded.append(t.data_ptr()) or real_im2col(t, *a))
    monkeypatch.setattr(student_code, "_conv2d_gemm",
                        lambda *a: gemms.append(1) or real_gemm(*a))
    monkeypatch.setattr(student_code, "_col2im",
                        lambda *a: folds.append(1) or real_col2im(*a))

    # frozen input: the forward GEMM and the weight gradient, no input gradient
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    custom_conv2d(x, wg, bg, stride, 1).sum().backward()
    assert wg.grad is not None and bg.grad is not None
    assert len(gemms) == 1 and not folds, "input gradient computed for a frozen input"

    # frozen weight and bias: the input is unfolded once (forward), not again
    unfolded.clear()
    xg = x.clone().requires_grad_()
    custom_conv2d(xg, w, b, stride, 1).sum().backward()
    assert xg.grad is not None
    assert unfolded.count(xg.data_ptr()) == 1, "input re-unfolded for an unneeded weight grad"


def test_autocast_cpu_bfloat16():
    torch.manual_seed(0)
    ref = nn.Conv2d(8, 16, 3, padding=1)
    ours = CustomConv2d(8, 16, 3, padding=1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 12, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, out_ours = ref(x), ours(x)
    assert out_ours.dtype == out_ref.dtype == torch.bfloat16
    torch.testing.assert_close(out_ours.float(), out_ref.float(), atol=0.1, rtol=0.02)
    out_ours.float().square().mean().backward()
    out_ref.float().square().mean().backward()
    for p_ours, p_ref in [(ours.weight, ref.weight), (ours.bias, ref.bias)]:
        assert p_ours.grad.dtype == torch.float32
        rel = (p_ours.grad - p_ref.grad).norm() / p_ref.grad.norm()
        assert rel < 0.05
    # autocast off again: full precision
    assert ours(x).dtype == torch.float32
    # a bfloat16 activation meeting a float32 weight is fine under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x.bfloat16()).dtype == torch.bfloat16


def test_state_dict_moves_between_custom_and_native_conv():
    native = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    custom = CustomConv2d(3, 5, 3, stride=2, padding=1)
    assert set(native.state_dict()) == set(custom.state_dict()) == {"weight", "bias"}
    custom.load_state_dict(native.state_dict())
    x = torch.randn(2, 3, 11, 9)
    torch.testing.assert_close(custom(x), native(x), atol=1e-5, rtol=1e-5)
    custom2, native2 = CustomConv2d(3, 5, 3, bias=False), nn.Conv2d(3, 5, 3, bias=False)
    native2.load_state_dict(custom2.state_dict())
    torch.testing.assert_close(native2.weight, custom2.weight)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("x_shape, w_shape, bias_shape, message", [
    ((1, 3, 8, 8), (4, 2, 3, 3), None, "input has 3 channels but the weight expects 2"),
    ((1, 3, 4, 4), (4, 3, 7, 7), None, "kernel size 7 is larger than the padded input"),
    ((1, 3, 8, 8), (4, 3, 3, 2), None, "only square kernels"),
    ((3, 8, 8), (4, 3, 3, 3), None, "input must be 4-D"),
    ((1, 3, 8, 8), (4, 3, 3, 3), (5,), "bias must have shape"),
])
def test_bad_shapes_give_clear_messages(x_shape, w_shape, bias_shape, message):
    b = torch.randn(bias_shape) if bias_shape else None
    with pytest.raises(ValueError, match=message):
        custom_conv2d(torch.randn(x_shape), torch.randn(w_shape), b, 1, 0)


def test_mixed_dtypes_give_clear_message():
    with pytest.raises(ValueError, match="input dtype torch.float64 differs"):
        custom_conv2d(torch.randn(1, 3, 8, 8).double(), torch.randn(4, 3, 3, 3), None, 1, 0)


@pytest.mark.parametrize("stride, padding, message", [
    (1.5, 0, "stride must be an int"), ("2", 0, "stride must be an int"),
    (0, 0, "stride must be an int >= 1"), (1, 0.5, "padding must be an int"),
    (1, -1, "padding must be an int >= 0"), (True, 0, "stride must be an int"),
])
def test_bad_stride_or_padding(stride, padding, message):
    with pytest.raises(ValueError, match=message):
        custom_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, stride, padding)


# what CustomConv2d cannot compute, and the message that says so
UNSUPPORTED = [
    (((3, 4, (3, 5)), {}), r"squared filters: kernel_size must be an int, got \(3, 5\)"),
    (((3, 4, 3), {'stride': (1, 2)}), r"equal stride: stride must be an int, got \(1, 2\)"),
    (((3, 4, 3), {'padding': (0, 1)}), r"equal padding: padding must be an int, got \(0, 1\)"),
    (((3, 4, 3), {'dilation': 2}), "only dilation=1 and groups=1, got 2, 1"),
    (((4, 4, 3), {'groups': 2}), "only dilation=1 and groups=1, got 1, 2"),
]


@pytest.mark.parametrize("call, message", UNSUPPORTED)
def test_module_wrapper_rejects_what_it_cannot_compute(call, message):
    args, kwargs = call
    with pytest.raises(ValueError, match=message):
        CustomConv2d(*args, **kwargs)


@pytest.mark.slow
def test_module_wrapper_checks_survive_python_O():
    """The checks are not asserts: with asserts stripped they still raise ValueError.
    student_code.py is compiled as python -O compiles it (optimize=1, which drops every
    assert) and run as a module of its own; in-process, as a python -O process would
    recompile all of torch where bytecode is not cached."""
    path = os.path.join(REPO, "code", "student_code.py")
    with open(path) as f:
        stripped = compile(f.read(), path, "exec", optimize=1)
    exec(compile("assert False", "<check>", "exec", optimize=1))   # asserts really go
    module = types.ModuleType("student_code_without_asserts")
    module.__file__ = path
    exec(stripped, module.__dict__)
    for (args, kwargs), message in UNSUPPORTED:
        with pytest.raises(ValueError, match=message):
            module.CustomConv2d(*args, **kwargs)


# ---------------------------------------------------------------- no torch conv
class RecordAtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_no_torch_convolution_is_used(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a torch convolution function was called")
    for module, name in [(F, "conv2d"), (F, "conv_transpose2d"), (torch, "conv2d"),
                         (torch, "convolution"), (torch, "conv_transpose2d")]:
        monkeypatch.setattr(module, name, forbidden)
    net = student_code.default_cnn_model(conv_op=CustomConv2d, num_classes=10)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with RecordAtenOps() as recorder:          # catches any route to an aten conv too
        net(x).sum().backward()
    conv_ops = sorted(op for op in recorder.ops if "conv" in op)
    assert not conv_ops, f"aten convolution ops were called: {conv_ops}"
    assert "aten.mm.default" in recorder.ops or "aten.addmm.default" in recorder.ops


# ---------------------------------------------------------------- the CNNs
def test_default_cnn_is_registered_and_uses_conv_op_everywhere():
    assert student_code.default_cnn_model is student_code.cnn_models["resnet10"]
    net = student_code.default_cnn_model(conv_op=CustomConv2d, num_classes=7)
    kinds = {type(m) for m in net.modules()}
    assert CustomConv2d in kinds and nn.Conv2d not in kinds
    assert sum(isinstance(m, CustomConv2d) for m in net.modules()) == 12  # incl. 3 shortcuts
    assert net(torch.randn(2, 3, 64, 48)).shape == (2, 7)
    for name, cls in student_code.cnn_models.items():
        assert cls(num_classes=5)(torch.randn(2, 3, 32, 32)).shape == (2, 5), name


def test_docstring_states_measured_params_and_flops():
    net_cls = student_code.default_cnn_model
    doc = net_cls.__doc__
    params = int(re.search(r"([\d,]+) parameters", doc).group(1).replace(",", ""))
    gflops = float(re.search(r"([\d.]+) GFLOPs", doc).group(1))
    net = net_cls()
    assert student_code.count_params(net) == params
    measured = student_code.count_flops(net, img_size=128) / 1e9
    assert abs(measured - gflops) < 0.0005
    assert 0.3 <= measured <= 0.8
    # count_flops counts what a hand count gives: e.g. one 3x3 conv, 8 -> 4 channels at 10x10
    assert student_code.count_flops(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False)),
                                    img_size=10) == 2 * 4 * 3 * 9 * 10 * 10


@pytest.mark.parametrize("arch", ["resnet10", "simplenet"])
def test_custom_conv_network_equals_native_network(arch):
    torch.manual_seed(0)
    net_cls = student_code.cnn_models[arch]
    native = net_cls(conv_op=nn.Conv2d, num_classes=10).double()
    custom = net_cls(conv_op=CustomConv2d, num_classes=10).double()
    for block in getattr(native, "blocks", []):        # non-zero residual branches
        nn.init.normal_(block.bn2.weight)
    custom.load_state_dict(native.state_dict())        # the same parameter names
    x = torch.randn(3, 3, 48, 40, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    losses = []
    for net in (native, custom):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    native_params = dict(native.named_parameters())
    for name, p in custom.named_parameters():
        torch.testing.assert_close(p.grad, native_params[name].grad, atol=1e-9, rtol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- test_conv.py
@pytest.mark.slow
def test_test_conv_script_passes_from_repo_root():
    result = subprocess.run([sys.executable, os.path.join("code", "test_conv.py")], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for line in ["Check Fprop ...", "Fprop testing passed", "Check Bprop ...",
                 "Bprop testing passed", "Check nn.module wrapper ..."]:
        assert line in lines
    assert lines[-1] == "All passed! End of testing."


def test_test_conv_script_fails_on_a_wrong_convolution(monkeypatch, capsys):
    sys.path.insert(0, os.path.join(REPO, "code"))
    import test_conv
    # a convolution that is off by one: the forward check must catch it and exit 1
    monkeypatch.setattr(test_conv, "custom_conv2d",
                        lambda x, w, b, s, p: CustomConv2DFunction.apply(x, w, b, s, p) + 1)
    assert test_conv.main() == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "All passed!" not in out


def test_test_conv_accepts_another_summation_order(monkeypatch):
    """A correct convolution summed in another order (as cuDNN differs from the CPU's
    kernels) passes: here float64 rounded to float32, 2.7e-5 off on the large cases, which
    an absolute bound of 1e-5 rejected. A convolution 0.1 % off still fails."""
    sys.path.insert(0, os.path.join(REPO, "code"))
    import test_conv

    def float64_conv(x, w, b, s, p):
        return F.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p).float()
    torch.manual_seed(0)
    monkeypatch.setattr(test_conv, "custom_conv2d", float64_conv)
    assert test_conv.check_fprop(torch.device("cpu")) is None
    monkeypatch.setattr(test_conv, "custom_conv2d",
                        lambda x, w, b, s, p: float64_conv(x, w, b, s, p) * 1.001)
    assert "max abs error" in test_conv.check_fprop(torch.device("cpu"))
