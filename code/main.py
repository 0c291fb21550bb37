"""Train, evaluate and attack scene classifiers on MiniPlaces (the assignment's driver).

    cd code && python main.py ../data --epochs=60                  # default CNN
    python main.py ../data --epochs=10 --use-custom-conv           # your convolution
    python main.py ../data --epochs=90 --wd 0.05 --lr 0.01 --use-vit
    python main.py ../data --epochs=60 --use-resnet18              # ImageNet fine-tune
    python main.py ../data --resume=../logs/exp_.../models/model_best.pth.tar -e [-v]
    python main.py ../data --resume=../logs/exp_.../models/model_best.pth.tar -a [-v]

Every run writes logs/exp_<timestamp>[_<name>]/ with TensorBoard events,
summary.json and models/{checkpoint,model_best}.pth.tar.
"""
import argparse
import os
import random
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
from student_code import (cnn_models, default_cnn_model, default_vit_model,  # noqa: E402
                          get_train_transforms, get_val_transforms, CustomConv2d)
from custom_dataloader import MiniPlacesLoader, DatasetError, seed_worker  # noqa: E402
from utils import (AverageMeter, accuracy, build_lr_scheduler, select_device,  # noqa: E402
                   reset_peak_memory, peak_memory_mb, make_run_dir, save_checkpoint,
                   load_checkpoint, run_dir_of_checkpoint, write_json_atomic, read_json,
                   format_seconds, CheckpointError)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
                    help='gradient norm clipping for the ViT, 0 to disable (default: 1.0)')
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
parser.add_argument('--use-vit', action='store_true', help='use the vision Transformer')
parser.add_argument('--use-resnet18', action='store_true',
                    help='fine-tune torchvision ResNet-18 pre-trained on ImageNet')
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
parser.add_argument('--arch', default=None, choices=sorted(cnn_models),
                    help='a CNN by name (default: student_code.default_cnn_model)')
parser.add_argument('--num-classes', default=None, type=int,
                    help='number of classes (default: 100, or the checkpoint\'s)')
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


class UsageError(ValueError):
    """A bad combination of flags."""


################################################################################
# Models
################################################################################
def vit_name():
    return getattr(default_vit_model, '__name__', 'vit').lower()


def default_cnn_name():
    for name, builder in cnn_models.items():
        if builder is default_cnn_model:
            return name
    return getattr(default_cnn_model, '__name__', 'cnn').lower()


def requested_arch(args):
    """The architecture the flags ask for, or None when they leave it open."""
    if args.use_resnet18:
        return 'resnet18'
    if args.use_vit:
        return vit_name()
    return args.arch


def adopt_arch(args, arch):
    """Set the flags so that this command builds `arch` (from a checkpoint)."""
    if arch == 'resnet18':
        args.use_resnet18 = True
    elif arch == vit_name():
        args.use_vit = True
    elif arch in cnn_models:
        args.arch = arch
    else:
        raise CheckpointError(f"the checkpoint holds an unknown architecture '{arch}' "
                              f"(known: resnet18, {vit_name()}, {', '.join(sorted(cnn_models))})")


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


def build_model(args):
    conv_op = CustomConv2d if args.use_custom_conv else nn.Conv2d
    if args.use_resnet18:
        model = build_resnet18(args.num_classes, args.pretrained_weights,
                               pretrained=not args.resume)
        return swap_convolutions(model, conv_op)
    if args.use_vit:
        return default_vit_model(num_classes=args.num_classes)
    builder = cnn_models[args.arch] if args.arch else default_cnn_model
    return builder(conv_op=conv_op, num_classes=args.num_classes)


def build_optimizer(model, args):
    """SGD for CNNs; AdamW for the ViT, without weight decay on norms, biases and
    position embeddings (decaying them only hurts, cf. the ViT/DeiT recipes)."""
    if not args.use_vit:
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


