"""Building blocks of the vision Transformer (the handout's helper module).

Tensors of image tokens are kept channels-last, `B x H x W x C`, as in ViTDet
("Exploring Plain Vision Transformer Backbones for Object Detection") and SAM:
a token grid stays a grid, so windows are plain slices of it.

- `PatchEmbed`: cut the image into non-overlapping patches and embed each one.
- `window_partition` / `window_unpartition`: split a token grid into local
  windows (padding to a multiple of the window) and stitch them back.
- `DropPath`: stochastic depth (drop a whole residual branch per sample).
- `MLP` (alias `Mlp`): the two-layer feed-forward network of a Transformer block.
- `trunc_normal_`: truncated normal initialisation.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """Fill `tensor` in place from N(mean, std^2) truncated to [a, b] (absolute bounds)."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class PatchEmbed(nn.Module):
    """Image to patch embedding: B x C x H x W  ->  B x H/p x W/p x embed_dim.

    A convolution whose kernel equals its stride is exactly "cut into p x p
    patches, flatten each, apply one shared linear layer", done in one call.
    """

    def __init__(self, kernel_size=(16, 16), stride=(16, 16), padding=(0, 0),
                 in_chans=3, embed_dim=768):
        """
        Args:
            kernel_size (int or tuple): patch size (kernel of the projection).
            stride (int or tuple): stride of the projection (= patch size for ViT).
            padding (int or tuple): padding of the projection (0 for ViT).
            in_chans (int): number of input image channels.
            embed_dim (int): embedding dimension of a patch token.
        """
        super().__init__()
        self.kernel_size, self.stride, self.padding = (
            _pair(kernel_size), _pair(stride), _pair(padding))
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.kernel_size,
                              stride=self.stride, padding=self.padding)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.proj.in_channels:
            raise ValueError(f"PatchEmbed expects images B x {self.proj.in_channels} x H x W, "
                             f"got shape {tuple(x.shape)}")
        for size, k, s, p, name in zip(x.shape[2:], self.kernel_size, self.stride,
                                       self.padding, ("height", "width")):
            # every pixel must belong to exactly one patch: no silently cropped border
            if (size + 2 * p - k) % s != 0 or size + 2 * p < k:
                raise ValueError(f"PatchEmbed: image {name} {size} is not divisible by the "
                                 f"patch size {k} (stride {s}, padding {p})")
        x = self.proj(x)
        # B C H W -> B H W C (channels-last token grid)
        return x.permute(0, 2, 3, 1)


def window_partition(x, window_size):
    """Split a token grid into non-overlapping windows, padding with zeros if needed.

    Args:
        x: tokens of shape B x H x W x C.
        window_size (int): window side length.
    Returns:
        windows: B * num_windows x window_size x window_size x C.
        (Hp, Wp): padded height and width (multiples of window_size).
    """
    if window_size <= 0:
        raise ValueError(f"window_partition: window_size must be positive, got {window_size}")
    if x.dim() != 4:
        raise ValueError(f"window_partition expects B x H x W x C tokens, got shape {tuple(x.shape)}")
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        # F.pad pads the last dims first: (C: 0, 0), (W: 0, pad_w), (H: 0, pad_h)
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    # bring the two window-index axes together: B, nH, nW, ws, ws, C
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(windows, window_size, pad_hw, hw):
    """Inverse of `window_partition`: stitch windows back and drop the padding.

    Args:
        windows: B * num_windows x window_size x window_size x C.
        window_size (int): window side length.
        pad_hw (tuple): padded (Hp, Wp) returned by `window_partition`.
        hw (tuple): original (H, W) before padding.
    Returns:
        x: B x H x W x C.
    """
    Hp, Wp = pad_hw
    H, W = hw
    num_windows = (Hp // window_size) * (Wp // window_size)
    if windows.shape[0] % num_windows != 0:
        raise ValueError(f"window_unpartition: {windows.shape[0]} windows do not make whole "
                         f"images of {num_windows} windows ({Hp}x{Wp}, window {window_size})")
    B = windows.shape[0] // num_windows
    x = windows.reshape(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


class DropPath(nn.Module):
    """Stochastic depth: during training, zero the whole residual branch of a sample
    with probability `drop_prob` and scale the kept ones by 1 / (1 - drop_prob), so the
    expected output is unchanged. Identity in eval mode.

    This is torchvision.ops.StochasticDepth in "row" (per-sample) mode, under the
    name the handout (and timm) use.
    """

    def __init__(self, drop_prob=0.0):
        super().__init__()
        drop_prob = 0.0 if drop_prob is None else float(drop_prob)
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"DropPath: drop_prob must be in [0, 1], got {drop_prob}")
        self.drop_prob = drop_prob
        self.stochastic_depth = StochasticDepth(drop_prob, mode="row")

    def forward(self, x):
        return self.stochastic_depth(x)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class MLP(nn.Module):
    """Feed-forward network of a Transformer block: Linear -> activation -> Linear.

    Works on the last dimension, so tokens may be B x N x C or B x H x W x C.
    """

    def __init__(self, in_features, hidden_features=None, out_features=None,
                 act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


# the handout's (and timm's) name for the same module
Mlp = MLP
