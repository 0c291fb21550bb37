"""Train, evaluate and attack scene classifiers on MiniPlaces (the assignment's driver).

    cd code && python main.py ../data --epochs=60                  # default CNN
    python main.py ../data --epochs=10 --use-custom-conv           # your convolution
    python main.py ../data --epochs=90 --wd 0.05 --lr 0.01 --use-vit
    python main.py ../data --epochs=60 --use-resnet18              # ImageNet fine-tune
    python main.py ../data --resume=../logs/exp_.../models/model_best.pth.tar -e [-v]
    python main.py ../data --resume=../logs/exp_.../models/model_best.pth.tar -a [-v]
    python main.py ../data --resume=../logs/exp_.../models/checkpoint.pth.tar   # continue
    torchrun --standalone --nproc_per_node 4 main.py ../data --epochs=60 -b 256   # 4 GPUs

Every run writes logs/exp_<timestamp>[_<name>]/ with TensorBoard events,
summary.json and models/{checkpoint,model_best}.pth.tar (run_record.py).

How a training run keeps its files consistent, whenever it is killed:
checkpoint.pth.tar is the commit point of an epoch. It holds everything
(weights, optimizer, schedule, the epoch history, the best model's weights), and
is written first, atomically; model_best.pth.tar and summary.json are derived
from it, written after it, and rewritten from it when the run is resumed.
"""
import argparse
import contextlib
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any directory
import student_code  # noqa: E402
from student_code import (cnn_models, vit_models, default_cnn_model, default_vit_model,  # noqa
                          get_train_transforms, get_val_transforms, CustomConv2d)
from custom_dataloader import MiniPlacesLoader, DatasetError, load_image, seed_worker  # noqa
import distributed  # noqa: E402
import fast_data  # noqa: E402
import run_record as rr  # noqa: E402
from distributed import world, is_main  # noqa: E402
from speed import (auto_speed_settings, resolve_speed_settings,  # noqa: E402,F401
                   speed_line, autocast, memory_format, eager, forward_fn)
from utils import (AverageMeter, ProgressMeter, accuracy, build_lr_scheduler,  # noqa: E402
                   warmup_cosine_factor, select_device, reset_peak_memory, peak_memory_mb,
                   make_run_dir, save_checkpoint, save_best_model, load_checkpoint,
                   run_dir_of_checkpoint, write_json_atomic, remove_temp_files, run_lock,
                   summary_lock, first_non_finite, one_line,
                   format_seconds, CHECKPOINT, BEST, ToolkitError, UsageError,
                   CheckpointError, DivergedError)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every model main.py builds, by --arch name -> family. 'cnn' models train with SGD,
# 'vit' models with AdamW and gradient clipping. To add a model: write its class in
# student_code.py and add one line to cnn_models (or vit_models) there.
ARCHS = {**{name: 'cnn' for name in cnn_models},
         **{name: 'vit' for name in vit_models},
         'resnet18': 'cnn'}

# the flags that define a training run: --resume takes them from the checkpoint
PLAN = ('epochs', 'warmup', 'batch_size', 'lr', 'weight_decay', 'momentum', 'arch',
        'num_classes', 'seed', 'clip_grad', 'adv_train', 'adv_steps', 'adv_eps', 'adv_ratio',
        'amp', 'channels_last', 'data_cache')
# the speed flags that change the numbers (PLAN above), and their value for a checkpoint
# written before they existed: fp32, contiguous, per-image (what that code did)
SPEED_PLAN = {'amp': False, 'channels_last': False, 'data_cache': False}

# the arg parser: the handout's flags, names and defaults, then ours
parser = argparse.ArgumentParser(description='PyTorch Image Classification (MiniPlaces)')
parser.add_argument('data_folder', metavar='DIR', help='path to dataset')
parser.add_argument('-j', '--workers', default=4, type=int, metavar='N',
                    help='number of data loading workers (default: 4)')
parser.add_argument('--epochs', default=90, type=int, metavar='N',
                    help='number of total epochs to run (default: 90)')
parser.add_argument('--warmup', default=5, type=int, metavar='N',
                    help='number of epochs of linear lr warmup (default: 5)')
parser.add_argument('--clip-grad', default=1.0, type=float, metavar='NORM',
                    help='gradient norm clipping: on for the ViT by default, for CNNs '
                         'when given; 0 disables (default: 1.0)')
parser.add_argument('--start-epoch', default=0, type=int, metavar='N',
                    help='manual epoch number (useful on restarts; --resume sets it)')
parser.add_argument('-b', '--batch-size', default=256, type=int, metavar='N',
                    help='mini-batch size (default: 256)')
parser.add_argument('--lr', '--learning-rate', default=0.1, type=float, metavar='LR',
                    help='initial learning rate (default: 0.1)')
parser.add_argument('--momentum', default=0.9, type=float, metavar='M',
                    help='momentum of SGD (default: 0.9)')
parser.add_argument('--wd', '--weight-decay', default=1e-4, type=float, metavar='W',
                    dest='weight_decay', help='weight decay (default: 1e-4)')
parser.add_argument('-p', '--print-freq', default=10, type=int, metavar='N',
                    help='print frequency in iterations (default: 10)')
parser.add_argument('--resume', default='', type=str, metavar='PATH',
                    help='path to a checkpoint: continue its run (or evaluate it with -e/-a)')
parser.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                    help='evaluate the --resume model on the validation set')
parser.add_argument('-a', '--attack', dest='attack', action='store_true',
                    help='attack the --resume model with adversarial samples')
parser.add_argument('-v', '--vis', dest='vis', action='store_true',
                    help='log images to TensorBoard (saliency with -e, adversarial with -a)')
parser.add_argument('--use-custom-conv', action='store_true',
                    help='use our own convolution (student_code.CustomConv2d)')
parser.add_argument('--use-vit', action='store_true',
                    help='use the vision Transformer (= --arch of default_vit_model)')
parser.add_argument('--use-resnet18', action='store_true',
                    help='fine-tune torchvision ResNet-18 pre-trained on ImageNet '
                         '(= --arch resnet18)')
parser.add_argument('--gpu', default=0, type=int, help='GPU id to use, -1 for the CPU')
parser.add_argument('--use-mps', action='store_true', help='use Apple MPS')
# additions of this toolkit
parser.add_argument('--device', default='auto',
                    help='auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps')
parser.add_argument('--seed', default=None, type=int,
                    help='random seed (default: drawn at random and recorded)')
parser.add_argument('--log-dir', default=os.path.join(REPO_ROOT, 'logs'), metavar='DIR',
                    help='where run folders go (default: logs/ at the repository root)')
parser.add_argument('--name', default=None, help='suffix of the run folder name')
parser.add_argument('--arch', default=None, choices=sorted(ARCHS), metavar='NAME',
                    help='the model: ' + ', '.join(sorted(ARCHS)) +
                         ' (default: student_code.default_cnn_model)')
