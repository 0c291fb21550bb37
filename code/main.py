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
summary.json and models/{checkpoint,model_best}.pth.tar
(toolkit/run_record.py, toolkit/run_folder.py).

Read it top to bottom, as PyTorch's examples/imagenet/main.py: the flags, main(),
train() (plan -> data -> model -> optimizer and schedule -> run folder -> resume ->
epochs), the epoch loop, train_one_epoch(), validate(), then -e and -a. The modules of
toolkit/ each hold one concept: run_plan.py (what a run is asked to do), loaders.py
(the data), networks.py (models and optimizers), run_folder.py (its files), resume.py
(the state a resumed run goes on from), attack_eval.py (Part III), speed.py and
distributed.py.
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import time
import traceback
from collections import namedtuple

# OpenMP (libgomp, torch's thread pool) lets a thread that waits for work spin on its core
# before it sleeps. Two runs on the same cores then spend each other's time slices
# spinning and each slows 5x where sharing two cores should cost 2x (docs/benchmarks.md,
# "Two runs on the same cores"). Passive waiting must be set before torch loads OpenMP;
# a value of your own in the environment is kept.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any directory
import student_code  # noqa: E402
from toolkit import checkpoint  # noqa: E402
from toolkit import distributed  # noqa: E402
from toolkit import run_folder  # noqa: E402
from toolkit import run_record as rr  # noqa: E402
from toolkit.attack_eval import attack_validate, build_attacker, log_saliency  # noqa: E402
from custom_dataloader import DatasetError  # noqa: E402
from toolkit.distributed import world, is_main  # noqa: E402
from toolkit.loaders import (build_loaders, load_datasets, seed_epoch,  # noqa: E402
                             seed_everything, settle_data_cache, settle_num_classes)
from toolkit.networks import (ARCHS, build_model, build_optimizer, load_model_state,  # noqa: E402
                              to_device)
from toolkit.run_plan import (adopt_checkpoint_plan, adopt_evaluation_plan,  # noqa: E402
                              adopt_weights, check_args, finished_cleanly, freeze, given_flags,
                              names_the_model, refuse_unresumable, settle_new_run)
from toolkit.resume import resume  # noqa: E402
from toolkit.speed import (autocast, eager, forward_fn, gradient_autocast,  # noqa: E402
                           resolve_speed_settings, speed_line)
from utils import (AverageMeter, ProgressMeter, accuracy, build_lr_scheduler,  # noqa: E402
                   predict_with_flip, select_device, reset_peak_memory, peak_memory_mb,
                   format_seconds, one_line, ToolkitError, UsageError, CheckpointError,
                   DivergedError)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description='PyTorch Image Classification (MiniPlaces)')
handout = parser.add_argument_group("the handout's flags (names and defaults as in its main.py)")
handout.add_argument('data_folder', metavar='DIR', help='path to dataset')
handout.add_argument('-j', '--workers', default=4, type=int, metavar='N',
                     help='number of data loading workers (default: 4)')
handout.add_argument('--epochs', default=90, type=int, metavar='N',
                     help='number of total epochs to run (default: 90)')
handout.add_argument('--warmup', default=5, type=int, metavar='N',
                     help='number of epochs of linear lr warmup (default: 5)')
handout.add_argument('--clip-grad', default=1.0, type=float, metavar='NORM',
                     help='gradient norm clipping: on for the ViT by default, for CNNs '
                          'when given; 0 disables (default: 1.0)')
handout.add_argument('--start-epoch', default=0, type=int, metavar='N',
                     help='manual epoch number (useful on restarts; --resume sets it)')
handout.add_argument('-b', '--batch-size', default=256, type=int, metavar='N',
                     help='mini-batch size (default: 256)')
handout.add_argument('--lr', '--learning-rate', default=0.1, type=float, metavar='LR',
                     help='initial learning rate (default: the handout\'s 0.1 at its batch '
                          'of 256, scaled linearly to -b: 0.1 x b / 256)')
handout.add_argument('--momentum', default=0.9, type=float, metavar='M',
                     help='momentum of SGD (default: 0.9)')
handout.add_argument('--wd', '--weight-decay', default=1e-4, type=float, metavar='W',
                     dest='weight_decay', help='weight decay (default: 1e-4)')
handout.add_argument('-p', '--print-freq', default=10, type=int, metavar='N',
                     help='print frequency in iterations (default: 10)')
