"""CS 771 HW2 (MiniPlaces): the code students fill in, and what graders import.

The autograder and code/test_conv.py import this module by the handout's names
and signatures, and code/main.py reads the names marked below. Never rename
them or change their signatures; put new code under new names.

Parts, in file order:
  Part I.1   Understanding convolutions: a 2-D convolution written as im2col +
             one matrix product, forward and backward (CustomConv2DFunction),
             and its module wrapper (CustomConv2d)
  Part I.2   Design and train a network: SimpleNet (the handout's CNN), ResNet10
             (ours, the default), weight init, parameter and FLOP counts
  Part II.1  Self-attention and the Transformer block (Attention,
             TransformerBlock)
  Part II.2  A vision Transformer (SimpleViT), then the data augmentation
             (get_train_transforms, get_val_transforms)
  Part III   Adversarial samples: the PGD attack, adversarial training,
             saliency maps and the images main.py logs to TensorBoard

Public names. "graded": the handout's name and signature, never changed;
"main.py": read by code/main.py; "-": neither (used here, by tests, benchmarks).
  CustomConv2DFunction        graded           the convolution's forward and backward
  custom_conv2d               -                CustomConv2DFunction.apply
  CustomConv2d                graded, main.py  its nn.Conv2d-like module (--use-custom-conv)
  SimpleNet                   graded           the handout's CNN (--arch simplenet)
  init_cnn_weights            -                Kaiming init of convolutions, unit BatchNorm
  BasicBlock, ResNet10        -                our CNN, one residual block a stage (--arch resnet10)
  count_params                main.py          number of trainable parameters
  count_flops                 -                FLOPs of a forward pass of one image
  cnn_models                  main.py          {name: CNN class}: --arch choices (SGD)
  default_cnn_model           graded, main.py  the CNN main.py trains by default (ResNet10)
  Attention                   graded           multi-head self-attention
  TransformerBlock            graded           Transformer block, global or window attention
  SimpleViT                   graded           the vision Transformer
  vit_models                  main.py          {name: ViT class}: --arch choices (AdamW)
  default_vit_model           graded, main.py  the ViT of --use-vit (SimpleViT)
  get_train_transforms        graded, main.py  training augmentation
  get_val_transforms          graded, main.py  validation transforms
  least_confident_labels      main.py          argmin of the logits: PGDAttack's target
  pixel_bounds, feasible_box  -                the valid pixel range and PGD's box in it
  PGDAttack                   graded           PGD towards the least confident label
  default_attack              graded, main.py  the attack of -a (PGDAttack)
  UntargetedPGDAttack         main.py          PGD for adversarial training (--adv-train)
  adversarial_training_batch  main.py          a training batch, part of it adversarial
  GradAttention               graded           saliency maps (gradient of the class score)
  default_attention           graded, main.py  the explainer of -e -v (GradAttention)
  vis_grid                    graded, main.py  a mosaic of a batch of images
  default_visfunction         graded, main.py  the mosaic main.py logs (vis_grid)
  vis_saliency                main.py          saliency heat maps over their images
  vis_perturbation            main.py          the perturbation adv - input, amplified
Names that start with "_" are helpers of this file.
"""
# python imports
import math

# torch imports
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function
from torch.nn.modules.module import Module
from torchvision.utils import make_grid

# helper code of this assignment
import custom_transforms as transforms
from custom_blocks import (PatchEmbed, window_partition, window_unpartition,
                           DropPath, MLP, trunc_normal_)


################################################################################
# Part I.1: Understanding Convolutions
################################################################################
# How this convolution works (and why it is close to PyTorch's speed)
#
# A convolution is a matrix product in disguise. "im2col" (unfold) copies, for
# every output pixel, the K x K x C_i input patch it looks at into one row of a
# matrix `cols` of shape (N*H_o*W_o, K*K*C_i). With the weight flattened to
# W of shape (C_o, K*K*C_i), the whole layer is ONE matrix product
#       Y = cols @ W^T + b                      (N*H_o*W_o, C_o)
# and its gradients are two more matrix products (chain rule on Y = cols W^T):
#       dL/dW    = dY^T @ cols                  (C_o, K*K*C_i)
#       dL/dcols = dY @ W                       (N*H_o*W_o, K*K*C_i)
#       dL/dX    = col2im(dL/dcols)             ("fold": each input pixel sums the
#                                                gradients of all patches it was in)
#       dL/db    = dY summed over N, H_o, W_o
# The gradients of a convolution are convolutions too: dL/dW correlates the
# input with dY, and dL/dX is dY (zero-padded by K-1-P) convolved with the kernel
# flipped in space and with C_i/C_o swapped. With stride 1 we compute dL/dX in
# exactly that form, with the same im2col + GEMM as the forward pass; with a
# larger stride we use dY @ W followed by the fold (col2im).
#
# What makes it fast and lean (a naive unfold version is ~4x slower than nn.Conv2d):
#  * channels-last rows: we unfold an (N, H, W, C) view, so each patch row is K*K
#    contiguous runs of C numbers; the copy is cheap and every product above is a
#    large 2-D GEMM for the BLAS (no batched matmul, no sum over the batch).
#    The output is returned in channels-last memory (shape still N x C x H x W),
#    which the next layer reads again without any copy.
#  * on the CPU the batch goes through im2col + GEMM in a few chunks of images
#    (cols of a chunk <= 32 MB, one buffer reused by every chunk; see
#    _CPU_COLS_CHUNK_BYTES): the same unfold and GEMMs, on rows N/chunks at a time.
#  * a 1x1 stride-1 convolution needs no unfold at all: its `cols` is the input
#    itself, viewed as a (N*H*W, C_i) matrix.
#  * for backward we save the input, not `cols` (K*K times larger): `cols` is
#    rebuilt in backward, and only if the weight gradient is requested. So the
#    memory kept for backward is the same as nn.Conv2d's (input and weight).
def _conv_out_size(size, kernel_size, stride, padding):
    """H_o = floor((H_i + 2P - K) / S) + 1 (the handout's formula)."""
    return (size + 2 * padding - kernel_size) // stride + 1


# On the CPU, im2col + GEMM is run a few images at a time (see _batch_chunks).
# Whole-batch `cols` of a 64-channel 3x3 layer at 32x32 px and batch 64 is 151 MB:
# written to freshly allocated memory (a page fault every 4 KiB) and read back from
# RAM, it cost more than the GEMM itself (the 64-channel layers ran at ~3x
# nn.Conv2d's time). In chunks, one buffer of at most this many bytes is reused for
# every chunk (at most one buffer's worth of page faults, and it can stay in the
# last-level cache between the unfold that writes it and the GEMM that reads it). Not much smaller: every chunk
# adds a few operations, each a parallel region that waits for all threads, which
# costs a lot on a busy machine (8 MB chunks measured slower than no chunks there).
# (On a GPU: one chunk, the whole batch.)
_CPU_COLS_CHUNK_BYTES = 32 * 2**20