################################################################################
# Data
################################################################################
def seed_everything(seed):
    """Seed every generator the training touches (python, numpy, torch)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_loaders(args, device, train=True):
    pin = device.type == 'cuda'
    val_set = MiniPlacesLoader(args.data_folder, split='val', transforms=get_val_transforms(),
                               num_classes=args.num_classes)
    val_loader = DataLoader(val_set, batch_size=100, shuffle=False, num_workers=args.workers,
                            pin_memory=pin, worker_init_fn=seed_worker)
    if not train:
        return None, val_loader
    train_set = MiniPlacesLoader(args.data_folder, split='train',
                                 transforms=get_train_transforms(),
                                 num_classes=args.num_classes)
    if args.batch_size > len(train_set):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the training set "
                         f"({len(train_set)} images): every batch would be dropped")
    # the generator is re-seeded at the start of every epoch (see train_one_epoch):
    # shuffling and the workers' augmentation seeds then depend only on
    # (seed, epoch), so a resumed run replays exactly what an uninterrupted one does
    generator = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers, pin_memory=pin, drop_last=True,
                              worker_init_fn=seed_worker, generator=generator)
    return train_loader, val_loader


################################################################################
# Train and validate
################################################################################
def train_one_epoch(train_loader, model, criterion, optimizer, scheduler, epoch, args,
                    device, writer, adv_attacker=None):
    """One epoch (0-based `epoch`); returns a dict of the epoch's figures."""
    batch_time, data_time = AverageMeter(), AverageMeter()
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    seed = args.seed * 1000 + epoch
    seed_everything(seed)
    train_loader.generator.manual_seed(seed)
    reset_peak_memory(device)

    model.train()
    n_iters = len(train_loader)
    bar = tqdm(train_loader, total=n_iters, leave=False, dynamic_ncols=True,
               disable=not sys.stdout.isatty(), desc=f'Epoch {epoch + 1}/{args.epochs}')
    start = end = time.time()
    for i, (input, target) in enumerate(bar):
        data_time.update(time.time() - end)
        input = input.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if adv_attacker is not None:
            input = student_code.adversarial_training_batch(model, adv_attacker, input,
                                                            args.adv_ratio)

        output = model(input)
        loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.use_vit and args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        scheduler.step()  # per iteration: warmup + cosine

        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        losses.update(loss.item(), input.size(0))
        top1.update(acc1.item(), input.size(0))
        top5.update(acc5.item(), input.size(0))
        batch_time.update(time.time() - end)
        end = time.time()

        if i % args.print_freq == 0 or i == n_iters - 1:
            global_iter = epoch * n_iters + i
            iters_left = (args.epochs - epoch) * n_iters - i - 1
            line = ('Epoch: [{0}][{1}/{2}]\tTime {bt.val:.3f} ({bt.avg:.3f})\t'
                    'Data {dt.val:.3f} ({dt.avg:.3f})\tLoss {ls.val:.4f} ({ls.avg:.4f})\t'
                    'Acc@1 {t1.val:.2f} ({t1.avg:.2f})\tAcc@5 {t5.val:.2f} ({t5.avg:.2f})\t'
                    'ETA {eta}').format(epoch + 1, i, n_iters, bt=batch_time, dt=data_time,
                                        ls=losses, t1=top1, t5=top5,
                                        eta=format_seconds(iters_left * batch_time.avg))
            tqdm.write(line) if not bar.disable else print(line, flush=True)
            writer.add_scalar('data/training_loss', losses.val, global_iter)
            writer.add_scalar('data/learning_rate', optimizer.param_groups[0]['lr'], global_iter)

    epoch_time = time.time() - start
    return {'lr': scheduler.get_last_lr()[0], 'train_loss': losses.avg,
            'train_top1': top1.avg, 'train_top5': top5.avg, 'epoch_time_s': epoch_time,
            'images_per_s': losses.count / max(epoch_time, 1e-9),
            'peak_memory_mb': peak_memory_mb(device)}


def predict_with_flip(model, input):
    """(logits of the images, logits averaged with those of their mirror images): the
    handout's test-time augmentation, a minor performance boost."""
    logits = model(input)
    return logits, 0.5 * (logits + model(torch.flip(input, (3,))))


def validate(val_loader, model, criterion, args, device):
    """Test the model on the validation set, with the handout's flip test-time
    augmentation; returns (top1, top5, loss)."""
    batch_time, losses = AverageMeter(), AverageMeter()
    top1, top5 = AverageMeter(), AverageMeter()
    model.eval()
    with torch.no_grad():
        end = time.time()
        for i, (input, target) in enumerate(val_loader):
            input = input.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            logits, output = predict_with_flip(model, input)
            losses.update(criterion(logits, target).item(), input.size(0))
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            top1.update(acc1.item(), input.size(0))
            top5.update(acc5.item(), input.size(0))
            batch_time.update(time.time() - end)
            end = time.time()
            if i % args.print_freq == 0:
                print('Test: [{0}/{1}]\tTime {bt.val:.3f} ({bt.avg:.3f})\t'
                      'Acc@1 {t1.val:.2f} ({t1.avg:.2f})\tAcc@5 {t5.val:.2f} ({t5.avg:.2f})'
                      .format(i, len(val_loader), bt=batch_time, t1=top1, t5=top5), flush=True)
    print('******Acc@1 {t1.avg:.3f} Acc@5 {t5.avg:.3f}'.format(t1=top1, t5=top5), flush=True)
    return top1.avg, top5.avg, losses.avg