parser.add_argument('--num-classes', default=None, type=int,
                    help="number of classes (default: largest label + 1 in the label files, "
                         "or the checkpoint's)")
parser.add_argument('--pretrained-weights', default=None, metavar='PATH',
                    help='local ResNet-18 state dict for --use-resnet18 (no download)')
parser.add_argument('--stop-after', default=None, type=int, metavar='N',
                    help='stop after N epochs of this invocation (resume later)')
parser.add_argument('--attack-steps', default=None, type=int, help='PGD steps for -a')
parser.add_argument('--attack-step-size', default=None, type=float, help='PGD step size for -a')
parser.add_argument('--attack-eps', default=None, type=float, help='PGD epsilon for -a')
parser.add_argument('--adv-train', action='store_true',
                    help='adversarial training: mix PGD samples into each batch (CNNs)')
parser.add_argument('--adv-steps', default=5, type=int, help='PGD steps for --adv-train')
parser.add_argument('--adv-eps', default=0.1, type=float, help='PGD epsilon for --adv-train')
parser.add_argument('--adv-ratio', default=0.5, type=float,
                    help='fraction of each batch replaced by adversarial samples')
# speed (README "Training fast"): None = auto, resolved per device by resolve_speed_settings
parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                    help='mixed precision (torch.autocast): bf16 where the device has it, else '
                         'fp16 with a GradScaler (default: auto, per device)')
parser.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                    help='NHWC memory format for model and batches (default: auto)')
parser.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                    help='torch.compile the model for training; falls back to eager, saying '
                         'so, where it cannot (default: auto)')
parser.add_argument('--data-cache', action=argparse.BooleanOptionalAction, default=None,
                    help='decode the images once into DIR/cache/ and augment with one fused '
                         'warp (fast_data.py) (default: auto)')
# several processes (torchrun, distributed.py): -b stays the global batch
parser.add_argument('--dist-backend', default='auto', choices=('auto', 'nccl', 'gloo'),
                    help='under torchrun: nccl on GPUs, gloo on the CPU (default: auto)')
parser.add_argument('--sync-bn', action='store_true',
                    help='under torchrun: BatchNorm statistics over the global batch (for '
                         'small per-GPU batches; CUDA only)')


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run; the message says where its checkpoint is."""


################################################################################
# Flags
################################################################################
_NOT_GIVEN = object()


def given_flags(argv, args):
    """The dests of the flags written on the command line (not left at their default):
    argparse fills in a default only where the namespace has no value yet."""
    probe = argparse.Namespace(**{dest: _NOT_GIVEN for dest in vars(args)})
    parser.parse_args(argv, namespace=probe)
    return {dest for dest, value in vars(probe).items() if value is not _NOT_GIVEN}


def registry_name(builder, models, which):
    for name, model in models.items():
        if model is builder:
            return name
    raise UsageError(f"student_code.{which} ({getattr(builder, '__name__', builder)}) is not "
                     f"registered: add a line for it to "
                     f"student_code.{'vit' if 'vit' in which else 'cnn'}_models")


def requested_arch(args):
    """The --arch name the flags ask for (None: they leave it open)."""
    if args.use_resnet18:
        return 'resnet18'
    if args.use_vit:
        return registry_name(default_vit_model, vit_models, 'default_vit_model')
    return args.arch


def check_args(args, given):
    """Reject bad flags and combinations before any work starts (one line each); the
    data folder is checked by MiniPlacesLoader, built before the model."""
    if args.evaluate and args.attack:
        raise UsageError("-e/--evaluate and -a/--attack are exclusive: run them one at a time")
    if (args.evaluate or args.attack) and not args.resume:
        raise UsageError(f"{'-e' if args.evaluate else '-a'} needs a trained model: "
                         f"add --resume=PATH/TO/model_best.pth.tar")
    if args.use_vit and args.use_resnet18:
        raise UsageError("--use-vit and --use-resnet18 are exclusive")
    wanted = requested_arch(args)
    if args.arch and wanted != args.arch:
        raise UsageError(f"--arch {args.arch} contradicts "
                         f"{'--use-vit' if args.use_vit else '--use-resnet18'}")
    if args.use_custom_conv and wanted in vit_models:
        raise UsageError("--use-custom-conv swaps the convolutions of CNNs, not of the ViT")
    if args.compile and (args.evaluate or args.attack):
        raise UsageError(f"--compile is for training: {'-e' if args.evaluate else '-a'} runs "
                         f"the model eagerly (one pass over the validation set does not repay "
                         f"the compilation)")
    if args.resume and 'start_epoch' in given:
        raise UsageError("--start-epoch cannot be combined with --resume: the checkpoint "
                         "says where the run continues")
    for flag, value, low in (('--epochs', args.epochs, 1), ('--batch-size', args.batch_size, 1),
                             ('--workers', args.workers, 0), ('--print-freq', args.print_freq, 1),
                             ('--warmup', args.warmup, 0), ('--adv-steps', args.adv_steps, 1),
                             ('--num-classes', args.num_classes, 2),
                             ('--attack-steps', args.attack_steps, 0),
                             ('--start-epoch', args.start_epoch, 0),
                             ('--stop-after', args.stop_after, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (('--attack-eps', args.attack_eps), ('--attack-step-size',
                        args.attack_step_size), ('--adv-eps', args.adv_eps),
                        ('--lr', args.lr), ('--wd', args.weight_decay),
                        ('--clip-grad', args.clip_grad)):
        if value is not None and not value >= 0:  # `not >=` also rejects NaN
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if not (args.evaluate or args.attack or args.resume) and args.warmup >= args.epochs:
        raise UsageError(f"--warmup ({args.warmup}) must be smaller than --epochs ({args.epochs})")
    if args.adv_train and not 0 < args.adv_ratio <= 1:
        raise UsageError(f"--adv-ratio must be in (0, 1], got {args.adv_ratio}")


def settle_new_run(args, given):
    """Fill in what a new training run's flags leave open: the model, its gradient
    clipping (the ViT by default, a CNN only when --clip-grad is given), the seed."""
    args.arch = requested_arch(args) or registry_name(default_cnn_model, cnn_models,
                                                      'default_cnn_model')
    if ARCHS[args.arch] != 'vit' and 'clip_grad' not in given:
        args.clip_grad = 0.0
    if args.seed is None:  # draw one, and record it so that the run can be replayed
        args.seed = random.SystemRandom().randrange(2 ** 31)


################################################################################
# Models
################################################################################
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


def load_model_state(model, state_dict, path, arch):
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        detail = ' '.join(line.strip() for line in first[:3])[:300]
        raise CheckpointError(f"'{path}' does not fit the model ({arch}): {detail}")


################################################################################
# Data
################################################################################
def seed_everything(seed):
    """Seed every generator the training touches (python, numpy, torch)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def seed_epoch(seed, epoch, train_loader):
    """The training order and every image's augmentation depend only on (seed, epoch)
    (distributed.TrainOrder); the process's own generators (dropout, PGD's random starts)
    on (seed, epoch, rank). So a resumed run replays exactly what an uninterrupted one
    does."""
    seed_everything(seed * 1000 + epoch + (1 << 40) * world().rank)
    train_loader.sampler.set_epoch(seed, epoch)