handout.add_argument('--resume', default='', type=str, metavar='PATH',
                     help='path to a checkpoint: continue its run (or evaluate it with -e/-a)')
handout.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                     help='evaluate the --resume model on the validation set')
handout.add_argument('-a', '--attack', dest='attack', action='store_true',
                     help='attack the --resume model with adversarial samples')
handout.add_argument('-v', '--vis', dest='vis', action='store_true',
                     help='log images to TensorBoard (saliency with -e, adversarial with -a)')
handout.add_argument('--use-custom-conv', action='store_true',
                     help='use our own convolution (student_code.CustomConv2d)')
handout.add_argument('--use-vit', action='store_true',
                     help='use the vision Transformer (= --arch of default_vit_model)')
handout.add_argument('--use-resnet18', action='store_true',
                     help='fine-tune torchvision ResNet-18 pre-trained on ImageNet '
                          '(= --arch resnet18)')
handout.add_argument('--gpu', default=0, type=int, help='GPU id to use, -1 for the CPU')
handout.add_argument('--use-mps', action='store_true', help='use Apple MPS')
run = parser.add_argument_group('model and run')
run.add_argument('--device', default='auto',
                 help='auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps')
run.add_argument('--seed', default=None, type=int,
                 help='random seed (default: drawn at random and recorded)')
run.add_argument('--log-dir', default=os.path.join(REPO_ROOT, 'logs'), metavar='DIR',
                 help='where run folders go (default: logs/ at the repository root)')
run.add_argument('--name', default=None, help='suffix of the run folder name')
run.add_argument('--arch', default=None, choices=sorted(ARCHS), metavar='NAME',
                 help='the model: ' + ', '.join(sorted(ARCHS)) +
                      ' (default: student_code.default_cnn_model)')
run.add_argument('--num-classes', default=None, type=int,
                 help="number of classes (default: largest label + 1 in the label files, "
                      "or the checkpoint's)")
run.add_argument('--pretrained-weights', default=None, metavar='PATH',
                 help='local ResNet-18 state dict for --use-resnet18 (no download)')
run.add_argument('--stop-after', default=None, type=int, metavar='N',
                 help='stop after N epochs of this invocation (resume later)')
attack = parser.add_argument_group('attack (-a) and adversarial training')
attack.add_argument('--attack-steps', default=None, type=int, help='PGD steps for -a')
attack.add_argument('--attack-step-size', default=None, type=float, help='PGD step size for -a')
attack.add_argument('--attack-eps', default=None, type=float, help='PGD epsilon for -a')
attack.add_argument('--adv-train', action='store_true',
                    help='adversarial training: mix PGD samples into each batch (CNNs)')
attack.add_argument('--adv-steps', default=5, type=int, help='PGD steps for --adv-train')
attack.add_argument('--adv-eps', default=0.1, type=float, help='PGD epsilon for --adv-train')
attack.add_argument('--adv-ratio', default=0.5, type=float,
                    help='fraction of each batch replaced by adversarial samples')
speed = parser.add_argument_group(
    "speed (auto by default: the device's measured best, said at start; docs/training.md)")
speed.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='mixed precision (torch.autocast): bf16 where the device has it, else '
                        'fp16 with a GradScaler (default: auto, per device)')
speed.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help='NHWC memory format for model and batches (default: auto)')
speed.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile the model for training; falls back to eager, saying '
                        'so, where it cannot (default: auto)')
speed.add_argument('--data-cache', action=argparse.BooleanOptionalAction, default=None,
                   help='decode the images once into DIR/cache/ and augment with one fused '
                        'warp (fast_data.py) (default: auto)')
speed.add_argument('--rebuild-cache', action='store_true',
                   help='with --data-cache: decode the images into DIR/cache/ again, even '
                        'where its fingerprint says it is fresh')
dist = parser.add_argument_group('several processes (under torchrun; -b stays the global batch)')
dist.add_argument('--dist-backend', default='auto', choices=('auto', 'nccl', 'gloo'),
                  help='under torchrun: nccl on GPUs, gloo on the CPU (default: auto)')
dist.add_argument('--sync-bn', action='store_true',
                  help='under torchrun: BatchNorm statistics over the global batch (for '
                       'small per-GPU batches; CUDA only)')


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run; the message says where its checkpoint is."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping a run as Ctrl-C does; the exit status says which it was."""