################################################################################
# Adversarial samples and saliency (Part III)
################################################################################
def build_attacker(criterion, args):
    """The handout's PGD with its defaults, overridden by --attack-* flags."""
    overrides = {'num_steps': args.attack_steps, 'step_size': args.attack_step_size,
                 'epsilon': args.attack_eps}
    return student_code.default_attack(criterion, **{k: v for k, v in overrides.items()
                                                     if v is not None})


def attack_validate(val_loader, model, attacker, args, device, writer):
    """Accuracy on clean and on adversarial validation images, side by side."""
    sums = dict(clean1=0.0, clean5=0.0, adv1=0.0, adv5=0.0, correct=0, fooled=0, hit=0, n=0)
    model.eval()
    start = time.time()
    for i, (input, target) in enumerate(val_loader):
        input = input.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.no_grad():
            clean_logits, clean = predict_with_flip(model, input)
        adv_input = attacker.perturb(model, input)
        with torch.no_grad():
            # always flip the adversarial samples too (the handout's evaluation)
            adv_logits, adv = predict_with_flip(model, adv_input)
        n = input.size(0)
        (c1, c5), (a1, a5) = accuracy(clean, target, (1, 5)), accuracy(adv, target, (1, 5))
        correct = clean.argmax(1) == target
        sums['clean1'] += c1.item() * n
        sums['clean5'] += c5.item() * n
        sums['adv1'] += a1.item() * n
        sums['adv5'] += a5.item() * n
        sums['correct'] += correct.sum().item()
        sums['fooled'] += (correct & (adv.argmax(1) != target)).sum().item()
        target_labels = student_code.least_confident_labels(clean_logits)
        sums['hit'] += (adv_logits.argmax(1) == target_labels).sum().item()
        sums['n'] += n
        if i % args.print_freq == 0:
            print('Attack: [{0}/{1}]\tClean Acc@1 {2:.2f}\tAdv Acc@1 {3:.2f}\t'
                  'Clean Acc@5 {4:.2f}\tAdv Acc@5 {5:.2f}'.format(
                      i, len(val_loader), sums['clean1'] / sums['n'],
                      sums['adv1'] / sums['n'], sums['clean5'] / sums['n'],
                      sums['adv5'] / sums['n']), flush=True)
            if args.vis:
                writer.add_image('Image/Org_Image', student_code.default_visfunction(input), i)
                writer.add_image('Image/Adv_Image', student_code.default_visfunction(adv_input), i)
                writer.add_image('Image/Perturbation', student_code.vis_perturbation(
                    adv_input, input, epsilon=attacker.epsilon), i)
    n = max(sums['n'], 1)
    result = {'clean_top1': sums['clean1'] / n, 'clean_top5': sums['clean5'] / n,
              'adv_top1': sums['adv1'] / n, 'adv_top5': sums['adv5'] / n,
              'success_rate': 100.0 * sums['fooled'] / max(sums['correct'], 1),
              'target_hit_rate': 100.0 * sums['hit'] / n,
              'num_steps': attacker.num_steps, 'step_size': attacker.step_size,
              'epsilon': attacker.epsilon, 'time_s': time.time() - start}
    print('\n{:<8}{:>10}{:>14}'.format('', 'clean', 'adversarial'))
    print('{:<8}{:>10.2f}{:>14.2f}'.format('Acc@1', result['clean_top1'], result['adv_top1']))
    print('{:<8}{:>10.2f}{:>14.2f}'.format('Acc@5', result['clean_top5'], result['adv_top5']))
    print('PGD: {num_steps} steps of {step_size} within epsilon {epsilon} (normalized units); '
          'attack success rate {success_rate:.2f}% of correctly classified images; '
          'least-confident label reached for {target_hit_rate:.2f}%'.format(**result))
    print('******Acc@1 {:.3f} Acc@5 {:.3f}'.format(result['adv_top1'], result['adv_top5']),
          flush=True)
    return result