def load_datasets(args, train=True):
    """(train set or None, val set); their labels are checked by settle_num_classes."""
    val_set = MiniPlacesLoader(args.data_folder, split='val', transforms=get_val_transforms(),
                               num_classes=None)
    if not train:
        return None, val_set
    train_set = MiniPlacesLoader(args.data_folder, split='train',
                                 transforms=get_train_transforms(), num_classes=None)
    return train_set, val_set


def settle_num_classes(args, datasets, source):
    """The class count is the largest label + 1 of the label files, unless the flags
    or the checkpoint (`source`) give one: fewer outputs than labels is refused,
    more is warned about, and so are classes without a training image."""
    labels = {name: set(ds.label_list) for name, ds in datasets.items() if ds is not None}
    needed = max(max(found) for found in labels.values()) + 1
    if args.num_classes is None:
        args.num_classes = needed
        print(f'=> {needed} classes (the largest label in the label files is {needed - 1})')
    elif args.num_classes < needed:
        name = next(n for n, found in labels.items() if max(found) >= args.num_classes)
        raise UsageError(f"{source} gives {args.num_classes} classes, but {name}.txt has label "
                         f"{max(labels[name])}: the model needs at least {needed} outputs")
    elif args.num_classes > needed:
        print(f'warning: {source} gives {args.num_classes} classes but the labels use only '
              f'0..{needed - 1}: the extra outputs are never trained (and PGD targets them '
              f'as the least-confident labels)')
    if 'train' in labels:
        missing = sorted(set(range(needed)) - labels['train'])
        if missing:
            shown = ', '.join(map(str, missing[:10])) + (', ...' if len(missing) > 10 else '')
            print(f'warning: train.txt has no image of {len(missing)} of the labels '
                  f'0..{needed - 1} ({shown}): the model can never learn them')


class OnDevice(object):
    """A loader whose batches arrive on the device, ready for the model: images as
    normalized float32 batches in the run's memory format, labels beside them. uint8
    batches (what the workers hand over: a quarter of the bytes of float32) are normalized
    here as ToTensor + Normalize would have done in the worker, x / 255 then (x - mean) / std,
    in that order, so fp32 training is bit for bit what it was with the float hand-over
    (fast_data.normalize_on_device folds them into one multiply-add: last-bit differences)."""

    def __init__(self, loader, device, normalization, fmt):
        self.loader, self.device, self.fmt = loader, device, fmt
        self.mean = self.std = None
        if normalization is not None:
            mean, std = normalization
            self.mean = torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None]
            self.std = torch.tensor(std, dtype=torch.float32, device=device)[:, None, None]

    @property
    def sampler(self):  # the TrainOrder of a training loader, set by seed_epoch
        return self.loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for input, target in self.loader:
            input = input.to(self.device, non_blocking=True)
            if input.dtype == torch.uint8:
                input = input.float().div_(255.0)
                if self.mean is not None:
                    input = (input - self.mean) / self.std
            yield (input.contiguous(memory_format=self.fmt),
                   target.to(self.device, non_blocking=True))


def uint8_handover(dataset):
    """(uint8 transforms, (mean, std)) for a per-image dataset's workers, or None where its
    transforms do not end in ToTensor [+ Normalize] or a step before them yields no uint8
    image (tried on the first image, the random state put back afterwards)."""
    found = fast_data.uint8_transforms(dataset.transforms)
    if found is None:
        return None
    transforms, mean, std = found
    state = random.getstate(), np.random.get_state()
    try:
        transforms(load_image(os.path.join(dataset.img_folder, dataset.file_list[0])))
    except TypeError:
        return None
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    return transforms, (mean, std)


def cache_refusal(args, splits):
    """Why the cached path cannot be used (printed as a note), or None."""
    for split, transforms in splits.items():
        supported, reason = fast_data.fused_path_supported(transforms)
        if not supported:
            return f'get_{split}_transforms() needs the per-image path: {reason}'
    missing = [s for s in splits if not os.path.isfile(fast_data.cache_paths(args.data_folder,
                                                                              s)[0])]
    if missing and not os.access(args.data_folder, os.W_OK):
        return f'{args.data_folder} is read-only and holds no cache of {missing[0]}'
    return None


def cached_loader(args, device, split, transforms, **kw):
    """A loader of the decoded cache: on CUDA whole batches warped on the GPU (DeviceLoader,
    the cache in GPU memory), elsewhere DataLoader workers warping uint8 with OpenCV."""
    # several processes: rank 0 builds a missing cache, the others then read it
    cache = distributed.rank0_first(lambda: fast_data.load_or_build_cache(
        args.data_folder, split, workers=args.workers))
    if device.type == 'cuda':
        try:
            loader = fast_data.DeviceLoader(cache, transforms, device, **kw)
            return OnDevice(loader, device, None, memory_format(args))
        except ToolkitError as exc:  # no room for it in GPU memory
            print(f'note: {one_line(exc)}; the {split} cache stays in host memory')
    dataset = fast_data.CachedDataset(cache, transforms)
    loader = DataLoader(dataset, num_workers=args.workers, pin_memory=device.type == 'cuda',
                        worker_init_fn=seed_worker, **kw)
    return OnDevice(loader, device, dataset.normalization, memory_format(args))


def per_image_loader(args, device, dataset, **kw):
    handover = uint8_handover(dataset)
    if handover is not None:
        dataset.transforms = handover[0]
    if isinstance(kw['sampler'], distributed.TrainOrder):  # (index, seed) pairs
        dataset = distributed.SeededSamples(dataset)
    loader = DataLoader(dataset, num_workers=args.workers, pin_memory=device.type == 'cuda',
                        worker_init_fn=seed_worker, **kw)
    return OnDevice(loader, device, handover and handover[1], memory_format(args))