# what trains: the model and everything its steps update (the GradScaler of fp16 or None)
Learner = namedtuple('Learner', 'model criterion optimizer scheduler scaler')

# the errors that every process of a torchrun launch meets alike (the same flags, data and
# checkpoint; a divergence is checked on the mean loss): only rank 0 says them
SHARED_ERRORS = (UsageError, CheckpointError, DatasetError, DivergedError)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    given = given_flags(parser, argv, args)
    previous_handler = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        with contextlib.ExitStack() as run_folder_lock:  # held until the run ends
            check_args(args, given)
            ckpt, ckpt_file = (run_folder.read_checkpoint(args.resume) if args.resume
                               else (None, None))
            # under torchrun: join the other processes, one GPU each (distributed.py)
            device = distributed.start(args.device, args.dist_backend, args.sync_bn) or \
                select_device(args.device, args.gpu, args.use_mps)
            args.world_size = world().size
            if device.type == 'cuda':
                torch.backends.cudnn.benchmark = True
            if args.evaluate or args.attack:
                return evaluate_or_attack(args, given, ckpt, ckpt_file, device)
            return train(args, given, ckpt, device, run_folder_lock.enter_context)
    except ToolkitError as exc:  # ours: bad flags, data, checkpoint, run folder, divergence
        if os.environ.get('MAIN_DEBUG'):
            raise
        if distributed.launch_rank() == 0 or not isinstance(exc, SHARED_ERRORS):
            print(f'main.py: error: {one_line(exc)}', file=sys.stderr)
        else:  # rank 0 says it: torchrun must not stop rank 0 before it has
            distributed.let_rank0_say_it()
        # a DataLoader worker's error is re-raised by torch in a reference cycle that
        # holds the loader; freed by the garbage collector later, its workers take 5 s
        # to stop. Clearing the frames frees it now (for callers of main() in-process)
        traceback.clear_frames(exc.__traceback__)
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f'\nmain.py: {str(exc) or "interrupted"}', file=sys.stderr)
        # the shell's convention: 128 + the signal's number (SIGINT 130, SIGTERM 143)
        stopped_by = exc.__cause__ if isinstance(exc, Interrupted) else exc
        sys.exit(128 + (signal.SIGTERM if isinstance(stopped_by, Terminated) else signal.SIGINT))
    except Exception as exc:  # a lost torchrun process: one line, not the backend's traceback
        if not distributed.lost_process(exc) or os.environ.get('MAIN_DEBUG'):
            raise  # any other keeps its traceback (your own code's above all)
        distributed.ignore_sigterm()  # torchrun's stop of the processes left
        print(f'main.py: error: {distributed.lost_process_message(exc)}', file=sys.stderr)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        distributed.stop()


def sigterm_as_interrupt(signum, frame):
    """SIGTERM (what a cloud VM sends before preemption) stops a run like Ctrl-C."""
    raise Terminated