def log_saliency(val_loader, model, criterion, args, device, writer):
    """Saliency maps (Simonyan et al. 2014) of every print_freq-th batch to TensorBoard."""
    explainer = student_code.default_attention(criterion)
    model.eval()
    for i, (input, _) in enumerate(val_loader):
        if i % args.print_freq:  # one batch in print_freq, like the attack's images
            continue
        input = input.to(device)
        saliency = explainer.explain(model, input)
        writer.add_image('Image/Org_Image', student_code.default_visfunction(input), i)
        writer.add_image('Image/Saliency', student_code.vis_grid(saliency), i)
        writer.add_image('Image/Saliency_Overlay', student_code.vis_saliency(input, saliency), i)
    print(f'saliency maps written to TensorBoard ({writer.log_dir})')


################################################################################
# The three modes: train, evaluate, attack
################################################################################
def check_args(args):
    """Reject bad flag combinations before any work starts (one line each); the data
    folder is checked by MiniPlacesLoader, built before the model."""
    if args.evaluate and args.attack:
        raise UsageError("-e/--evaluate and -a/--attack are exclusive: run them one at a time")
    if (args.evaluate or args.attack) and not args.resume:
        raise UsageError(f"{'-e' if args.evaluate else '-a'} needs a trained model: "
                         f"add --resume=PATH/TO/model_best.pth.tar")
    if args.use_vit and args.use_resnet18:
        raise UsageError("--use-vit and --use-resnet18 are exclusive")
    if args.arch and (args.use_vit or args.use_resnet18):
        raise UsageError("--arch chooses a CNN; it cannot be combined with --use-vit/--use-resnet18")
    if args.use_custom_conv and args.use_vit:
        raise UsageError("--use-custom-conv swaps the convolutions of CNNs, not of the ViT")
    for flag, value, low in (('--epochs', args.epochs, 1), ('--batch-size', args.batch_size, 1),
                             ('--workers', args.workers, 0), ('--print-freq', args.print_freq, 1),
                             ('--warmup', args.warmup, 0), ('--adv-steps', args.adv_steps, 1),
                             ('--num-classes', args.num_classes, 2),
                             ('--attack-steps', args.attack_steps, 0),
                             ('--stop-after', args.stop_after, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (('--attack-eps', args.attack_eps), ('--attack-step-size',
                        args.attack_step_size), ('--adv-eps', args.adv_eps),
                        ('--lr', args.lr), ('--wd', args.weight_decay)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if not (args.evaluate or args.attack) and args.warmup >= args.epochs:
        raise UsageError(f"--warmup ({args.warmup}) must be smaller than --epochs ({args.epochs})")
    if args.adv_train:
        if not 0 < args.adv_ratio <= 1:
            raise UsageError(f"--adv-ratio must be in (0, 1], got {args.adv_ratio}")


def reconcile_with_checkpoint(args, ckpt, path):
    """Take the architecture, class count and seed from the checkpoint unless the
    flags ask for them; refuse a checkpoint of another architecture."""
    held = ckpt.get('arch')
    wanted = requested_arch(args)
    if held is not None:
        if wanted is not None and wanted != held:
            raise CheckpointError(f"'{path}' holds a '{held}' model, but the flags build "
                                  f"'{wanted}'")
        if wanted is None and held != default_cnn_name():
            adopt_arch(args, held)
    saved = ckpt.get('args') or {}
    if args.num_classes is None:
        args.num_classes = saved.get('num_classes')
    if args.seed is None:
        args.seed = saved.get('seed')
    if saved.get('use_custom_conv') and not args.use_custom_conv and not (
            args.evaluate or args.attack):
        print('note: the checkpoint was trained with --use-custom-conv; continuing with '
              'nn.Conv2d (the weights are interchangeable)')


def load_model_state(model, ckpt, path):
    try:
        model.load_state_dict(ckpt['state_dict'])
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        detail = ' '.join(line.strip() for line in first[:3])[:300]
        raise CheckpointError(f"'{path}' does not fit the model ({ckpt.get('arch')}): {detail}")


def arch_of(args):
    return requested_arch(args) or default_cnn_name()


def new_summary(args, run_dir, model, device, iters_per_epoch):
    return {'run_dir': os.path.abspath(run_dir), 'name': args.name, 'status': 'running',
            'args': vars(args), 'arch': arch_of(args),
            'num_params': student_code.count_params(model), 'device': str(device),
            'iters_per_epoch': iters_per_epoch, 'epochs_planned': args.epochs, 'epochs': [],
            'best_epoch': None, 'best_acc1': None, 'wall_time_s': 0.0}


def resume(ckpt, model, optimizer, scheduler, args):
    """Restore weights, optimizer and lr schedule; continue the checkpoint's run folder
    (its curves and summary) when it is one of ours. Returns (start_epoch, best_acc1,
    run_dir or None, summary or None)."""
    load_model_state(model, ckpt, args.resume)
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['scheduler'])
    start_epoch, best_acc1 = ckpt['epoch'], ckpt['best_acc1']
    run_dir, summary = run_dir_of_checkpoint(args.resume), None
    if run_dir is not None:
        summary = read_json(os.path.join(run_dir, 'summary.json'))
        summary['epochs'] = [e for e in summary['epochs'] if e['epoch'] <= start_epoch]
        summary['args'], summary['status'] = vars(args), 'running'
    print(f"=> resumed '{args.resume}' at epoch {start_epoch} (best Acc@1 {best_acc1:.2f})")
    return start_epoch, best_acc1, run_dir, summary


def log_epoch(writer, step, stats, acc1, acc5, val_loss):
    """The epoch's scalars under the handout's tags (add_scalars puts train and val
    of one tag on one TensorBoard chart), plus loss, throughput and memory."""
    writer.add_scalars('data/top1_accuracy', {'train': stats['train_top1']}, step)
    writer.add_scalars('data/top5_accuracy', {'train': stats['train_top5']}, step)
    writer.add_scalars('data/top1_accuracy', {'val': acc1}, step)
    writer.add_scalars('data/top5_accuracy', {'val': acc5}, step)
    writer.add_scalar('data/val_loss', val_loss, step)
    writer.add_scalar('perf/images_per_sec', stats['images_per_s'], step)
    writer.add_scalar('perf/epoch_time_s', stats['epoch_time_s'], step)
    writer.add_scalar('perf/peak_memory_mb', stats['peak_memory_mb'], step)
    writer.flush()


def train(args, ckpt, device):
    seed_everything(args.seed)
    train_loader, val_loader = build_loaders(args, device)  # first: checks the data
    model = build_model(args).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = build_optimizer(model, args)
    n_iters = len(train_loader)
    scheduler = build_lr_scheduler(optimizer, args.warmup, args.epochs, n_iters)
    start_epoch, best_acc1, run_dir, summary = args.start_epoch, 0.0, None, None
    if ckpt is not None:
        start_epoch, best_acc1, run_dir, summary = resume(ckpt, model, optimizer, scheduler,
                                                          args)
    elif start_epoch > 0:  # --start-epoch without a checkpoint: fast-forward the lr
        scheduler.last_epoch = start_epoch * n_iters - 1
        scheduler._step_count = 2  # silence "scheduler before optimizer" warning
        scheduler.step()
    if run_dir is None:
        run_dir = make_run_dir(args.log_dir, args.name)
        summary = new_summary(args, run_dir, model, device, n_iters)
    summary_path = os.path.join(run_dir, 'summary.json')
    writer = SummaryWriter(run_dir)
    print(f'=> run folder {run_dir} | model {summary["arch"]} '
          f'({summary["num_params"] / 1e6:.2f}M params) | device {device} | '
          f'{len(train_loader.dataset)} training images, {n_iters} iterations/epoch')

    adv_attacker = None
    if args.adv_train:
        # Madry et al.'s defence: untargeted PGD from a random start, step 2.5*eps/steps
        adv_attacker = student_code.UntargetedPGDAttack(criterion, num_steps=args.adv_steps,
                                                        epsilon=args.adv_eps)

    invocation_start, wall_before = time.time(), summary.get('wall_time_s', 0.0)
    for epoch in range(start_epoch, args.epochs):
        if args.stop_after is not None and epoch - start_epoch >= args.stop_after:
            summary['status'] = 'stopped'
            print(f'=> stopped after {args.stop_after} epoch(s) as asked; continue with '
                  f'--resume={os.path.join(run_dir, "models", "checkpoint.pth.tar")}')
            break
        stats = train_one_epoch(train_loader, model, criterion, optimizer, scheduler, epoch,
                                args, device, writer, adv_attacker)
        print('[Training]: Epoch {:d} finished with lr={:f} | {:.1f} images/s | {:.1f} s | '
              'peak memory {:.0f} MB'.format(epoch + 1, stats['lr'], stats['images_per_s'],
                                             stats['epoch_time_s'], stats['peak_memory_mb']))
        acc1, acc5, val_loss = validate(val_loader, model, criterion, args, device)

        step = epoch + 1
        log_epoch(writer, step, stats, acc1, acc5, val_loss)
        is_best = acc1 > best_acc1
        best_acc1 = max(acc1, best_acc1)
        save_checkpoint({'epoch': epoch + 1, 'arch': summary['arch'],
                         'state_dict': model.state_dict(), 'best_acc1': best_acc1,
                         'optimizer': optimizer.state_dict(),
                         'scheduler': scheduler.state_dict(), 'args': vars(args)},
                        is_best, run_dir)
        summary['epochs'].append(dict(epoch=step, val_loss=val_loss, val_top1=acc1,
                                      val_top5=acc5, **stats))
        if is_best:
            summary['best_epoch'], summary['best_acc1'] = step, best_acc1
        summary['wall_time_s'] = wall_before + time.time() - invocation_start
        write_json_atomic(summary_path, summary)
    else:
        summary['status'] = 'finished'
    summary['wall_time_s'] = wall_before + time.time() - invocation_start
    write_json_atomic(summary_path, summary)
    writer.close()
    print(f'=> best Acc@1 {best_acc1:.2f} (epoch {summary["best_epoch"]}) | '
          f'wall time {format_seconds(summary["wall_time_s"])}')
    print(f'=> run folder:  {run_dir}')
    print(f'=> checkpoints: {os.path.join(run_dir, "models")}')
    print(f'=> TensorBoard: tensorboard --logdir {run_dir}')
    return summary


def evaluate_or_attack(args, ckpt, device):
    _, val_loader = build_loaders(args, device, train=False)  # first: checks the data
    model = build_model(args)
    load_model_state(model, ckpt, args.resume)
    model.to(device)
    criterion = nn.CrossEntropyLoss()
    mode = 'attack' if args.attack else 'eval'
    run_dir = make_run_dir(args.log_dir, args.name or mode)
    writer = SummaryWriter(run_dir)
    summary = new_summary(args, run_dir, model, device, 0)
    summary['checkpoint'] = os.path.abspath(args.resume)
    print(f"=> {mode} of '{args.resume}' ({summary['arch']}) on {device}; logs in {run_dir}")
    start = time.time()
    if args.evaluate:
        top1, top5, loss = validate(val_loader, model, criterion, args, device)
        if args.vis:
            log_saliency(val_loader, model, criterion, args, device, writer)
        key, result = 'evaluation', {'top1': top1, 'top5': top5, 'loss': loss}
        summary['status'] = 'evaluated'
    else:
        attacker = build_attacker(criterion, args)
        key, result = 'attack', attack_validate(val_loader, model, attacker, args, device,
                                                writer)
        summary['status'] = 'attacked'
    writer.close()
    result = dict(checkpoint=os.path.abspath(args.resume), **result)
    summary[key] = result
    summary['wall_time_s'] = time.time() - start
    write_json_atomic(os.path.join(run_dir, 'summary.json'), summary)
    source = run_dir_of_checkpoint(args.resume)  # add the result to the training run too
    if source is not None:
        path = os.path.join(source, 'summary.json')
        trained = read_json(path)
        trained[key] = result
        write_json_atomic(path, trained)
    return summary


def one_line(exc):
    """The message of an exception on one line, also when a DataLoader worker
    re-raised it wrapped in its own traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else type(exc).__name__
    prefix = type(exc).__name__ + ': '
    return line.split(prefix, 1)[1] if prefix in line else line


def main(argv=None):
    args = parser.parse_args(argv)
    try:
        check_args(args)
        ckpt = load_checkpoint(args.resume) if args.resume else None
        if ckpt is not None:
            reconcile_with_checkpoint(args, ckpt, args.resume)
        args.num_classes = args.num_classes or 100
        if args.seed is None:  # draw one, and record it so that the run can be replayed
            args.seed = random.SystemRandom().randrange(2 ** 31)
        device = select_device(args.device, args.gpu, args.use_mps)
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
        if args.evaluate or args.attack:
            return evaluate_or_attack(args, ckpt, device)
        return train(args, ckpt, device)
    except ValueError as exc:  # UsageError, DatasetError, CheckpointError, bad --device ...
        if os.environ.get('MAIN_DEBUG'):
            raise
        print(f'main.py: error: {one_line(exc)}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print('\nmain.py: interrupted; the last finished epoch is in RUN/models/'
              'checkpoint.pth.tar (continue with --resume)', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    main()