def build_loaders(args, device, train_set, val_set):
    """(train loader or None, val loader), both yielding this process's batches on the
    device: the cached path (fast_data) with --data-cache where the transforms allow it,
    else the per-image path. The training order is a TrainOrder (set each epoch by
    seed_epoch), validation this process's share of the images (distributed.py)."""
    if train_set is not None and args.batch_size > len(train_set):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the training set "
                         f"({len(train_set)} images): every batch would be dropped")
    splits = {'val': get_val_transforms()}
    if train_set is not None:
        splits['train'] = get_train_transforms()
    if args.data_cache:
        refusal = cache_refusal(args, splits)
        if refusal is not None:
            print(f'note: --data-cache: {refusal}; using the per-image path')
            args.data_cache = False  # what the run really did, for its summary
    val_kw = dict(batch_size=100, sampler=distributed.val_share(len(val_set)))
    if train_set is not None:
        order = distributed.TrainOrder(len(train_set), args.batch_size)
        train_kw = dict(batch_size=order.share, sampler=order)
    if args.data_cache:
        val_loader = cached_loader(args, device, 'val', splits['val'], **val_kw)
        train_loader = None if train_set is None else \
            cached_loader(args, device, 'train', splits['train'], **train_kw)
    else:
        val_loader = per_image_loader(args, device, val_set, **val_kw)
        train_loader = None if train_set is None else \
            per_image_loader(args, device, train_set, **train_kw)
    return train_loader, val_loader