################################################################################
# Training
################################################################################
def train(args, given, ckpt, device, hold):
    """A new run, or the continuation of --resume's run; returns its summary. `hold`
    keeps the run folder's lock until main() returns."""
    # The run's plan, resolved once, in this order, then frozen: the flags (or the
    # checkpoint's plan) -> the class count the data settles -> the device's speed
    # settings -> whether the cache can serve. Nothing after freeze() changes it.
    # exact: this toolkit's checkpoint (its best model is refused below); else the
    # handout's checkpoint or bare weights, which lack the plan
    exact = ckpt is not None and (ckpt.kind == 'best' or not ckpt.missing_for_resume())
    planned = None
    if exact:
        planned = adopt_checkpoint_plan(args, given, ckpt, args.resume)
        refuse_unresumable(ckpt, args.resume, planned, finished_cleanly(args, ckpt, planned))
    elif ckpt is not None:  # the handout's own checkpoint, or bare weights
        adopt_weights(args, given, ckpt, args.resume)
    else:
        settle_new_run(args, given)
    args, (train_loader, val_loader), train_set = settle_data_and_speed(
        args, device, 'the checkpoint' if ckpt else '--num-classes', with_train=True)

    seed_everything(args.seed)  # the initial weights depend on the seed only
    model = build_model(args, from_checkpoint=ckpt is not None)
    if args.sync_bn:  # same parameters and state-dict keys: -e/-a load it as it is
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = to_device(model, args, device)
    optimizer = build_optimizer(model, args)
    n_iters = len(train_loader)
    learner = Learner(model, nn.CrossEntropyLoss(), optimizer,
                      build_lr_scheduler(optimizer, args.warmup, args.epochs, n_iters,
                                         start_iter=args.start_epoch * n_iters),
                      torch.amp.GradScaler(device.type) if args.amp_dtype == 'float16' else None)

    run_dir = run_folder.open_run_folder(args, ckpt if exact else None, hold)
    summary = rr.new_summary(run_dir, args, num_params=student_code.count_params(model),
                             device=device, iters_per_epoch=n_iters, epochs_planned=args.epochs,
                             world_size=world().size, dist_backend=world().backend)
    start_epoch, best = resume(args, ckpt, exact, planned, learner, run_dir, summary,
                               ckpt is not None and names_the_model(ckpt, given))
    if start_epoch is None:  # killed between its last checkpoint and its summary
        summary['status'] = rr.FINISHED
        run_folder.write_summary(run_dir, summary)
        print(f'=> the run had finished its {planned} epochs; its files are consistent now')
        return summary

    processes = f' x {world().size} processes ({world().backend})' if world().size > 1 else ''
    print(f'=> run folder {run_dir} | model {args.arch} ({summary["num_params"] / 1e6:.2f}M '
          f'params) | device {device}{processes} | {len(train_set)} training images, '
          f'{n_iters} iterations/epoch')
    try:
        run_folder.write_summary(run_dir, summary)
        run_epochs(args, learner, train_loader, val_loader, device, run_dir, summary, best,
                   start_epoch)
    except DivergedError:
        summary['status'] = rr.DIVERGED
        run_folder.write_summary(run_dir, summary)
        raise
    except KeyboardInterrupt as exc:
        summary['status'] = rr.INTERRUPTED
        run_folder.write_summary(run_dir, summary)
        raise Interrupted(interrupted_message(run_dir)) from exc
    if run_dir is not None:
        print_run_end(run_dir, summary)
    return summary


def settle_data_and_speed(args, device, classes_from, with_train):
    """The plan's last steps, for training and for -e/-a alike: the data (checked first)
    and the class count it settles, the device's speed settings, whether the cache can
    serve; then the plan is frozen. Returns (the plan, its loaders, the training set)."""
    train_set, val_set = load_datasets(args, train=with_train)  # built once, used below
    datasets = {'train': train_set, 'val': val_set} if with_train else {'val': val_set}
    settle_num_classes(args, datasets, classes_from)
    auto = resolve_speed_settings(args, device)
    cache_fallback = settle_data_cache(args, datasets, auto=auto)
    plan = freeze(args)
    loaders = build_loaders(plan, device, train_set, val_set)
    print(speed_line(plan, device, auto, {'data_cache': cache_fallback}))
    return plan, loaders, train_set