def _batch_chunks(x, rows_per_image, row_numel, no_unfold=False):
    """How the batch of x goes through im2col + GEMM: ([(start, end)] ranges of
    images, buffer). The whole batch and no buffer on a GPU or when no_unfold (a
    1x1 stride-1 convolution, whose cols is x itself); on the CPU, chunks whose
    cols (rows_per_image * row_numel elements per image) fit in
    _CPU_COLS_CHUNK_BYTES (one image at least), and a flat buffer for one chunk's
    cols that every chunk reuses (None when there is a single chunk)."""
    N = x.size(0)
    if x.device.type != 'cpu' or no_unfold:
        return [(0, N)], None
    image_bytes = max(1, rows_per_image * row_numel * x.element_size())
    n = max(1, min(N, _CPU_COLS_CHUNK_BYTES // image_bytes))
    n = -(-N // -(-N // n))                       # as many chunks, sizes evened out
    chunks = [(i, min(i + n, N)) for i in range(0, N, n)]
    buffer = x.new_empty(n * rows_per_image * row_numel) if len(chunks) > 1 else None
    return chunks, buffer


def _pad_for_chunks(x, padding, chunks):
    """(x, padding) for _im2col over these chunks: with several chunks, x zero-padded
    once here (channels-last, shape N x C x (H+2P) x (W+2P)) and padding 0, rather
    than each chunk padding its own copy (fewer, larger operations)."""
    if len(chunks) == 1 or padding == 0:
        return x, padding
    P = padding
    return F.pad(x.permute(0, 2, 3, 1), (0, 0, P, P, P, P)).permute(0, 3, 1, 2), 0


def _im2col(x, kernel_size, stride, padding, out=None):
    """Unfold x (N, C, H, W) into cols (N*H_o*W_o, K*K*C): one row per output
    pixel, holding its K x K patch in (ky, kx, c) order (channels last). With
    `out` (a contiguous buffer of at least that many elements) the rows are
    written into it, and a view of its beginning is returned."""
    K, S, P = kernel_size, stride, padding
    x = x.permute(0, 2, 3, 1)                       # (N, H, W, C), a view
    if P > 0:
        x = F.pad(x, (0, 0, P, P, P, P))            # zero-pad H and W (not C)
    patches = x.unfold(1, K, S).unfold(2, K, S)     # (N, H_o, W_o, C, K, K), a view
    N, H_out, W_out, C = patches.shape[:4]
    patches = patches.permute(0, 1, 2, 4, 5, 3)     # (N, H_o, W_o, K, K, C), a view
    if out is None:
        # the only copy (free when K = S = 1 and x is already channels-last)
        return patches.reshape(N * H_out * W_out, K * K * C)
    cols = out[:patches.numel()].view(patches.shape)
    cols.copy_(patches)                             # the only copy
    return cols.view(N * H_out * W_out, K * K * C)


def _col2im(cols, input_shape, kernel_size, stride, padding):
    """Fold: the adjoint of _im2col. Every patch row of cols (N*H_o*W_o, K*K*C)
    is added back to the input pixels it was copied from; pixels that no patch
    covered (stride > K, or the last rows/columns when (H + 2P - K) % S != 0)
    keep a zero gradient. Returns an (N, C, H, W) tensor in channels-last memory."""
    N, C, H, W = input_shape
    K, S, P = kernel_size, stride, padding
    H_out, W_out = _conv_out_size(H, K, S, P), _conv_out_size(W, K, S, P)
    cols = cols.view(N, H_out, W_out, K, K, C)
    grad = cols.new_zeros(N, H + 2 * P, W + 2 * P, C)
    # kernel tap (ky, kx) of output pixel (i, j) read input pixel (S*i + ky, S*j + kx):
    # K*K strided slice-adds put every contribution back (overlaps are summed)
    for ky in range(K):
        for kx in range(K):
            grad[:, ky:ky + S * (H_out - 1) + 1:S, kx:kx + S * (W_out - 1) + 1:S, :] \
                += cols[:, :, :, ky, kx, :]
    return grad[:, P:P + H, P:P + W, :].permute(0, 3, 1, 2)


def _conv2d_gemm(x, weight, bias, stride, padding):
    """Y = cols @ W^T + b: the convolution as one GEMM (a few GEMMs, one per chunk
    of images, on the CPU). Returns (N, C_o, H_o, W_o) stored channels-last, i.e.
    in memory the (N*H_o*W_o, C_o) matrix that the GEMMs write into (a fresh
    tensor, not a view: autograd forbids in-place ops such as ReLU(inplace=True)
    on a view returned by a custom Function)."""
    N, C_out, K = x.size(0), weight.size(0), weight.size(2)
    H_out = _conv_out_size(x.size(2), K, stride, padding)
    W_out = _conv_out_size(x.size(3), K, stride, padding)
    output = torch.empty((N, C_out, H_out, W_out), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last)
    output_2d = output.permute(0, 2, 3, 1).view(-1, C_out)
    # the weight in the same (ky, kx, c) order as the patch rows: (C_o, K*K*C_i)
    weight_2d = weight.permute(0, 2, 3, 1).reshape(C_out, -1)
    rows = H_out * W_out                                          # cols rows per image
    chunks, buffer = _batch_chunks(x, rows, weight_2d.size(1),
                                   no_unfold=(K == 1 and stride == 1 and padding == 0))
    x, padding = _pad_for_chunks(x, padding, chunks)
    for start, end in chunks:
        cols = _im2col(x[start:end], K, stride, padding, buffer)  # (n*H_o*W_o, K*K*C_i)
        out_2d = output_2d[start * rows:end * rows]
        if bias is None:
            torch.mm(cols, weight_2d.t(), out=out_2d)
        else:
            torch.addmm(bias, cols, weight_2d.t(), out=out_2d)
    return output


def _check_conv_args(input_feats, weight, bias, stride, padding):
    """The handout's sanity checks, with messages that say what is wrong."""
    if input_feats.dim() != 4:
        raise ValueError(f"custom_conv2d: input must be 4-D (N, C_i, H, W), "
                         f"got shape {tuple(input_feats.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"custom_conv2d: weight must be 4-D (C_o, C_i, K, K), "
                         f"got shape {tuple(weight.shape)}")
    if weight.size(2) != weight.size(3):
        raise ValueError(f"custom_conv2d: only square kernels are supported, got "
                         f"{weight.size(2)}x{weight.size(3)}")
    if input_feats.size(1) != weight.size(1):
        raise ValueError(f"custom_conv2d: input has {input_feats.size(1)} channels but "
                         f"the weight expects {weight.size(1)} (weight shape "
                         f"{tuple(weight.shape)})")
    if input_feats.dtype != weight.dtype:
        raise ValueError(f"custom_conv2d: input dtype {input_feats.dtype} differs from "
                         f"weight dtype {weight.dtype} (convert one of them)")
    if bias is not None and tuple(bias.shape) != (weight.size(0),):
        raise ValueError(f"custom_conv2d: bias must have shape ({weight.size(0)},) "
                         f"(one per output channel), got {tuple(bias.shape)}")
    # bool is a subclass of int in Python: reject it explicitly
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"custom_conv2d: stride must be an int >= 1 (same stride for "
                         f"height and width), got {stride!r}")
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"custom_conv2d: padding must be an int >= 0 (same padding on "
                         f"all sides), got {padding!r}")
    K, H, W = weight.size(2), input_feats.size(2), input_feats.size(3)
    if K > H + 2 * padding or K > W + 2 * padding:
        raise ValueError(f"custom_conv2d: kernel size {K} is larger than the padded "
                         f"input {H + 2 * padding}x{W + 2 * padding} "
                         f"(input {H}x{W}, padding {padding})")


def _autocast_dtype(device_type):
    """The dtype autocast asks for on this device, or None when autocast is off.
    (torch.amp.custom_fwd needs the device type when the class is defined; we
    take it from the input instead, so one class serves CPU, CUDA and MPS.)"""
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class CustomConv2DFunction(Function):
    """Our 2-D convolution as an autograd Function: forward and backward written
    with im2col and matrix products (no torch convolution), as described above.
    Call it as custom_conv2d(input, weight, bias, stride, padding); the module
    CustomConv2d wraps it like nn.Conv2d."""

    @staticmethod
    def forward(ctx, input_feats, weight, bias, stride=1, padding=0):
        """
        Forward propagation of convolution operation.
        We only consider square filters with equal stride/padding in width and height!

        Args:
          input_feats: input feature map of size N * C_i * H * W
          weight: filter weight of size C_o * C_i * K * K
          bias: (optional) filter bias of size C_o
          stride: (int, optional) stride for the convolution. Default: 1
          padding: (int, optional) Zero-padding added to both sides of the input. Default: 0

        Outputs:
          output: responses of the convolution  w*x+b
        """
        # under torch.autocast a convolution runs in the lower precision (like
        # nn.Conv2d does): cast once here, then compute with autocast off
        dtype = _autocast_dtype(input_feats.device.type)
        if dtype is not None and input_feats.is_floating_point():
            input_feats, weight = input_feats.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None

        # sanity check (clear messages instead of a shape error deep in matmul)
        _check_conv_args(input_feats, weight, bias, stride, padding)

        # save the conv params
        ctx.stride = stride
        ctx.padding = padding
        ctx.input_shape = input_feats.shape
        ctx.has_bias = bias is not None

        with torch.autocast(input_feats.device.type, enabled=False):
            output = _conv2d_gemm(input_feats, weight, bias, stride, padding)

        # save the input (not cols, which is K*K times larger): backward re-unfolds it
        ctx.save_for_backward(input_feats, weight)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        """
        Backward propagation of convolution operation

        Args:
          grad_output: gradients of the outputs

        Outputs:
          grad_input: gradients of the input features
          grad_weight: gradients of the convolution weight
          grad_bias: gradients of the bias term
        """
        # unpack tensors and initialize the grads
        input_feats, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None

        # recover the conv params
        kernel_size = weight.size(2)
        stride = ctx.stride
        padding = ctx.padding
        C_out = weight.size(0)

        with torch.autocast(grad_output.device.type, enabled=False):
            grad_output = grad_output.to(weight.dtype)
            # dY as a (N*H_o*W_o, C_o) matrix: a free view when it is channels-last
            grad_out_2d = grad_output.permute(0, 2, 3, 1).reshape(-1, C_out)
            grad_output = grad_out_2d.view(
                grad_output.size(0), grad_output.size(2), grad_output.size(3),
                C_out).permute(0, 3, 1, 2)                              # channels-last
            rows = grad_output.size(2) * grad_output.size(3)           # dY rows per image

            if ctx.needs_input_grad[0] and stride == 1 and padding <= kernel_size - 1:
                # with stride 1, the gradient of a convolution is a convolution:
                # dL/dX = dY, zero-padded by K-1-P, convolved with the kernel flipped
                # in space and with its in/out channels swapped. (Faster than
                # dY W + fold: the GEMM is compute-heavy and nothing is scattered.)
                # (C_i, C_o, K, K), flipped and stored as (C_i, K, K, C_o) in one copy:
                # the (ky, kx, c) order that _conv2d_gemm flattens it to for free
                flipped = weight.permute(1, 2, 3, 0).flip(1, 2).permute(0, 3, 1, 2)
                grad_input = _conv2d_gemm(grad_output, flipped, None, 1,
                                          kernel_size - 1 - padding)
            elif ctx.needs_input_grad[0]:
                # general case: dL/dcols = dY W, then fold each patch gradient back
                # onto the input pixels it came from (chunk by chunk on the CPU)
                weight_2d = weight.permute(0, 2, 3, 1).reshape(C_out, -1)
                _, C_in, H, W = ctx.input_shape
                chunks, buffer = _batch_chunks(grad_output, rows, weight_2d.size(1))
                if len(chunks) > 1:
                    grad_input = torch.empty(ctx.input_shape, dtype=grad_output.dtype,
                                             device=grad_output.device,
                                             memory_format=torch.channels_last)
                for start, end in chunks:
                    grad_out_chunk = grad_out_2d[start * rows:end * rows]
                    if buffer is None:
                        grad_cols = grad_out_chunk @ weight_2d          # (n*H_o*W_o, K*K*C_i)
                    else:
                        grad_cols = buffer[:grad_out_chunk.size(0) * weight_2d.size(1)]
                        torch.mm(grad_out_chunk, weight_2d,
                                 out=grad_cols.view(-1, weight_2d.size(1)))
                        grad_cols = grad_cols.view(-1, weight_2d.size(1))
                    folded = _col2im(grad_cols, (end - start, C_in, H, W),
                                     kernel_size, stride, padding)
                    if len(chunks) == 1:
                        grad_input = folded                # the whole batch: no copy
                    else:
                        grad_input[start:end] = folded

            if ctx.needs_input_grad[1]:
                # dL/dW = dY^T cols: a GEMM whose inner dimension runs over the
                # whole batch and all output pixels (on the CPU, a sum of GEMMs
                # over chunks of images, accumulated in place)
                row_numel = kernel_size * kernel_size * input_feats.size(1)
                chunks, buffer = _batch_chunks(
                    input_feats, rows, row_numel,
                    no_unfold=(kernel_size == 1 and stride == 1 and padding == 0))
                x, pad = _pad_for_chunks(input_feats, padding, chunks)
                grad_weight_2d = None
                for start, end in chunks:
                    cols = _im2col(x[start:end], kernel_size, stride, pad,
                                   buffer)                               # (n*H_o*W_o, K*K*C_i)
                    grad_out_t = grad_out_2d[start * rows:end * rows].t()
                    if grad_weight_2d is None:
                        grad_weight_2d = grad_out_t @ cols               # (C_o, K*K*C_i)
                    else:
                        grad_weight_2d.addmm_(grad_out_t, cols)
                grad_weight = grad_weight_2d.view(
                    C_out, kernel_size, kernel_size, -1).permute(0, 3, 1, 2).contiguous()

            if ctx.has_bias and ctx.needs_input_grad[2]:
                # compute the gradients w.r.t. bias (if any)
                grad_bias = grad_out_2d.sum(0)

        return grad_input, grad_weight, grad_bias, None, None


custom_conv2d = CustomConv2DFunction.apply


class CustomConv2d(Module):
    """
    The same interface as torch.nn.Conv2d
    (square kernels, one stride and one padding for both axes, dilation=1, groups=1;
    anything else raises ValueError)
    """
    def __init__(self, in_channels, out_channels, kernel_size, stride=1,
                 padding=0, dilation=1, groups=1, bias=True):
        super().__init__()
        # ValueError, not assert: the checks must stay under python -O
        if not isinstance(kernel_size, int):
            raise ValueError(f"We only support squared filters: kernel_size must be an int, "
                             f"got {kernel_size!r}")
        if not isinstance(stride, int):
            raise ValueError(f"We only support equal stride: stride must be an int, "
                             f"got {stride!r}")
        if not isinstance(padding, int):
            raise ValueError(f"We only support equal padding: padding must be an int, "
                             f"got {padding!r}")
        # silently ignoring these would compute a different convolution
        if dilation != 1 or groups != 1:
            raise ValueError(f"CustomConv2d supports only dilation=1 and groups=1, "
                             f"got {dilation!r}, {groups!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding

        # not used (for compatibility)
        self.dilation = dilation
        self.groups = groups

        # register weight and bias as parameters
        # (uninitialized memory: reset_parameters fills it)
        self.weight = nn.Parameter(torch.empty(
            out_channels, in_channels, kernel_size, kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter('bias', None)
        self.reset_parameters()

    def reset_parameters(self):
        # initialization using Kaiming uniform (the same as nn.Conv2d)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input):
        # call our custom conv2d op
        return custom_conv2d(input, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self):
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}'
             f', stride={self.stride}, padding={self.padding}')
        if self.bias is None:
            s += ', bias=False'
        return s


################################################################################
# Part I.2: Design and train a network
################################################################################
def init_cnn_weights(model):
    """Kaiming init for convolutions (nn.Conv2d and CustomConv2d), unit BatchNorm."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, CustomConv2d)):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.0)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)


class SimpleNet(nn.Module):
    """A simple CNN for image classification: the handout's layers, unchanged; only its
    initialization differs (see reset_parameters)."""

    def __init__(self, conv_op=nn.Conv2d, num_classes=100):
        super().__init__()
        # you can start from here and create a better model
        self.features = nn.Sequential(
            # conv1 block: conv 7x7
            conv_op(3, 64, kernel_size=7, stride=2, padding=3),
            nn.ReLU(inplace=True),
            # max pooling 1/2
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            # conv2 block: simple bottleneck
            conv_op(64, 64, kernel_size=1, stride=1, padding=0),
            nn.ReLU(inplace=True),
            conv_op(64, 64, kernel_size=3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            conv_op(64, 256, kernel_size=1, stride=1, padding=0),
            nn.ReLU(inplace=True),
            # max pooling 1/2
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            # conv3 block: simple bottleneck
            conv_op(256, 128, kernel_size=1, stride=1, padding=0),
            nn.ReLU(inplace=True),
            conv_op(128, 128, kernel_size=3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            conv_op(128, 512, kernel_size=1, stride=1, padding=0),
            nn.ReLU(inplace=True),
        )
        # global avg pooling + FC
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        # the handout defines reset_parameters but never calls it (and misspells
        # nn.init.constant_ in it); here it is fixed and actually applied
        self.reset_parameters()

    def reset_parameters(self):
        """torchvision's init for plain (BatchNorm-free) CNNs such as VGG: Kaiming
        normal (fan_out) convolutions, zero biases, a classifier N(0, 0.01).

        Why not the handout's (PyTorch's default, Kaiming uniform with a = sqrt(5)):
        its activations shrink layer after layer, so the loss sits at ln(classes)
        for a long time; students still reached 44% on MiniPlaces in 60 epochs, but
        short runs stay at chance. Why not Kaiming fan_in: activations keep their
        scale, and without BatchNorm the classifier's first steps at lr 0.1 are then
        so large that training stalls or diverges. Measured on real digit scans: see
        docs/benchmarks.md, "Training recipe". A network without BatchNorm stays sensitive
        to the learning rate (main.py stops a run whose loss becomes NaN) and learns
        slowly in short runs."""
        init_cnn_weights(self)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        # adversarial training is done by the training loop (main.py --adv-train),
        # which crafts samples with the model in eval mode, see Part III
        x = self.features(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        x = self.fc(x)
        return x


class BasicBlock(nn.Module):
    """Residual block of ResNet (He et al. 2016): two 3x3 conv-BN layers plus a
    shortcut, y = relu(x + bn2(conv2(relu(bn1(conv1(x)))))). When the block
    changes resolution or width, the shortcut is a strided 1x1 conv + BN."""

    def __init__(self, in_channels, out_channels, stride=1, conv_op=nn.Conv2d):
        super().__init__()
        # no conv bias: the BatchNorm right after it has its own shift
        self.conv1 = conv_op(in_channels, out_channels, kernel_size=3, stride=stride,
                             padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv_op(out_channels, out_channels, kernel_size=3, stride=1,
                             padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv_op(in_channels, out_channels, kernel_size=1, stride=stride,
                        padding=0, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet10(nn.Module):
    """Our CNN for 128x128 MiniPlaces: a ResNet with one residual block per stage.

    Design (accuracy per unit of compute):
      * stem: 7x7 conv stride 2 + BN + ReLU + 3x3 max-pool stride 2 (128 -> 32 px):
        the expensive high-resolution layers are kept to one cheap conv;
      * 4 stages of one BasicBlock each, widths 64-128-256-512 at 32-16-8-4 px
        (each stage halves the resolution and doubles the width, so every stage
        costs about the same FLOPs);
      * batch normalization after every conv, residual shortcuts (1x1 conv + BN
        where the shape changes), so it trains fast with a large learning rate.
        Every BN starts at scale 1, as in torchvision. Starting the last BN of
        each residual branch at 0 (Goyal et al. 2017) helps long large-batch
        ImageNet runs, but stalled the short runs this assignment is full of:
        on real digit scans, 8 epochs at batch 64, 27.5% against 83.9% top-1
        (docs/benchmarks.md, "Training recipe");
      * global average pooling + one linear classifier.
    It is ResNet-18 with half the blocks: 1.8x the FLOPs of SimpleNet, but with
    BN and shortcuts it learns much faster per epoch.

    Size (measured with count_params / count_flops below, 100 classes):
      4,957,092 parameters; 0.580 GFLOPs (multiply-adds x2) per 128x128 image.
    `conv_op` builds every convolution (stem, blocks and shortcuts), so
    --use-custom-conv runs the whole network on CustomConv2d.
    """

    def __init__(self, conv_op=nn.Conv2d, num_classes=100, widths=(64, 128, 256, 512)):
        super().__init__()
        self.stem = nn.Sequential(
            conv_op(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        blocks, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(in_channels, width, stride=1 if i == 0 else 2,
                                     conv_op=conv_op))
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        init_cnn_weights(self)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def count_params(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model, img_size=128):
    """FLOPs (2 x multiply-adds of convs and matmuls) of one forward pass of one
    img_size x img_size RGB image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    param = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops()


# the CNNs main.py can build by name (--arch NAME)
cnn_models = {
    'simplenet': SimpleNet,
    'resnet10': ResNet10,
}

# change this to your model!
default_cnn_model = ResNet10


################################################################################
# Part II.1: Understanding self-attention and Transformer block
################################################################################
class Attention(nn.Module):
    """Multi-head Self-Attention."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, fused=None):
        """
        Args:
            dim (int): Number of input channels.
            num_heads (int): Number of attention heads.
            qkv_bias (bool): If True, add a learnable bias to query, key, value.
            fused (bool or None): compute softmax(QK^T/sqrt(d))V with PyTorch's fused
                kernel (True), with the formula written out below (False), or pick
                automatically (None: fused wherever PyTorch has it; it gives the same
                result, tested to 1e-5 in float32, in less time and memory).
        """
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.fused = fused

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def use_fused(self):
        """Whether forward uses the fused kernel (fused=None: wherever PyTorch has it)."""
        if self.fused is None:
            return hasattr(F, "scaled_dot_product_attention")
        return self.fused

    def forward(self, x):
        """x: B x H x W x C (a token grid) or B x N x C (a sequence); same shape out."""
        if x.dim() not in (3, 4) or x.shape[-1] != self.dim:
            raise ValueError(f"Attention expects tokens B x H x W x {self.dim} or "
                             f"B x N x {self.dim}, got shape {tuple(x.shape)}")
        in_shape = x.shape
        B, C = x.shape[0], x.shape[-1]
        x = x.reshape(B, -1, C)                                  # B x N x C
        N, h = x.shape[1], self.num_heads

        # one linear layer gives Q, K and V for all heads at once:
        # B x N x 3C -> 3 x B x heads x N x head_dim
        qkv = self.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        if self.use_fused():
            # the same formula in one kernel (flash / memory-efficient attention):
            # the N x N matrix of weights is never stored
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            # S = softmax(Q K^T / sqrt(d)) V, per head, softmax over the keys (row-wise)
            attn = (q * self.scale) @ k.transpose(-2, -1)        # B x heads x N x N
            attn = attn.softmax(dim=-1)
            out = attn @ v                                       # B x heads x N x head_dim

        # concatenate the heads (B x N x heads*head_dim) and mix them with a projection
        out = out.transpose(1, 2).reshape(B, N, C)
        out = self.proj(out)
        return out.reshape(in_shape)

    def extra_repr(self):
        return f"dim={self.dim}, num_heads={self.num_heads}, fused={self.fused}"


class TransformerBlock(nn.Module):
    """Transformer blocks with support of local window self-attention"""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0,
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU, window_size=0):
        """
        Args:
            dim (int): Number of input channels.
            num_heads (int): Number of attention heads in each ViT block.
            mlp_ratio (float): Ratio of mlp hidden dim to embedding dim.
            qkv_bias (bool): If True, add a learnable bias to query, key, value.
            drop_path (float): Stochastic depth rate.
            norm_layer (nn.Module): Normalization layer.
            act_layer (nn.Module): Activation layer.
            window_size (int): Window size for window attention blocks;
                0 means global attention over all tokens.
        """
        super().__init__()
        if window_size < 0:
            raise ValueError(f"TransformerBlock: window_size must be >= 0, got {window_size}")
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = MLP(in_features=dim, hidden_features=int(dim * mlp_ratio),
                       act_layer=act_layer)
        self.window_size = window_size

    def forward(self, x):
        """x: B x H x W x C tokens; same shape out."""
        shortcut = x
        x = self.norm1(x)
        # Window partition: attend only within window_size x window_size windows,
        # which the attention sees as a batch of small images. A grid that is not a
        # multiple of the window is zero-padded; as in ViTDet the padded tokens are
        # not masked, and they are dropped again after the attention.
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)

        x = self.attn(x)
        # Reverse window partition
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))

        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


################################################################################
# Part II.2: Design and implement a vision Transformer
################################################################################
class SimpleViT(nn.Module):
    """
    This module implements Vision Transformer (ViT) backbone in
    "Exploring Plain Vision Transformer Backbones for Object Detection",
    https://arxiv.org/abs/2203.16527

    image -> patch embedding (B x H/p x W/p x C) + absolute position embedding
          -> Transformer blocks (local-window or global attention)
          -> average over tokens -> LayerNorm -> linear classifier
    """

    def __init__(self, img_size=128, num_classes=100, patch_size=16, in_chans=3,
                 embed_dim=192, depth=4, num_heads=4, mlp_ratio=4.0, qkv_bias=True,
                 drop_path_rate=0.1, norm_layer=nn.LayerNorm, act_layer=nn.GELU,
                 use_abs_pos=True, window_size=4, window_block_indexes=(0, 2)):
        """
        Args:
            img_size (int): Input image size.
            num_classes (int): Number of object categories
            patch_size (int): Patch size.
            in_chans (int): Number of input image channels.
            embed_dim (int): Patch embedding dimension.
            depth (int): Depth of ViT.
            num_heads (int): Number of attention heads in each ViT block.
            mlp_ratio (float): Ratio of mlp hidden dim to embedding dim.
            qkv_bias (bool): If True, add a learnable bias to query, key, value.
            drop_path_rate (float): Stochastic depth rate.
            norm_layer (nn.Module): Normalization layer.
            act_layer (nn.Module): Activation layer.
            use_abs_pos (bool): If True, use absolute positional embeddings.
            window_size (int): Window size for local attention blocks.
            window_block_indexes (list): Indexes for blocks using local attention.
                Local window attention allows more efficient computation, and can be
                coupled with standard global attention.
        """
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"SimpleViT: img_size {img_size} is not divisible by "
                             f"patch_size {patch_size}")
        bad = [i for i in window_block_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"SimpleViT: window_block_indexes {bad} are not blocks of a "
                             f"depth-{depth} model (valid: 0..{depth - 1})")
        self.img_size, self.patch_size = img_size, patch_size
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(kernel_size=(patch_size, patch_size),
                                      stride=(patch_size, patch_size),
                                      in_chans=in_chans, embed_dim=embed_dim)
        if use_abs_pos:
            # Initialize absolute positional embedding with image size
            # The embedding is learned from data
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        else:
            self.pos_embed = None

        # stochastic depth decay rule: deeper blocks are dropped more often
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]

        self.blocks = nn.ModuleList([
            TransformerBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                             drop_path=dpr[i], norm_layer=norm_layer, act_layer=act_layer,
                             window_size=window_size if i in window_block_indexes else 0)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)

        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a position embedding learned for another image size does not fit: say so in
        # one line instead of PyTorch's generic "size mismatch" list
        key = prefix + 'pos_embed'
        if self.pos_embed is not None and key in state_dict:
            theirs, ours = tuple(state_dict[key].shape), tuple(self.pos_embed.shape)
            if theirs != ours:
                raise ValueError(
                    f"SimpleViT checkpoint: pos_embed was trained for a {theirs[1]}x{theirs[2]} "
                    f"patch grid (img_size {theirs[1] * self.patch_size} with patch_size "
                    f"{self.patch_size}), this model has {ours[1]}x{ours[2]} (img_size "
                    f"{self.img_size}); build the model with the checkpoint's img_size")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        x = self.patch_embed(x)                                  # B x H' x W' x C
        if self.pos_embed is not None:
            if x.shape[1:3] != self.pos_embed.shape[1:3]:
                raise ValueError(
                    f"SimpleViT was built for {self.img_size}x{self.img_size} images, got "
                    f"{x.shape[1] * self.patch_size}x{x.shape[2] * self.patch_size}; "
                    f"build it with img_size matching the input")
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = x.mean(dim=(1, 2))                                   # average pooling: B x C
        x = self.norm(x)
        return self.head(x)


# the Transformers main.py can build by name (--arch NAME; --use-vit builds the default)
vit_models = {
    'simplevit': SimpleViT,
}

# change this to your model!
# We keep the handout's configuration (patch 16 -> 8x8 tokens, dim 192, depth 4,
# 4 heads, 4x4 windows in blocks 0 and 2, drop path 0.1): 1.96 M parameters
# (100 classes) and 0.25 GFLOPs (0.13 G multiply-adds) per 128x128 image. Why this
# one (it has a measured MiniPlaces result), its accuracy, and larger variants to
# try: docs/part2-vit.md, section "SimpleViT".
default_vit_model = SimpleViT


# define data augmentation used for training, you can tweak things if you want
def get_train_transforms():
    train_transforms = []
    train_transforms.append(transforms.Scale(144))
    train_transforms.append(transforms.RandomHorizontalFlip())
    train_transforms.append(transforms.RandomColor(0.15))
    train_transforms.append(transforms.RandomRotate(15))
    train_transforms.append(transforms.RandomSizedCrop(128))
    train_transforms.append(transforms.ToTensor())
    train_transforms.append(transforms.Normalize(mean=[0.485, 0.456, 0.406],
                                                 std=[0.229, 0.224, 0.225]))
    train_transforms = transforms.Compose(train_transforms)
    return train_transforms


# define data augmentation used for validation, you can tweak things if you want
def get_val_transforms():
    import cv2  # for its interpolation flag
    val_transforms = []
    # one fixed interpolation, bilinear: Scale's default draws one of three for every
    # image, and validation figures (-e) must not depend on a random draw. (INTER_AREA
    # would shrink more cleanly, but the fused cache path warps with nearest, bilinear
    # or bicubic only; MiniPlaces' own 128 x 128 images are not resized at all.)
    val_transforms.append(transforms.Scale(128, interpolations=[cv2.INTER_LINEAR]))
    val_transforms.append(transforms.CenterCrop(128))
    val_transforms.append(transforms.ToTensor())
    val_transforms.append(transforms.Normalize(mean=[0.485, 0.456, 0.406],
                                               std=[0.229, 0.224, 0.225]))
    val_transforms = transforms.Compose(val_transforms)
    return val_transforms


################################################################################
# Part III: Adversarial samples
################################################################################
# All attacks and explanations below work on the *normalized* images that the
# data loader produces (x_norm = (x_pixel - mean) / std, std ~ 0.226). So an
# epsilon of 0.1 moves a pixel by at most 0.1 * 0.226 * 255 ~ 6 of 255 grey
# levels, as the handout says. Every step is also clipped to the valid pixel
# range, [0, 1] before normalization, i.e. [(0 - mean) / std, (1 - mean) / std]
# per channel with the mean and std of get_val_transforms(): an adversarial
# sample must be an image one could save and show (torchattacks does the same).


def pixel_bounds(input):
    """(low, high), each 1 x C x 1 x 1 on input's device: the normalized values of
    the pixel intensities 0 and 1 under get_val_transforms()'s Normalize, or 0 and 1
    when it has none. None when input's channels do not match the normalization
    (not an image of this data set: no pixel range to keep)."""
    norm = next((t for t in getattr(get_val_transforms(), 'transforms', [])
                 if isinstance(t, transforms.Normalize)), None)
    mean, std = (norm.mean, norm.std) if norm is not None else ([0.0], [1.0])
    if len(mean) == 1:
        mean, std = mean * input.shape[1], std * input.shape[1]
    if len(mean) != input.shape[1]:
        return None
    kwargs = dict(dtype=input.dtype, device=input.device)
    mean = torch.tensor(mean, **kwargs).view(1, -1, 1, 1)
    std = torch.tensor(std, **kwargs).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


def feasible_box(x_orig, epsilon):
    """Per-pixel (lower, upper) bounds of a PGD sample: the epsilon-ball around the
    original image, intersected with the valid pixel range. The range is clamped
    into the ball, so the bounds never leave the ball, even for an input outside
    the range (then the sample is as close to the range as the ball allows)."""
    lower, upper = x_orig - epsilon, x_orig + epsilon
    bounds = pixel_bounds(x_orig) if x_orig.dim() == 4 else None
    if bounds is None:
        return lower, upper
    low, high = bounds
    return torch.clamp(low, min=lower, max=upper), torch.clamp(high, min=lower, max=upper)


class _EvalMode(object):
    """Context manager: put every module of `model` in eval mode, restore each
    module's own train/eval flag on exit (even on error).

    Attacks and saliency run the model in eval mode because (1) BatchNorm must
    use its running statistics, otherwise the batch statistics would both couple
    the images of a batch and be overwritten by adversarial images, and
    (2) dropout would make every gradient step see a different network.
    Flags are restored per module, not with model.train(), so a model with some
    modules deliberately frozen in eval mode stays as the caller had it.
    """

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for module, was_training in self.modes:
            module.training = was_training
        return False


def _check_float_batch(input, who, image=False):
    if not torch.is_tensor(input) or not input.is_floating_point():
        got = input.dtype if torch.is_tensor(input) else type(input).__name__
        raise ValueError(f"{who}: input must be a floating point tensor, got {got}")
    if image and input.dim() != 4:
        raise ValueError(f"{who}: input must be a batch of images N x C x H x W, "
                         f"got shape {tuple(input.shape)}")


def least_confident_labels(logits):
    """The label the model believes least, per sample: argmin of the logits
    (the same as argmin of the softmax, which is monotone)."""
    return logits.argmin(dim=1)


class PGDAttack:
    """
    Attack a network by Projected Gradient Descent. The attacker performs
    k steps of gradient descent of step size a, while always staying
    within the range of epsilon (under l infinity norm) from the input image.

    Args:
      loss_fn: loss function used for the attack
      num_steps: (int) number of steps for PGD
      step_size: (float) step size of PGD (i.e., alpha in our lecture)
      epsilon: (float) the range of acceptable samples
               for our normalization, 0.1 ~ 6 pixel levels
               (epsilon and step_size are in normalized units, see Part III)
    """

    def __init__(self, loss_fn, num_steps=10, step_size=0.01, epsilon=0.1):
        if isinstance(num_steps, bool) or not float(num_steps).is_integer() or num_steps < 0:
            raise ValueError(f"PGD num_steps must be an integer >= 0, got {num_steps!r}")
        if not epsilon >= 0:  # "not >=" also rejects NaN
            raise ValueError(f"PGD epsilon must be >= 0, got {epsilon!r}")
        if not step_size >= 0:
            raise ValueError(f"PGD step_size must be >= 0, got {step_size!r}")
        self.loss_fn = loss_fn
        self.num_steps = int(num_steps)
        self.step_size = step_size
        self.epsilon = epsilon

    # The three choices that make this the handout's attack, *targeted at the
    # least confident label*; UntargetedPGDAttack below overrides them.
    # -1: walk *down* the loss of the chosen label, i.e. make the model believe
    # it. (Walking up, +1, is a sign error seen in student reports: it pushes
    # the image away from a label the model already rejects, and barely hurts.)
    loss_direction = -1.0

    def choose_labels(self, clean_logits):
        return least_confident_labels(clean_logits)

    def start_point(self, input, lower, upper):
        # the handout's PGD starts from the clean image (deterministic)
        return input.clone()

    def perturb(self, model, input):
        """
        Given input image X (torch tensor), return an adversarial sample
        (torch tensor) using PGD of the least confident label.

        Args:
          model: (nn.module) network to attack
          input: (torch tensor) input image of size N * C * H * W

        Outputs:
          output: (torch tensor) an adversarial sample of the given network
        """
        _check_float_batch(input, "PGDAttack.perturb")
        # the centre of the epsilon-ball is the ORIGINAL image, for every step
        # (not the previous iterate: projecting around that lets the image drift
        # by epsilon per step). detach(): we never write into, nor backprop into,
        # the caller's tensor or graph.
        x_orig = input.detach()
        # enable_grad: the caller may be inside torch.no_grad() (a validation loop)
        with _EvalMode(model), torch.enable_grad():
            # the target label is chosen ONCE, from the clean prediction; picking
            # it again at every step chases a moving target (the least likely
            # label changes as the image moves) and the steps stop adding up
            with torch.no_grad():
                labels = self.choose_labels(model(x_orig))
            lower, upper = feasible_box(x_orig, self.epsilon)
            x_adv = self.start_point(x_orig, lower, upper)
            for _ in range(self.num_steps):
                x_adv = self._step(model, x_adv, lower, upper, labels)
        # x_adv was produced under no_grad: it has no graph and needs no grad
        return x_adv

    def _step(self, model, x_adv, lower, upper, labels):
        """One step of the fast gradient sign method, then the projection onto the
        box [lower, upper] (see feasible_box)."""
        # a fresh leaf per step: this step's graph starts here and is freed by
        # autograd.grad below, so memory does not grow with num_steps
        x = x_adv.detach().requires_grad_(True)
        loss = self.loss_fn(model(x), labels)
        if loss.dim() > 0:  # a loss_fn with reduction='none'
            loss = loss.sum()
        # gradient w.r.t. the image only: autograd.grad returns it instead of
        # accumulating .grad, so no parameter's .grad is written (the caller's
        # optimizer state is untouched) and the weight gradients, which we do
        # not need, are not even computed
        grad, = torch.autograd.grad(loss, x)
        with torch.no_grad():
            # L-inf steepest step: every pixel moves by step_size (unless its
            # gradient is exactly 0), down the loss (up in UntargetedPGDAttack)
            x = x + self.loss_direction * self.step_size * grad.sign()
            # projection onto the L-inf ball (each pixel within [original - epsilon,
            # original + epsilon]) and the valid pixel range: both are boxes, so
            # clipping to their intersection is the exact projection
            x = torch.max(torch.min(x, upper), lower)
        return x


default_attack = PGDAttack


class UntargetedPGDAttack(PGDAttack):
    """PGD that walks *up* the loss of the model's own clean prediction, from a
    random start in the epsilon-ball (Madry et al. 2018). Meant for
    adversarial training (main.py --adv-train), not for the handout's evaluation.

    Why this and not the least-confident targeted attack for training: the
    defender must cover every direction the adversary could take, and the
    untargeted attack looks for any wrong decision inside the ball, not only
    the least likely label; the random start avoids training a model whose
    gradient is merely masked at the clean point. The model's prediction
    stands in for the true label so perturb() keeps the handout's
    (model, input) signature and the label does not "leak" into the sample
    (Kurakin et al. 2017); on training images they mostly agree anyway.

    step_size=None picks Madry's rule 2.5 * epsilon / num_steps, so that even
    a few steps (--adv-steps 5) can reach the boundary of the ball (the
    handout's default 0.01 x 5 steps = 0.05 could never reach epsilon = 0.1).
    """

    loss_direction = +1.0       # walk *up* the loss of the predicted label

    def __init__(self, loss_fn, num_steps=5, step_size=None, epsilon=0.1):
        if step_size is None:
            step_size = 2.5 * epsilon / num_steps if num_steps > 0 else 0.0
        super(UntargetedPGDAttack, self).__init__(loss_fn, num_steps, step_size, epsilon)

    def choose_labels(self, clean_logits):
        return clean_logits.argmax(dim=1)

    def start_point(self, input, lower, upper):
        noise = torch.empty_like(input).uniform_(-self.epsilon, self.epsilon)
        return torch.max(torch.min(input + noise, upper), lower)


def adversarial_training_batch(model, attacker, input, ratio=0.5):
    """
    The input batch for one step of adversarial training: the first
    round(ratio * N) images (rounded half up) are replaced by adversarial samples
    of the current model, the rest stay clean (Goodfellow et al. 2015 mix clean
    and adversarial samples, which keeps clean accuracy up). Labels are
    unchanged: the caller keeps using the batch's labels.

    The samples are crafted by attacker.perturb, which runs the model in eval
    mode (BatchNorm's running statistics are not polluted by the attack's
    forward passes) and restores its train mode; the caller then takes the
    training step on the mixed batch in train mode.

    Args:
      model: (nn.Module) the network being trained (usually in train mode)
      attacker: an object with perturb(model, input), e.g. UntargetedPGDAttack
      input: (torch tensor) training images N * C * H * W
      ratio: (float in [0, 1]) fraction of the batch made adversarial

    Outputs:
      a new tensor of the input's shape (the input itself when no sample is replaced)
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError("adversarial ratio must be in [0, 1], got {!r}".format(ratio))
    num_adv = int(math.floor(ratio * input.size(0) + 0.5))
    if num_adv == 0:
        return input
    adv = attacker.perturb(model, input[:num_adv])
    return torch.cat([adv, input[num_adv:].detach()], dim=0)


class GradAttention:
    """
    Saliency maps (Simonyan et al. 2014, https://arxiv.org/abs/1312.6034):
    how much each pixel can change the predicted class's score.

    Args:
      loss_fn: kept for the assignment's interface; not used, because the
               saliency is the gradient of the class *score* as in the paper
               (the loss of a confidently predicted label is flat, so its
               gradient is scaled by 1 - p and mixes in the other classes)
    """

    def __init__(self, loss_fn=None):
        self.loss_fn = loss_fn

    def explain(self, model, input):
        """
        Given input image X (torch tensor), return a saliency map: the
        gradient of the predicted class's score w.r.t. the input, absolute
        value, max over channels, divided by its maximum per image.

        Args:
          model: (nn.module) network to explain
          input: (torch tensor) input image of size N * C * H * W

        Outputs:
          output: (torch tensor) saliency maps in [0, 1] of size N * 1 * H * W
        """
        _check_float_batch(input, "GradAttention.explain", image=True)
        with _EvalMode(model), torch.enable_grad():
            # a fresh leaf: the caller's tensor is neither modified nor given a .grad
            x = input.detach().clone().requires_grad_(True)
            scores = model(x)
            predicted = scores.argmax(dim=1, keepdim=True)
            # summing over the batch gives every image its own gradient in one
            # backward pass: in eval mode image i's score depends on image i only.
            # autograd.grad: no parameter .grad is written, the graph is freed.
            grad, = torch.autograd.grad(scores.gather(1, predicted).sum(), x)
        saliency = grad.abs().amax(dim=1, keepdim=True)
        peak = saliency.flatten(1).amax(dim=1).clamp_min(torch.finfo(saliency.dtype).tiny)
        return saliency / peak.view(-1, 1, 1, 1)


default_attention = GradAttention


def vis_grid(input, n_rows=10):
    """
    Given a batch of images X (torch tensor), compose a mosaic for visualization.

    Args:
      input: (torch tensor) input image of size N * C * H * W
      n_rows: (int) number of images per row

    Outputs:
      output: (torch tensor) visualizations of size 3 * HH * WW
    """
    # concat all images into a big picture
    output_imgs = make_grid(input.detach().cpu(), nrow=n_rows, normalize=True)
    return output_imgs


default_visfunction = vis_grid


def _minmax_per_image(images):
    """Rescale each image of a batch to [0, 1] (flat images become 0)."""
    flat = images.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    span = (flat.amax(dim=1).view(-1, 1, 1, 1) - low).clamp_min(1e-12)
    return (images - low) / span


def vis_saliency(input, saliency, n_rows=10, alpha=0.5, cmap='inferno'):
    """
    Overlay saliency heat maps on their images and compose a mosaic.

    Args:
      input: (torch tensor) images N * C * H * W (normalized; each is min-max rescaled)
      saliency: (torch tensor) maps N * 1 * H * W in [0, 1] (GradAttention.explain)
      n_rows: (int) number of images per row
      alpha: (float) weight of the heat map in the blend
      cmap: (str) matplotlib colormap of the heat map

    Outputs:
      output: (torch tensor) visualizations of size 3 * HH * WW, values in [0, 1]
    """
    from matplotlib import colormaps  # imported here: only visualization needs it
    if input.dim() != 4 or saliency.dim() != 4 or saliency.size(1) != 1 \
            or input.shape[0] != saliency.shape[0] or input.shape[2:] != saliency.shape[2:]:
        raise ValueError(f"vis_saliency: need images N x C x H x W and maps N x 1 x H x W, "
                         f"got {tuple(input.shape)} and {tuple(saliency.shape)}")
    images = _minmax_per_image(input.detach().cpu().float())
    if images.size(1) == 1:
        images = images.expand(-1, 3, -1, -1)
    maps = saliency.detach().cpu().float().clamp(0, 1)[:, 0]
    heat = torch.from_numpy(colormaps[cmap](maps.numpy())[..., :3]).permute(0, 3, 1, 2).float()
    blend = (1.0 - alpha) * images + alpha * heat
    return make_grid(blend, nrow=n_rows)


def vis_perturbation(adv, input, n_rows=10, epsilon=None):
    """
    Amplified perturbation (adv - input) for TensorBoard: -epsilon maps to 0,
    no change to 0.5 (grey), +epsilon to 1, per channel.

    Args:
      adv: (torch tensor) adversarial samples N * C * H * W
      input: (torch tensor) the original images N * C * H * W
      n_rows: (int) number of images per row
      epsilon: (float) the attack's bound; None uses the largest change seen

    Outputs:
      output: (torch tensor) visualizations of size 3 * HH * WW, values in [0, 1]
    """
    if adv.shape != input.shape:
        raise ValueError(f"vis_perturbation: adv and input shapes differ: "
                         f"{tuple(adv.shape)} vs {tuple(input.shape)}")
    delta = (adv.detach() - input.detach()).cpu().float()
    scale = float(epsilon) if epsilon else float(delta.abs().max())
    scale = scale if scale > 0 else 1.0
    return make_grid((0.5 + 0.5 * delta / scale).clamp(0, 1), nrow=n_rows)