################################################################################
# Train and validate
################################################################################
def train_one_epoch(train_loader, model, criterion, optimizer, scheduler, epoch, args,
                    device, writer, adv_attacker=None, scaler=None):
    """One epoch (0-based `epoch`); returns the epoch's figures. A non-finite loss
    stops it at once (DivergedError), before the step that would spread it. `model` may
    be a CompiledOrEager; `scaler` is the fp16 GradScaler (None: bf16 or fp32)."""
    batch_time, data_time = AverageMeter('Time', ':.3f'), AverageMeter('Data', ':.3f')
    losses, top1, top5 = (AverageMeter('Loss', ':.4f'), AverageMeter('Acc@1', ':.2f'),
                          AverageMeter('Acc@5', ':.2f'))
    n_iters = len(train_loader)
    progress = ProgressMeter(n_iters, [batch_time, data_time, losses, top1, top5],
                             prefix=f'Epoch: [{epoch + 1}]')
    reset_peak_memory(device)
    model.train()
    bar = tqdm(train_loader, total=n_iters, leave=False, dynamic_ncols=True,
               disable=not sys.stdout.isatty(), desc=f'Epoch {epoch + 1}/{args.epochs}')
    start = end = time.time()
    for i, (input, target) in enumerate(bar):  # on the device already (OnDevice)
        data_time.update(time.time() - end)
        with autocast(args, device):
            if adv_attacker is not None:
                # the eager model: the attack's eval/train switches would recompile a
                # compiled one at every step; the input gradient stays float32 (a leaf)
                input = student_code.adversarial_training_batch(eager(model), adv_attacker,
                                                                input, args.adv_ratio)
            output = model(input)
            loss = criterion(output, target)
        # an fp16 forward that overflows shows up here too; the steps a GradScaler skips
        # for inf gradients are normal and never reach this check. Several processes
        # check the mean of their losses, so that all of them stop at the same step.
        loss_value = loss.item()
        mean_loss = distributed.mean_over_processes(loss_value)
        if not math.isfinite(mean_loss):
            raise DivergedError(
                f"training diverged: the loss is {mean_loss} at epoch {epoch + 1}, iteration "
                f"{i + 1}/{n_iters}; try a lower --lr (now {args.lr:g}), a longer --warmup "
                f"(now {args.warmup}) or --clip-grad 1.0; the checkpoint of the last finished "
                f"epoch is intact")
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:  # fp32 and bf16: the plain step
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(eager(model).parameters(), args.clip_grad)
            optimizer.step()
        else:  # fp16: scaled loss; clip the true (unscaled) gradients
            scaler.scale(loss).backward()
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(eager(model).parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()  # per iteration: warmup + cosine

        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        losses.update(loss_value, input.size(0))
        top1.update(acc1.item(), input.size(0))
        top5.update(acc5.item(), input.size(0))
        batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i == n_iters - 1:
            iters_left = (args.epochs - epoch) * n_iters - i - 1
            line = progress.line(i, f'ETA {format_seconds(iters_left * batch_time.avg)}')
            tqdm.write(line) if not bar.disable else print(line, flush=True)
            global_iter = epoch * n_iters + i
            writer.add_scalar(rr.TAG_TRAIN_LOSS, mean_loss, global_iter)
            writer.add_scalar(rr.TAG_LR, optimizer.param_groups[0]['lr'], global_iter)

    epoch_time = time.time() - start
    distributed.reduce_meters([losses, top1, top5])  # the figures of all processes
    return {'lr': scheduler.get_last_lr()[0], 'train_loss': losses.avg,
            'train_top1': top1.avg, 'train_top5': top5.avg, 'epoch_time_s': epoch_time,
            'images_per_s': losses.count / max(epoch_time, 1e-9),
            'peak_memory_mb': peak_memory_mb(device)}


def predict_with_flip(model, input):
    """(logits of the images, logits averaged with those of their mirror images): the
    handout's test-time augmentation, a minor performance boost."""
    logits = model(input).float()  # float32 under autocast too (no-op in fp32)
    return logits, 0.5 * (logits + model(torch.flip(input, (3,))).float())


def validate(val_loader, model, criterion, args, device):
    """Test the model on the validation set; returns (top1, top5, loss). Accuracy is
    that of the flip-averaged logits (the handout's test-time augmentation); the loss
    is that of the plain logits, comparable with the training loss."""
    batch_time, losses = AverageMeter('Time', ':.3f'), AverageMeter('Loss', ':.4f')
    top1, top5 = AverageMeter('Acc@1', ':.2f'), AverageMeter('Acc@5', ':.2f')
    progress = ProgressMeter(len(val_loader), [batch_time, top1, top5], prefix='Test: ')
    model.eval()
    with torch.no_grad(), autocast(args, device):
        end = time.time()
        for i, (input, target) in enumerate(val_loader):  # on the device (OnDevice)
            logits, output = predict_with_flip(model, input)
            losses.update(criterion(logits, target).item(), input.size(0))
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            top1.update(acc1.item(), input.size(0))
            top5.update(acc5.item(), input.size(0))
            batch_time.update(time.time() - end)
            end = time.time()
            if i % args.print_freq == 0:
                print(progress.line(i), flush=True)
    distributed.reduce_meters([losses, top1, top5])  # every process saw its share
    print(f'******Acc@1 {top1.avg:.3f} Acc@5 {top5.avg:.3f}', flush=True)
    return top1.avg, top5.avg, losses.avg


def log_epoch(writer, step, stats, acc1, acc5, val_loss):
    """The epoch's scalars under the handout's tags (add_scalars puts train and val
    of one tag on one TensorBoard chart), plus loss, throughput and memory."""
    writer.add_scalars(rr.TAG_TOP1, {'train': stats['train_top1']}, step)
    writer.add_scalars(rr.TAG_TOP5, {'train': stats['train_top5']}, step)
    writer.add_scalars(rr.TAG_TOP1, {'val': acc1}, step)
    writer.add_scalars(rr.TAG_TOP5, {'val': acc5}, step)
    writer.add_scalar(rr.TAG_VAL_LOSS, val_loss, step)
    writer.add_scalar(rr.TAG_IMAGES_PER_S, stats['images_per_s'], step)
    writer.add_scalar(rr.TAG_EPOCH_TIME, stats['epoch_time_s'], step)
    writer.add_scalar(rr.TAG_PEAK_MEMORY, stats['peak_memory_mb'], step)
    writer.flush()


################################################################################
# Adversarial samples and saliency (Part III)
################################################################################
def build_attacker(criterion, args):
    """The handout's PGD with its defaults, overridden by --attack-* flags."""
    overrides = {'num_steps': args.attack_steps, 'step_size': args.attack_step_size,
                 'epsilon': args.attack_eps}
    return student_code.default_attack(criterion, **{k: v for k, v in overrides.items()
                                                     if v is not None})


class AttackMeters(object):
    """Running accuracies of one attack: clean and adversarial, with and without the
    flip test-time augmentation, the success rate and the target-hit rate."""

    KEYS = ('clean_top1', 'clean_top5', 'adv_top1', 'adv_top5',
            'clean_top1_noflip', 'clean_top5_noflip', 'adv_top1_noflip', 'adv_top5_noflip')

    def __init__(self):
        self.acc = {key: AverageMeter(key, ':.2f') for key in self.KEYS}
        self.correct = self.fooled = self.hit = 0

    def update(self, target, clean_logits, clean_flip, adv_logits, adv_flip, target_labels):
        n = target.size(0)
        for (key1, key5), logits in ((('clean_top1', 'clean_top5'), clean_flip),
                                     (('adv_top1', 'adv_top5'), adv_flip),
                                     (('clean_top1_noflip', 'clean_top5_noflip'), clean_logits),
                                     (('adv_top1_noflip', 'adv_top5_noflip'), adv_logits)):
            acc1, acc5 = accuracy(logits, target, (1, 5))
            self.acc[key1].update(acc1.item(), n)
            self.acc[key5].update(acc5.item(), n)
        correct = clean_flip.argmax(1) == target
        self.correct += correct.sum().item()
        self.fooled += (correct & (adv_flip.argmax(1) != target)).sum().item()
        self.hit += (adv_logits.argmax(1) == target_labels).sum().item()

    def reduce(self):
        """Sum the counts of all processes (each attacked its share of the images)."""
        distributed.reduce_meters(list(self.acc.values()))
        self.correct, self.fooled, self.hit = (int(x) for x in distributed.reduce_sums(
            [self.correct, self.fooled, self.hit]))

    def result(self):
        n = max(self.acc['clean_top1'].count, 1)
        result = {key: meter.avg for key, meter in self.acc.items()}
        result['success_rate'] = 100.0 * self.fooled / max(self.correct, 1)
        result['target_hit_rate'] = 100.0 * self.hit / n
        return result


def attack_validate(val_loader, model, attacker, args, device, writer):
    """Accuracy on clean and on adversarial validation images, side by side."""
    meters = AttackMeters()
    progress = ProgressMeter(len(val_loader), [meters.acc[k] for k in (
        'clean_top1', 'adv_top1', 'clean_top5', 'adv_top5')], prefix='Attack: ')
    model.eval()
    start = time.time()
    for i, (input, target) in enumerate(val_loader):  # on the device (OnDevice)
        with autocast(args, device):  # PGD's input gradient stays float32 (a leaf)
            with torch.no_grad():
                clean_logits, clean_flip = predict_with_flip(model, input)
            adv_input = attacker.perturb(model, input)
            with torch.no_grad():
                adv_logits, adv_flip = predict_with_flip(model, adv_input)
        meters.update(target, clean_logits, clean_flip, adv_logits, adv_flip,
                      student_code.least_confident_labels(clean_logits))
        if i % args.print_freq == 0:
            print(progress.line(i), flush=True)
            if args.vis:
                log_attack_images(writer, i, input, adv_input, attacker.epsilon)
    meters.reduce()
    result = dict(meters.result(), num_steps=attacker.num_steps, step_size=attacker.step_size,
                  epsilon=attacker.epsilon, time_s=time.time() - start)
    print_attack_result(result)
    return result


def log_attack_images(writer, step, input, adv_input, epsilon):
    writer.add_image('Image/Org_Image', student_code.default_visfunction(input), step)
    writer.add_image('Image/Adv_Image', student_code.default_visfunction(adv_input), step)
    writer.add_image('Image/Perturbation', student_code.vis_perturbation(
        adv_input, input, epsilon=epsilon), step)


def print_attack_result(result):
    print(f"\n{'':<22}{'clean':>10}{'adversarial':>14}")
    for label, suffix in (('with flip (handout)', ''), ('without flip', '_noflip')):
        for k in (1, 5):
            print(f"{f'Acc@{k} {label}':<22}{result[f'clean_top{k}{suffix}']:>10.2f}"
                  f"{result[f'adv_top{k}{suffix}']:>14.2f}")
    print(f"PGD: {result['num_steps']} steps of {result['step_size']} within epsilon "
          f"{result['epsilon']} (normalized units, images kept in the valid pixel range); "
          f"attack success rate {result['success_rate']:.2f}% of correctly classified "
          f"images; least-confident label reached for {result['target_hit_rate']:.2f}%")
    print(f"******Acc@1 {result['adv_top1']:.3f} Acc@5 {result['adv_top5']:.3f}", flush=True)


def log_saliency(val_loader, model, criterion, args, device, writer):
    """Saliency maps (Simonyan et al. 2014) of every print_freq-th batch to TensorBoard."""
    explainer = student_code.default_attention(criterion)
    model.eval()
    for i, (input, _) in enumerate(val_loader):
        if i % args.print_freq:  # one batch in print_freq, like the attack's images
            continue
        with autocast(args, device):  # the gradient w.r.t. the float32 input is float32
            saliency = explainer.explain(model, input)
        writer.add_image('Image/Org_Image', student_code.default_visfunction(input), i)
        writer.add_image('Image/Saliency', student_code.vis_grid(saliency), i)
        writer.add_image('Image/Saliency_Overlay', student_code.vis_saliency(input, saliency), i)
    print(f'saliency maps written to TensorBoard ({writer.log_dir})')


################################################################################
# Resuming: the checkpoint's plan, its run folder, its files made consistent
################################################################################
def adopt_checkpoint_plan(args, given, ckpt, path):
    """Resume continues the run's own plan: every PLAN flag comes from the checkpoint;
    one given on the command line with another value is refused, except a larger
    --epochs, which extends the run."""
    saved = dict(ckpt.get('args') or {}, arch=ckpt.get('arch'))
    requested = requested_arch(args)
    if requested is not None:
        args.arch = requested
        given = given | {'arch'}
    for key in PLAN:
        if saved.get(key) is None:
            continue  # an older checkpoint without it: the flag's value stands
        if key in given and getattr(args, key) != saved[key]:
            if key == 'epochs' and args.epochs > saved['epochs']:
                continue
            flag = '--' + {'weight_decay': 'wd'}.get(key, key).replace('_', '-')
            if isinstance(saved[key], bool):  # --amp / --no-amp
                raise UsageError(f"{flag.replace('--', '--no-') if saved[key] else flag}: the "
                                 f"run in '{path}' was trained with "
                                 f"{flag if saved[key] else flag.replace('--', '--no-')}; "
                                 f"resume keeps the run's plan (start a new run to change it)")
            raise UsageError(f"{flag} {getattr(args, key)} differs from the run's {saved[key]} "
                             f"in '{path}': resume keeps the run's plan (start a new run to "
                             f"change it; only --epochs can grow, to extend the run)")
        if not (key == 'epochs' and key in given):
            setattr(args, key, saved[key])
    if args.arch not in ARCHS:
        raise CheckpointError(f"'{path}' holds an unknown architecture '{args.arch}' "
                              f"(known: {', '.join(sorted(ARCHS))})")
    for key, before_flags in SPEED_PLAN.items():
        if key not in saved and getattr(args, key) is None:
            setattr(args, key, before_flags)  # trained before the flag existed
    if args.compile is None and saved.get('compile') is not None:
        args.compile = saved['compile']  # kept, but not refused: compiling is a choice of speed
    elif saved.get('compile') is not None and args.compile != saved['compile']:
        print(f"note: the run was trained {'with' if saved['compile'] else 'without'} "
              f"--compile: the compiled and the eager model differ in the last bits, so the "
              f"rest of the run will not equal an uninterrupted one exactly")
    args.name = args.name or saved.get('name')
    if saved.get('use_custom_conv') and not args.use_custom_conv:
        print('note: the checkpoint was trained with --use-custom-conv; continuing with '
              'nn.Conv2d (the weights are interchangeable)')
    return saved.get('epochs')


def refuse_unresumable(ckpt, path, planned, run_finished):
    """Training continues from checkpoint.pth.tar of an unfinished run only."""
    if ckpt.get('kind') == 'best' or os.path.basename(path) == BEST:
        raise UsageError(f"'{path}' is the best model of its run, not a point to continue "
                         f"training from: evaluate it with -e, attack it with -a, or continue "
                         f"the run from its {CHECKPOINT}")
    if run_finished:
        raise UsageError(f"the run of '{path}' finished all its {planned} epochs: evaluate it "
                         f"with -e or attack it with -a (use model_best.pth.tar), or train it "
                         f"longer with --epochs N (N > {planned})")


def at_its_end(args, ckpt, planned):
    """The checkpoint holds the run's last epoch, and --epochs does not extend it."""
    return ckpt['epoch'] >= planned and args.epochs == planned


def finished_cleanly(args, ckpt, planned):
    """The checkpoint holds the run's last epoch and its summary says so."""
    if not at_its_end(args, ckpt, planned):
        return False
    run_dir = run_dir_of_checkpoint(args.resume)
    return run_dir is not None and rr.read_summary(run_dir).get('status') == rr.FINISHED


def best_model_of(ckpt):
    """The contents of model_best.pth.tar, derived from a checkpoint."""
    weights = ckpt.get('best_state_dict') or ckpt['state_dict']
    return {'kind': 'best', 'epoch': ckpt['best_epoch'], 'arch': ckpt['arch'],
            'state_dict': weights, 'best_acc1': ckpt['best_acc1'], 'args': ckpt['args']}


def say_extension(args, planned, start_epoch, n_iters):
    if args.epochs == planned:
        return
    it = start_epoch * n_iters
    old = args.lr * warmup_cosine_factor(it, args.warmup * n_iters, planned * n_iters)
    new = args.lr * warmup_cosine_factor(it, args.warmup * n_iters, args.epochs * n_iters)
    print(f'=> extending the run from {planned} to {args.epochs} epochs: the cosine now ends '
          f'at epoch {args.epochs}, so the learning rate at epoch {start_epoch} goes from '
          f'{old:.6g} to {new:.6g} and decays from there')


def set_lr_from_schedule(optimizer, scheduler):
    """After loading a schedule, set the lr its closed form gives for the current
    iteration (it differs from the saved one when the run was extended)."""
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                      scheduler.lr_lambdas):
        group['lr'] = base_lr * factor(scheduler.last_epoch)