def run_epochs(args, learner, train_loader, val_loader, device, run_dir, summary, best,
               start_epoch):
    """Train from start_epoch to --epochs (or --stop-after epochs of them): each epoch is
    trained, checked for non-finite weights, validated and committed to the run folder."""
    writer = SummaryWriter(run_dir) if run_dir is not None else distributed.NoWriter()
    model = learner.model  # what is saved; `net` is what trains (DDP, compiled)
    net = forward_fn(distributed.wrap(model), args, device)
    # validation runs on each process's share without collectives: not through DDP
    val_net = forward_fn(model, args, device) if world().size > 1 else net
    adv_attacker = None
    if args.adv_train:
        # Madry et al.'s defence: untargeted PGD from a random start, step 2.5*eps/steps
        adv_attacker = student_code.UntargetedPGDAttack(nn.CrossEntropyLoss(),
                                                        num_steps=args.adv_steps,
                                                        epsilon=args.adv_eps)
    # the GPU's peak memory is reported without the data cache it holds (the same for
    # every epoch), so that peaks with and without --data-cache compare
    cache_mb = (train_loader.device_bytes + val_loader.device_bytes) / 2 ** 20 \
        if device.type == 'cuda' else 0.0
    invocation_start, wall_before = time.time(), summary['wall_time_s']
    epochs_this_time = args.epochs - start_epoch
    if args.stop_after is not None:
        epochs_this_time = min(epochs_this_time, args.stop_after)
    for epoch in range(start_epoch, start_epoch + epochs_this_time):
        seed_epoch(args.seed, epoch, train_loader)
        stats = train_one_epoch(train_loader, net, learner, epoch, args, device, writer,
                                adv_attacker)
        stats['peak_memory_mb'] -= cache_mb
        print(f"[Training]: Epoch {epoch + 1:d} finished with lr={stats['lr']:f} | "
              f"{stats['images_per_s']:.1f} images/s | {stats['epoch_time_s']:.1f} s | "
              f"peak memory {stats['peak_memory_mb']:.0f} MB")
        bad = checkpoint.first_non_finite(model.state_dict())
        if bad is not None:
            raise DivergedError(diverged_message(f"'{bad}' holds NaN or inf after epoch "
                                                 f"{epoch + 1}", args))
        if not args.sync_bn:  # (SyncBatchNorm keeps one set of statistics already)
            distributed.average_batchnorm_statistics(model)
        acc1, acc5, val_loss = validate(val_loader, val_net, learner.criterion, args, device)
        log_epoch(writer, epoch + 1, stats, acc1, acc5, val_loss)
        record = dict(epoch=epoch + 1, val_loss=val_loss, val_top1=acc1, val_top5=acc5, **stats)
        summary['wall_time_s'] = wall_before + time.time() - invocation_start
        run_folder.commit_epoch(run_dir, args, learner, summary, record, best)
    writer.close()
    done = start_epoch + epochs_this_time
    summary['status'] = rr.FINISHED if done == args.epochs else rr.STOPPED
    summary['wall_time_s'] = wall_before + time.time() - invocation_start
    run_folder.write_summary(run_dir, summary)
    if summary['status'] == rr.STOPPED and run_dir is not None:
        print(f'=> stopped after {epochs_this_time} epoch(s) as asked; continue with '
              f'--resume={rr.checkpoint_path(run_dir)}')


