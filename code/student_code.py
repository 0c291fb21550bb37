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
class CustomConv2DFunction(Function):

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
        raise NotImplementedError(
            "CustomConv2DFunction.forward is not implemented yet (Part I.1)")

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
        raise NotImplementedError(
            "CustomConv2DFunction.backward is not implemented yet (Part I.1)")


custom_conv2d = CustomConv2DFunction.apply


class CustomConv2d(Module):
    """
    The same interface as torch.nn.Conv2D
    """
    def __init__(self, in_channels, out_channels, kernel_size, stride=1,
                 padding=0, dilation=1, groups=1, bias=True):
        super(CustomConv2d, self).__init__()
        assert isinstance(kernel_size, int), "We only support squared filters"
        assert isinstance(stride, int), "We only support equal stride"
        assert isinstance(padding, int), "We only support equal padding"
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding

        # not used (for compatibility)
        self.dilation = dilation
        self.groups = groups

        # register weight and bias as parameters
        self.weight = nn.Parameter(torch.Tensor(
            out_channels, in_channels, kernel_size, kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.Tensor(out_channels))
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
        s = ('{in_channels}, {out_channels}, kernel_size={kernel_size}'
             ', stride={stride}, padding={padding}')
        if self.bias is None:
            s += ', bias=False'
        return s.format(**self.__dict__)


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
    # a simple CNN for image classifcation (the handout's network, unchanged)
    def __init__(self, conv_op=nn.Conv2d, num_classes=100):
        super(SimpleNet, self).__init__()
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
        # init all params
        init_cnn_weights(self)

    def forward(self, x):
        # adversarial training is done by the training loop (main.py --adv-train),
        # which crafts samples with the model in eval mode, see Part III
        x = self.features(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        x = self.fc(x)
        return x


# the CNNs main.py can build by name (--arch NAME)
cnn_models = {
    'simplenet': SimpleNet,
}

# change this to your model!
default_cnn_model = SimpleNet


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
            qkv_bias (bool:  If True, add a learnable bias to query, key, value.
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
        super(SimpleViT, self).__init__()
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


# change this to your model!
# We keep the handout's configuration (patch 16 -> 8x8 tokens, dim 192, depth 4,
# 4 heads, 4x4 windows in blocks 0 and 2, drop path 0.1): 1.96 M parameters
# (100 classes) and 0.25 GFLOPs (0.13 G multiply-adds) per 128x128 image. It is the
# one configuration with a measured MiniPlaces result (36.6% top-1 after 90 epochs,
# 41% after 150) and it trains a few demo epochs on a 2-core CPU in minutes; larger
# variants (depth 6: +45% FLOPs; patch 8: 4x FLOPs) are left to experiments, see README.
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
    val_transforms = []
    val_transforms.append(transforms.Scale(128))
    val_transforms.append(transforms.CenterCrop(128))
    val_transforms.append(transforms.ToTensor())
    val_transforms.append(transforms.Normalize(mean=[0.485, 0.456, 0.406],
                                               std=[0.229, 0.224, 0.225]))
    val_transforms = transforms.Compose(val_transforms)
    return val_transforms


################################################################################
# Part III: Adversarial samples
################################################################################
class PGDAttack(object):
    def __init__(self, loss_fn, num_steps=10, step_size=0.01, epsilon=0.1):
        """
        Attack a network by Project Gradient Descent. The attacker performs
        k steps of gradient descent of step size a, while always staying
        within the range of epsilon (under l infinity norm) from the input image.

        Args:
          loss_fn: loss function used for the attack
          num_steps: (int) number of steps for PGD
          step_size: (float) step size of PGD (i.e., alpha in our lecture)
          epsilon: (float) the range of acceptable samples
                   for our normalization, 0.1 ~ 6 pixel levels
        """
        self.loss_fn = loss_fn
        self.num_steps = num_steps
        self.step_size = step_size
        self.epsilon = epsilon

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
        raise NotImplementedError("PGDAttack.perturb is not implemented yet (Part III)")


default_attack = PGDAttack


def vis_grid(input, n_rows=10):
    """
    Given a batch of image X (torch tensor), compose a mosaic for visualziation.

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