################################################################################
# Training run
################################################################################
def save_summary(run_dir, summary):
    if run_dir is not None:  # None: a process other than rank 0 (it writes nothing)
        rr.write_summary(run_dir, summary)


def open_run_folder(args, ckpt, lock_stack):
    """The run folder (locked), or None in processes other than rank 0. A resumed run
    continues the checkpoint's own folder; a new run, or a checkpoint copied out of its
    folder, gets a new one."""
    if not is_main():
        return None
    run_dir = run_dir_of_checkpoint(args.resume) if ckpt is not None else None
    if run_dir is None:
        run_dir = make_run_dir(args.log_dir, args.name)
    lock = lock_stack(run_lock(run_dir))
    if lock.previous_holder:
        print(f'note: took over the lock of {run_dir} from {lock.previous_holder}, which '
              f'is no longer running')
    # the summary lock too: an -e/-a of this run may be writing its summary right now
    with summary_lock(run_dir):
        removed = remove_temp_files(run_dir) + remove_temp_files(os.path.join(run_dir, 'models'))
    if removed:
        print(f'note: removed {len(removed)} temporary file(s) left by a killed run')
    return run_dir


def commit_epoch(run_dir, args, model, optimizer, scheduler, summary, record, best,
                 scaler=None):
    """Save one finished epoch: the checkpoint first (the commit point), then the
    files derived from it. `best` is {'epoch', 'acc1', 'weights'}; updated in place."""
    is_best = best['epoch'] is None or record['val_top1'] > best['acc1']
    if is_best:
        best.update(epoch=record['epoch'], acc1=record['val_top1'], weights=None)
    history = summary['epochs'] + [record]
    summary.update(epochs=history, best_epoch=best['epoch'], best_acc1=best['acc1'])
    if run_dir is None:  # a process other than rank 0: it writes nothing
        return
    ckpt = {'schema': rr.SCHEMA_VERSION, 'epoch': record['epoch'], 'arch': args.arch,
            'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(), 'best_acc1': best['acc1'],
            'best_epoch': best['epoch'], 'best_state_dict': best['weights'],
            'history': history, 'wall_time_s': summary['wall_time_s'], 'args': vars(args),
            'scaler': scaler.state_dict() if scaler is not None else None}
    save_checkpoint(ckpt, run_dir)
    if is_best:
        save_best_model(best_model_of(ckpt), run_dir)
        # kept for the checkpoints of later epochs, until a better one comes
        best['weights'] = {k: v.detach().cpu().clone() for k, v in ckpt['state_dict'].items()}
    rr.write_summary(run_dir, summary)


