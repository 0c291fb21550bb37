"""Building the models and their optimizers: the --arch names, the convolution swap for
--use-custom-conv, torchvision's ResNet-18 with ImageNet weights, SGD or AdamW.

main.py builds every model through build_model(); -e and -a load a checkpoint into the
same model through load_model_state().
"""
import os

import torch
import torch.nn as nn

from student_code import cnn_models, vit_models, CustomConv2d
from utils import CheckpointError

# Every model main.py builds, by --arch name -> family. 'cnn' models train with SGD,
# 'vit' models with AdamW and gradient clipping. To add a model: write its class in
# student_code.py and add one line to cnn_models (or vit_models) there.
ARCHS = {**{name: 'cnn' for name in cnn_models},
         **{name: 'vit' for name in vit_models},
         'resnet18': 'cnn'}


def swap_convolutions(model, conv_op):
    """Replace every nn.Conv2d of a model by conv_op (e.g. CustomConv2d), same weights."""
    if conv_op is nn.Conv2d:
        return model
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d):
            new = conv_op(child.in_channels, child.out_channels, child.kernel_size[0],
                          stride=child.stride[0], padding=child.padding[0],
                          bias=child.bias is not None)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            swap_convolutions(child, conv_op)
    return model


def build_resnet18(num_classes, weights_path=None, pretrained=True):
    """torchvision's ResNet-18 with ImageNet weights, classifier replaced."""
    from torchvision.models import resnet18, ResNet18_Weights
    weights = ResNet18_Weights.IMAGENET1K_V1
    if not pretrained:  # the weights come from our own checkpoint
        model = resnet18(weights=None)
    elif weights_path:
        model = resnet18(weights=None)
        try:
            state = torch.load(weights_path, map_location='cpu', weights_only=True)
            model.load_state_dict(state)
        except FileNotFoundError:
            raise CheckpointError(f"--pretrained-weights: no file '{weights_path}'")
        except Exception as exc:
            raise CheckpointError(f"--pretrained-weights '{weights_path}' is not a ResNet-18 "
                                  f"state dict: {str(exc).strip().splitlines()[0][:200]}")
    else:
        try:
            model = resnet18(weights=weights)
        except Exception as exc:  # URLError, SSL errors, proxy errors ...
            cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(weights.url))
            raise CheckpointError(
                f"cannot download the ImageNet weights of ResNet-18 ({type(exc).__name__}): "
                f"put {os.path.basename(weights.url)} from {weights.url} at {cached}, "
                f"or pass --pretrained-weights PATH")
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def build_model(args, from_checkpoint=False):
    conv_op = CustomConv2d if args.use_custom_conv else nn.Conv2d
    if args.arch == 'resnet18':
        model = build_resnet18(args.num_classes, args.pretrained_weights,
                               pretrained=not from_checkpoint)
        return swap_convolutions(model, conv_op)
    if ARCHS[args.arch] == 'vit':
        return vit_models[args.arch](num_classes=args.num_classes)
    return cnn_models[args.arch](conv_op=conv_op, num_classes=args.num_classes)


def to_device(model, args, device):
    """The model on the device, NHWC with --channels-last (only then: an fp32 run without
    it keeps the exact tensors it had before the flag existed)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def build_optimizer(model, args):
    """SGD for CNNs; AdamW for the ViT, without weight decay on norms, biases and
    position embeddings (decaying them only hurts, cf. the ViT/DeiT recipes)."""
    if ARCHS[args.arch] != 'vit':
        return torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or 'pos_embed' in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{'params': decay, 'weight_decay': args.weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr)


def load_model_state(model, state_dict, path, arch, names_its_model=True):
    """Load weights into the model main.py built for `arch`, or one line saying why they do
    not fit; names_its_model False (bare weights): the model was only a guess, and the
    line says how to name it."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        detail = ' '.join(line.strip() for line in first[:3])[:300]
        guess = '' if names_its_model else (
            f"; the file does not name its model, so {arch} was tried: say which it is with "
            f"--arch ({', '.join(sorted(ARCHS))})")
        raise CheckpointError(f"'{path}' does not fit the model ({arch}){guess}: {detail}")


def check_arch(arch, path):
    """A checkpoint's architecture must be one main.py can build."""
    if arch not in ARCHS:
        raise CheckpointError(f"'{path}' holds an unknown architecture '{arch}' "
                              f"(known: {', '.join(sorted(ARCHS))})")