def train_one_epoch(train_loader, net, learner, epoch, args, device, writer,
                    adv_attacker=None):
    """One epoch (0-based `epoch`) of `net` (the model, or its DDP or compiled wrapper);
    returns the epoch's figures. A non-finite loss stops it at once (DivergedError),
    before the step that would spread it."""
    batch_time, data_time = AverageMeter('Time', ':.3f'), AverageMeter('Data', ':.3f')
    losses, top1, top5 = (AverageMeter('Loss', ':.4f'), AverageMeter('Acc@1', ':.2f'),
                          AverageMeter('Acc@5', ':.2f'))
    n_iters = len(train_loader)
    progress = ProgressMeter(n_iters, [batch_time, data_time, losses, top1, top5],
                             prefix=f'Epoch: [{epoch + 1}]')
    optimizer, scheduler, scaler = learner.optimizer, learner.scheduler, learner.scaler
    reset_peak_memory(device)
    net.train()
    bar = tqdm(train_loader, total=n_iters, leave=False, dynamic_ncols=True,
               disable=not sys.stdout.isatty(), desc=f'Epoch {epoch + 1}/{args.epochs}')
    start = end = time.time()
    accuracies = []  # (top-1, top-5) of the batches since the last print, on the device
    for i, (input, target) in enumerate(bar):  # on the device already (loaders.OnDevice)
        data_time.update(time.time() - end)
        if adv_attacker is not None:
            # the eager model: the attack's eval/train switches would recompile a
            # compiled one at every step; the input gradient stays float32 (a leaf)
            with gradient_autocast(args, device):
                input = student_code.adversarial_training_batch(eager(net), adv_attacker,
                                                                input, args.adv_ratio)
        with autocast(args, device):
            output = net(input)
            loss = learner.criterion(output, target)
        # an fp16 forward that overflows shows up here too; the steps a GradScaler skips
        # for inf gradients are normal and never reach this check. Several processes
        # check the mean of their losses, so that all of them stop at the same step.
        loss_value = loss.item()
        mean_loss = distributed.mean_over_processes(loss_value)
        if not math.isfinite(mean_loss):
            raise DivergedError(diverged_message(
                f"the loss is {mean_loss} at epoch {epoch + 1}, iteration {i + 1}/{n_iters}",
                args))
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:  # fp32 and bf16: the plain step
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(eager(net).parameters(), args.clip_grad)
            optimizer.step()
        else:  # fp16: scaled loss; clip the true (unscaled) gradients
            scaler.scale(loss).backward()
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(eager(net).parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()  # per iteration: warmup + cosine

        # the accuracies stay on the device until they are printed: loss.item() above is
        # the step's one wait for the GPU, so its queue of work never runs dry
        accuracies.append(torch.stack(accuracy(output, target, topk=(1, 5))))
        losses.update(loss_value, input.size(0))
        batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0 or i == n_iters - 1:
            for acc1, acc5 in torch.stack(accuracies).tolist():  # every batch is full-size
                top1.update(acc1, input.size(0))
                top5.update(acc5, input.size(0))
            accuracies.clear()
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
        for i, (input, target) in enumerate(val_loader):  # on the device (loaders.OnDevice)
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


def diverged_message(what, args):
    return (f"training diverged: {what}; try a lower --lr (now {args.lr:g}), a longer "
            f"--warmup (now {args.warmup}) or --clip-grad 1.0; the checkpoint of the last "
            f"finished epoch is intact")


def interrupted_message(run_dir):
    if run_dir is None:  # a process other than rank 0
        return 'interrupted'
    path = rr.checkpoint_path(run_dir)
    if os.path.isfile(path):
        return (f'interrupted; the last finished epoch is in {path}: continue with '
                f'--resume={path}')
    return f'interrupted before the first epoch finished ({run_dir})'


def print_run_end(run_dir, summary):
    best = summary['best_acc1']
    print(f"=> best Acc@1 {best if best is not None else float('nan'):.2f} "
          f"(epoch {summary['best_epoch']}) | wall time {format_seconds(summary['wall_time_s'])}")
    print(f'=> run folder:  {run_dir}')
    print(f'=> checkpoints: {os.path.join(run_dir, rr.MODELS)}')
    print(f'=> TensorBoard: tensorboard --logdir {run_dir}')


################################################################################
# Evaluating (-e) and attacking (-a) a trained model
################################################################################
def evaluate_or_attack(args, given, ckpt, ckpt_file, device):
    """-e or -a of the --resume checkpoint: a run folder of its own; the result also goes
    into the summary of the training run the checkpoint comes from. The result names the
    checkpoint's epoch and the fingerprint of the file read (ckpt_file), so that a file
    rewritten since (model_best of a run still training) shows the result as stale."""
    # the plan, resolved in train()'s order, then frozen
    source = adopt_evaluation_plan(args, given, ckpt)
    args, (_, val_loader), _ = settle_data_and_speed(args, device, source, with_train=False)
    model = build_model(args, from_checkpoint=True)
    load_model_state(model, ckpt.state_dict, args.resume, args.arch,
                     names_the_model(ckpt, given))
    model, criterion = to_device(model, args, device), nn.CrossEntropyLoss()

    mode = 'attack' if args.attack else 'eval'
    run_dir = run_folder.make_run_dir(args.log_dir, args.name or mode) if is_main() else None
    writer = SummaryWriter(run_dir) if is_main() else distributed.NoWriter()
    summary = rr.new_summary(run_dir, args, num_params=student_code.count_params(model),
                             device=device, iters_per_epoch=0, epochs_planned=0,
                             world_size=world().size, dist_backend=world().backend)
    print(f"=> {mode} of '{args.resume}' ({args.arch}) on {device}; logs in {run_dir}")
    start = time.time()
    if args.evaluate:
        key, summary['status'] = rr.EVALUATION, rr.EVALUATED
        top1, top5, loss = validate(val_loader, model, criterion, args, device)
        result = {'top1': top1, 'top5': top5, 'loss': loss}
        if args.vis and is_main():  # the saliency maps of rank 0's share of the images
            log_saliency(val_loader, model, criterion, args, device, writer)
    else:
        key, summary['status'] = rr.ATTACK, rr.ATTACKED
        result = attack_validate(val_loader, model, build_attacker(criterion, args), args,
                                 device, writer)
    writer.close()
    result = dict(checkpoint=os.path.abspath(args.resume), epoch=ckpt.epoch,
                  file=ckpt_file, **result)
    summary.update({key: result, 'wall_time_s': time.time() - start})
    run_folder.write_summary(run_dir, summary)
    trained_in = run_folder.run_dir_of_checkpoint(args.resume)
    if is_main() and trained_in is not None and os.path.isfile(rr.summary_path(trained_in)):
        run_folder.add_result(trained_in, key, result)
    return summary


if __name__ == '__main__':
    main()