def train(args, given, ckpt, device, lock_stack):
    planned = None
    if ckpt is not None:
        planned = adopt_checkpoint_plan(args, given, ckpt, args.resume)
        refuse_unresumable(ckpt, args.resume, planned, finished_cleanly(args, ckpt, planned))
    else:
        settle_new_run(args, given)
    train_set, val_set = load_datasets(args)  # first: checks the data
    settle_num_classes(args, {'train': train_set, 'val': val_set},
                       'the checkpoint' if ckpt else '--num-classes')
    auto = resolve_speed_settings(args, device)
    train_loader, val_loader = build_loaders(args, device, train_set, val_set)
    print(speed_line(args, device, auto))
    seed_everything(args.seed)  # the initial weights depend on the seed only
    model = build_model(args, from_checkpoint=ckpt is not None)
    if args.sync_bn:  # same parameters and state-dict keys: -e/-a load it as it is
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = to_device(model, args, device)
    criterion = nn.CrossEntropyLoss()
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type) if args.amp_dtype == 'float16' else None
    n_iters = len(train_loader)
    scheduler = build_lr_scheduler(optimizer, args.warmup, args.epochs, n_iters,
                                   start_iter=args.start_epoch * n_iters)
    start_epoch, best = args.start_epoch, {'epoch': None, 'acc1': None, 'weights': None}
    run_dir = open_run_folder(args, ckpt, lock_stack)
    summary = rr.new_summary(run_dir, args.name, vars(args), args.arch,
                             student_code.count_params(model), device, n_iters, args.epochs)
    summary.update(world_size=world().size, dist_backend=world().backend)
    if ckpt is not None:
        start_epoch = resume_state(args, ckpt, model, optimizer, scheduler, run_dir, summary,
                                   best, planned, scaler)
        if start_epoch is None:
            return summary
        say_extension(args, planned, start_epoch, n_iters)
    processes = f' x {world().size} processes ({world().backend})' if world().size > 1 else ''
    print(f'=> run folder {run_dir} | model {args.arch} ({summary["num_params"] / 1e6:.2f}M '
          f'params) | device {device}{processes} | {len(train_set)} training images, '
          f'{n_iters} iterations/epoch')
    try:
        save_summary(run_dir, summary)
        run_epochs(args, model, criterion, optimizer, scheduler, train_loader, val_loader,
                   device, run_dir, summary, best, start_epoch, scaler)
    except DivergedError:
        summary['status'] = rr.DIVERGED
        save_summary(run_dir, summary)
        raise
    except KeyboardInterrupt:
        summary['status'] = rr.INTERRUPTED
        save_summary(run_dir, summary)
        if run_dir is None:
            raise Interrupted('interrupted')
        path = os.path.join(run_dir, 'models', CHECKPOINT)
        raise Interrupted(f'interrupted; the last finished epoch is in {path}: continue with '
                          f'--resume={path}' if os.path.isfile(path) else
                          f'interrupted before the first epoch finished ({run_dir})')
    if run_dir is not None:
        print_run_end(run_dir, summary)
    return summary


def resume_state(args, ckpt, model, optimizer, scheduler, run_dir, summary, best, planned,
                 scaler=None):
    """Restore weights, optimizer and schedule; rewrite model_best and summary.json from
    the checkpoint (they may lag behind it after a kill). Returns the epoch to start
    at, or None when the run had already finished (its files are then consistent)."""
    load_model_state(model, ckpt['state_dict'], args.resume, args.arch)
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['scheduler'])
    if scaler is not None and ckpt.get('scaler'):  # fp16: the loss scale it had reached
        scaler.load_state_dict(ckpt['scaler'])
    set_lr_from_schedule(optimizer, scheduler)
    same_folder = run_dir_of_checkpoint(args.resume) == run_dir and 'history' in ckpt
    if same_folder:
        best.update(epoch=ckpt['best_epoch'], acc1=ckpt['best_acc1'],
                    weights=ckpt.get('best_state_dict'))
        summary.update(epochs=ckpt['history'], best_epoch=best['epoch'],
                       best_acc1=best['acc1'], wall_time_s=ckpt.get('wall_time_s', 0.0))
        save_best_model(best_model_of(ckpt), run_dir)
    saved_world = (ckpt.get('args') or {}).get('world_size', 1)
    if saved_world != world().size:
        print(f'note: the run was trained by {saved_world} process(es), now by '
              f'{world().size}: the global batches are the same, but BatchNorm statistics '
              f'are per process, so the rest will not equal an uninterrupted run exactly')
    print(f"=> resumed '{args.resume}' at epoch {ckpt['epoch']} (best Acc@1 "
          f"{ckpt['best_acc1']:.2f})")
    if at_its_end(args, ckpt, planned):  # killed between its last checkpoint and summary
        summary['status'] = rr.FINISHED
        save_summary(run_dir, summary)
        print(f'=> the run had finished its {planned} epochs; its files are consistent now')
        return None
    return ckpt['epoch']


def run_epochs(args, model, criterion, optimizer, scheduler, train_loader, val_loader,
               device, run_dir, summary, best, start_epoch, scaler=None):
    writer = SummaryWriter(run_dir) if run_dir is not None else distributed.NoWriter()
    net = forward_fn(distributed.wrap(model), args, device)  # trains; `model` is saved
    # validation runs on each process's share without collectives: not through DDP
    val_net = forward_fn(model, args, device) if world().size > 1 else net
    adv_attacker = None
    if args.adv_train:
        # Madry et al.'s defence: untargeted PGD from a random start, step 2.5*eps/steps
        adv_attacker = student_code.UntargetedPGDAttack(nn.CrossEntropyLoss(),
                                                        num_steps=args.adv_steps,
                                                        epsilon=args.adv_eps)
    invocation_start, wall_before = time.time(), summary['wall_time_s']
    epochs_this_time = args.epochs - start_epoch
    if args.stop_after is not None:
        epochs_this_time = min(epochs_this_time, args.stop_after)
    for epoch in range(start_epoch, start_epoch + epochs_this_time):
        seed_epoch(args.seed, epoch, train_loader)
        stats = train_one_epoch(train_loader, net, criterion, optimizer, scheduler, epoch,
                                args, device, writer, adv_attacker, scaler)
        print(f"[Training]: Epoch {epoch + 1:d} finished with lr={stats['lr']:f} | "
              f"{stats['images_per_s']:.1f} images/s | {stats['epoch_time_s']:.1f} s | "
              f"peak memory {stats['peak_memory_mb']:.0f} MB")
        bad = first_non_finite(model.state_dict())
        if bad is not None:
            raise DivergedError(f"training diverged: '{bad}' holds NaN or inf after epoch "
                                f"{epoch + 1}; try a lower --lr (now {args.lr:g}) or "
                                f"--clip-grad 1.0; the checkpoint of the last finished "
                                f"epoch is intact")
        acc1, acc5, val_loss = validate(val_loader, val_net, criterion, args, device)
        log_epoch(writer, epoch + 1, stats, acc1, acc5, val_loss)
        record = dict(epoch=epoch + 1, val_loss=val_loss, val_top1=acc1, val_top5=acc5, **stats)
        summary['wall_time_s'] = wall_before + time.time() - invocation_start
        commit_epoch(run_dir, args, model, optimizer, scheduler, summary, record, best, scaler)
    writer.close()
    done = start_epoch + epochs_this_time
    summary['status'] = rr.FINISHED if done == args.epochs else rr.STOPPED
    summary['wall_time_s'] = wall_before + time.time() - invocation_start
    save_summary(run_dir, summary)
    if summary['status'] == rr.STOPPED and run_dir is not None:
        print(f'=> stopped after {epochs_this_time} epoch(s) as asked; continue with '
              f'--resume={os.path.join(run_dir, "models", CHECKPOINT)}')


def print_run_end(run_dir, summary):
    best = summary['best_acc1']
    print(f"=> best Acc@1 {best if best is not None else float('nan'):.2f} "
          f"(epoch {summary['best_epoch']}) | wall time {format_seconds(summary['wall_time_s'])}")
    print(f'=> run folder:  {run_dir}')
    print(f'=> checkpoints: {os.path.join(run_dir, "models")}')
    print(f'=> TensorBoard: tensorboard --logdir {run_dir}')


################################################################################
# Evaluating and attacking a trained model
################################################################################
def checkpoint_model(args, given, ckpt, device):
    """(validation loader, model) of the --resume checkpoint, its architecture and
    class count taken from it."""
    arch, requested = ckpt.get('arch'), requested_arch(args)
    if requested is not None and arch is not None and requested != arch:
        raise CheckpointError(f"'{args.resume}' holds a '{arch}' model, but the flags build "
                              f"'{requested}'")
    args.arch = arch or requested or registry_name(default_cnn_model, cnn_models,
                                                   'default_cnn_model')
    if args.arch not in ARCHS:
        raise CheckpointError(f"'{args.resume}' holds an unknown architecture '{args.arch}' "
                              f"(known: {', '.join(sorted(ARCHS))})")
    saved = ckpt.get('args') or {}
    source = '--num-classes' if 'num_classes' in given else 'the checkpoint'
    args.num_classes = args.num_classes or saved.get('num_classes')
    _, val_set = load_datasets(args, train=False)  # first: checks the data
    if args.num_classes is None:  # a foreign checkpoint: the classifier's size says it
        args.num_classes = next(v.shape[0] for v in reversed(list(ckpt['state_dict'].values()))
                                if v.ndim >= 1)
    settle_num_classes(args, {'val': val_set}, source)
    for key, before_flags in SPEED_PLAN.items():  # the run's own: its validation numbers
        if key not in given:
            setattr(args, key, saved.get(key, before_flags))
    auto = resolve_speed_settings(args, device)
    _, val_loader = build_loaders(args, device, None, val_set)
    print(speed_line(args, device, auto))
    model = build_model(args, from_checkpoint=True)
    load_model_state(model, ckpt['state_dict'], args.resume, args.arch)
    return val_loader, to_device(model, args, device)


def evaluate_or_attack(args, given, ckpt, device):
    """-e or -a: a run folder of its own; the result also goes into the summary of the
    training run the checkpoint comes from."""
    val_loader, model = checkpoint_model(args, given, ckpt, device)
    criterion = nn.CrossEntropyLoss()
    mode = 'attack' if args.attack else 'eval'
    run_dir = make_run_dir(args.log_dir, args.name or mode) if is_main() else None
    writer = SummaryWriter(run_dir) if is_main() else distributed.NoWriter()
    summary = rr.new_summary(run_dir, args.name, vars(args), args.arch,
                             student_code.count_params(model), device, 0, 0)
    summary.update(world_size=world().size, dist_backend=world().backend)
    print(f"=> {mode} of '{args.resume}' ({args.arch}) on {device}; logs in {run_dir}")
    start = time.time()
    if args.evaluate:
        key, result, summary['status'] = rr.EVALUATION, evaluate(val_loader, model, criterion,
                                                                 args, device, writer), rr.EVALUATED
    else:
        attacker = build_attacker(criterion, args)
        key, summary['status'] = rr.ATTACK, rr.ATTACKED
        result = attack_validate(val_loader, model, attacker, args, device, writer)
    writer.close()
    result = dict(checkpoint=os.path.abspath(args.resume), **result)
    summary.update({key: result, 'wall_time_s': time.time() - start})
    if not is_main():
        return summary
    write_json_atomic(rr.summary_path(run_dir), summary)
    source = run_dir_of_checkpoint(args.resume)
    if source is not None and os.path.isfile(rr.summary_path(source)):
        rr.add_result(source, key, result)
    return summary


def evaluate(val_loader, model, criterion, args, device, writer):
    top1, top5, loss = validate(val_loader, model, criterion, args, device)
    if args.vis and is_main():  # the saliency maps of rank 0's share of the images
        log_saliency(val_loader, model, criterion, args, device, writer)
    return {'top1': top1, 'top5': top5, 'loss': loss}


################################################################################
# Command line
################################################################################
# the errors that every process of a torchrun launch meets alike (the same flags, data and
# checkpoint; a divergence is checked on the mean loss): only rank 0 says them
SHARED_ERRORS = (UsageError, CheckpointError, DatasetError, DivergedError)


def sigterm_as_interrupt(signum, frame):
    """SIGTERM (what a cloud VM sends before preemption) stops a run like Ctrl-C."""
    raise KeyboardInterrupt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    given = given_flags(argv, args)
    previous_handler = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        with contextlib.ExitStack() as stack:  # holds the run folder's lock, if any
            check_args(args, given)
            ckpt = load_checkpoint(args.resume) if args.resume else None
            # under torchrun: join the other processes, one GPU each (distributed.py)
            device = distributed.start(args.device, args.dist_backend, args.sync_bn) or \
                select_device(args.device, args.gpu, args.use_mps)
            args.world_size = world().size
            if device.type == 'cuda':
                torch.backends.cudnn.benchmark = True
            if args.evaluate or args.attack:
                return evaluate_or_attack(args, given, ckpt, device)
            return train(args, given, ckpt, device, stack.enter_context)
    except ToolkitError as exc:  # ours: bad flags, data, checkpoint, run folder, divergence
        if os.environ.get('MAIN_DEBUG'):
            raise
        if distributed.launch_rank() == 0 or not isinstance(exc, SHARED_ERRORS):
            print(f'main.py: error: {one_line(exc)}', file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f'\nmain.py: {str(exc) or "interrupted"}', file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        distributed.stop()


if __name__ == '__main__':
    main()
