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

Read it top to bottom, as PyTorch's examples/imagenet/main.py: main() and run() (the
plan -> data -> model), train() (model, optimizer and schedule -> run folder -> resume ->
epochs), the epoch loop, train_one_epoch(), validate(), then -e and -a. The flags are
the rows of toolkit/settings.py; run_plan.resolve decides every setting once, into the
frozen plan everything below reads. The rare cases (Ctrl-C, SIGTERM, exit codes, lost
torchrun processes, a run's ending status) live in toolkit/run_guard.py; the other
modules of toolkit/ each hold one concept (toolkit/__init__.py lists them).
"""
import functools
import math
import os
import sys
import time
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
from toolkit import settings  # noqa: E402
from toolkit.attack_eval import attack_validate, build_attacker, log_saliency  # noqa: E402
from toolkit.distributed import world, is_main  # noqa: E402
from toolkit.loaders import (build_loaders, load_datasets, seed_epoch,  # noqa: E402
                             seed_everything, train_size)
from toolkit.networks import build_model, build_optimizer, load_model_state, to_device  # noqa: E402
from toolkit.run_guard import ends_with_status, guarded, quoted  # noqa: E402
from toolkit.run_plan import check_flags, is_exact, names_the_model, resolve, settings_line  # noqa: E402
from toolkit.resume import resume  # noqa: E402
from toolkit.speed import autocast, eager, forward_fn, gradient_autocast, speed_line  # noqa: E402
from utils import (AverageMeter, ProgressMeter, accuracy, build_lr_scheduler,  # noqa: E402
                   predict_with_flip, select_device, reset_peak_memory, peak_memory_mb,
                   format_seconds, DivergedError)

# every flag, with its type, default and help, is a row of toolkit/settings.py
parser = settings.build_parser('main.py')

# what trains: the model and everything its steps update (the GradScaler of fp16 and the
# weights' moving average of --ema, or None)
Learner = namedtuple('Learner', 'model criterion optimizer scheduler scaler ema')


def main(argv=None):
    """Parse the flags, then run behind run_guard's boundary (signals, exit codes, one-line
    errors): plan -> data -> model -> epochs, or -e/-a of a checkpoint."""
    flags, given = settings.parse(parser, sys.argv[1:] if argv is None else argv)
    return guarded(lambda hold: run(flags, given, hold))


def run(flags, given, hold):
    """The run's plan, resolved once from the flags, the checkpoint, the data and the
    device (run_plan.resolve); then training, or -e/-a of the checkpoint."""
    check_flags(flags, given)
    ckpt, ckpt_file = (checkpoint.read_checkpoint(flags.resume) if flags.resume
                       else (None, None))
    # under torchrun: join the other processes, one GPU each (distributed.py)
    device = distributed.start(flags.device, flags.dist_backend, flags.sync_bn) or \
        select_device(flags.device, flags.gpu, flags.use_mps)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    evaluating = flags.evaluate or flags.attack
    datasets = load_datasets(flags.data_folder, train=not evaluating)
    plan = resolve(flags, given, ckpt, datasets, device)
    print(settings_line(plan))
    print(speed_line(plan, device))
    loaders = build_loaders(plan, device, datasets)
    if evaluating:
        return evaluate_or_attack(plan, given, ckpt, ckpt_file, device, loaders[1])
    return train(plan, given, ckpt, device, loaders, len(datasets['train']), hold)


################################################################################
# Training
################################################################################
def train(plan, given, ckpt, device, loaders, n_images, hold):
    """A new run, or the continuation of --resume's run; returns its summary. `hold`
    keeps the run folder's lock until main() returns."""
    train_loader, val_loader = loaders
    seed_everything(plan.seed)  # the initial weights depend on the seed only
    model = build_model(plan, from_checkpoint=ckpt is not None)
    if plan.sync_bn:  # same parameters and state-dict keys: -e/-a load it as it is
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = to_device(model, plan, device)
    optimizer = build_optimizer(model, plan)
    n_iters = len(train_loader)
    learner = Learner(model, nn.CrossEntropyLoss(label_smoothing=plan.label_smoothing),
                      optimizer,
                      build_lr_scheduler(optimizer, plan.warmup, plan.epochs, n_iters,
                                         start_iter=plan.start_epoch * n_iters),
                      torch.amp.GradScaler(device.type) if plan.amp_dtype == 'float16' else None,
                      moving_average(model, plan.ema) if plan.ema else None)

    # exact: this toolkit's checkpoint of an unfinished run continues in its own folder
    exact = ckpt is not None and is_exact(ckpt)
    run_dir = run_folder.open_run_folder(plan, ckpt if exact else None, hold)
    hold(ends_with_status(run_dir))  # whatever ends the run leaves its status
    summary = rr.new_summary(run_dir, plan, num_params=student_code.count_params(model),
                             device=device, iters_per_epoch=n_iters, epochs_planned=plan.epochs)
    start_epoch, best = resume(plan, ckpt, exact, learner, run_dir, summary,
                               ckpt is not None and names_the_model(ckpt, given))
    if start_epoch is None:  # the checkpoint held the run's last epoch
        return summary

    processes = f' x {world().size} processes ({world().backend})' if world().size > 1 else ''
    print(f'=> run folder {run_dir} | model {plan.arch} ({summary["num_params"] / 1e6:.2f}M '
          f'params) | device {device}{processes} | {n_images} training images, '
          f'{n_iters} iterations/epoch')
    run_folder.write_summary(run_dir, summary)
    run_epochs(plan, learner, train_loader, val_loader, device, run_dir, summary, best,
               start_epoch)
    if run_dir is not None:
        print_run_end(run_dir, summary)
    return summary


def run_epochs(plan, learner, train_loader, val_loader, device, run_dir, summary, best,
               start_epoch):
    """Train from start_epoch to --epochs (or --stop-after epochs of them): each epoch is
    trained, checked for non-finite weights, validated and committed to the run folder."""
    writer = SummaryWriter(run_dir) if run_dir is not None else distributed.NoWriter()
    model = learner.model  # what is saved; `net` is what trains (DDP, compiled)
    net = forward_fn(distributed.wrap(model), plan, device)
    # validation runs on each process's share without collectives: not through DDP; with
    # --ema it validates the moving average
    if learner.ema is not None:
        val_net = forward_fn(learner.ema.module, plan, device)
    else:
        val_net = forward_fn(model, plan, device) if world().size > 1 else net
    adv_attacker = None
    if plan.adv_train:
        # Madry et al.'s defence: untargeted PGD from a random start, step 2.5*eps/steps
        adv_attacker = student_code.UntargetedPGDAttack(nn.CrossEntropyLoss(),
                                                        num_steps=plan.adv_steps,
                                                        epsilon=plan.adv_eps)
    # the GPU's peak memory is reported without the data cache it holds (the same for
    # every epoch), so that peaks with and without --data-cache compare
    cache_mb = (train_loader.device_bytes + val_loader.device_bytes) / 2 ** 20 \
        if device.type == 'cuda' else 0.0
    invocation_start, wall_before = time.time(), summary['wall_time_s']
    epochs_this_time = plan.epochs - start_epoch
    if plan.stop_after is not None:
        epochs_this_time = min(epochs_this_time, plan.stop_after)
    for epoch in range(start_epoch, start_epoch + epochs_this_time):
        seed_epoch(plan.seed, epoch, train_loader)
        train_loader.size_for = functools.partial(train_size, plan, epoch)  # --min-train-size
        stats = train_one_epoch(train_loader, net, learner, epoch, plan, device, writer,
                                adv_attacker)
        stats['peak_memory_mb'] -= cache_mb
        print(f"[Training]: Epoch {epoch + 1:d} finished with lr={stats['lr']:f} | "
              f"{stats['images_per_s']:.1f} images/s | {stats['epoch_time_s']:.1f} s | "
              f"peak memory {stats['peak_memory_mb']:.0f} MB")
        bad = checkpoint.first_non_finite(model.state_dict())
        if bad is not None:
            raise DivergedError(diverged_message(f"'{bad}' holds NaN or inf after epoch "
                                                 f"{epoch + 1}", plan))
        if not plan.sync_bn:  # (SyncBatchNorm keeps one set of statistics already)
            distributed.average_batchnorm_statistics(model)
            if learner.ema is not None:
                distributed.average_batchnorm_statistics(learner.ema.module)
        acc1, acc5, val_loss = validate(val_loader, val_net, nn.CrossEntropyLoss(), plan, device)
        log_epoch(writer, epoch + 1, stats, acc1, acc5, val_loss)
        record = dict(epoch=epoch + 1, val_loss=val_loss, val_top1=acc1, val_top5=acc5, **stats)
        summary['wall_time_s'] = wall_before + time.time() - invocation_start
        run_folder.commit_epoch(run_dir, plan, learner, summary, record, best)
    writer.close()
    done = start_epoch + epochs_this_time
    summary['status'] = rr.FINISHED if done == plan.epochs else rr.STOPPED
    summary['wall_time_s'] = wall_before + time.time() - invocation_start
    run_folder.write_summary(run_dir, summary)
    if summary['status'] == rr.STOPPED and run_dir is not None:
        print(f'=> stopped after {epochs_this_time} epoch(s) as asked; continue with '
              f'--resume={quoted(rr.checkpoint_path(run_dir))}')


def moving_average(model, decay):
    """--ema: torch's AveragedModel of the weights and BatchNorm statistics, updated after
    every step: ema = decay x ema + (1 - decay) x weights (timm's model EMA)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_one_epoch(train_loader, net, learner, epoch, plan, device, writer,
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
               disable=not sys.stdout.isatty(), desc=f'Epoch {epoch + 1}/{plan.epochs}')
    start = end = time.time()
    accuracies = []  # (top-1, top-5) of the batches since the last print, on the device
    for i, (input, target) in enumerate(bar):  # on the device already (loaders.OnDevice)
        data_time.update(time.time() - end)
        if adv_attacker is not None:
            # the eager model: the attack's eval/train switches would recompile a
            # compiled one at every step; the input gradient stays float32 (a leaf)
            with gradient_autocast(plan, device):
                input = student_code.adversarial_training_batch(eager(net), adv_attacker,
                                                                input, plan.adv_ratio)
        with autocast(plan, device):
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
                plan))
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:  # fp32 and bf16: the plain step
            loss.backward()
            if plan.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(eager(net).parameters(), plan.clip_grad)
            optimizer.step()
        else:  # fp16: scaled loss; clip the true (unscaled) gradients
            scaler.scale(loss).backward()
            if plan.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(eager(net).parameters(), plan.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()  # per iteration: warmup + cosine
        if learner.ema is not None:
            learner.ema.update_parameters(eager(net))

        # the accuracies stay on the device until they are printed: loss.item() above is
        # the step's one wait for the GPU, so its queue of work never runs dry
        accuracies.append(torch.stack(accuracy(output, target, topk=(1, 5))))
        losses.update(loss_value, input.size(0))
        batch_time.update(time.time() - end)
        end = time.time()
        if i % plan.print_freq == 0 or i == n_iters - 1:
            for acc1, acc5 in torch.stack(accuracies).tolist():  # every batch is full-size
                top1.update(acc1, input.size(0))
                top5.update(acc5, input.size(0))
            accuracies.clear()
            iters_left = (plan.epochs - epoch) * n_iters - i - 1
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


def validate(val_loader, model, criterion, plan, device):
    """Test the model on the validation set; returns (top1, top5, loss). Accuracy is
    that of the flip-averaged logits (the handout's test-time augmentation); the loss
    is that of the plain logits, comparable with the training loss."""
    batch_time, losses = AverageMeter('Time', ':.3f'), AverageMeter('Loss', ':.4f')
    top1, top5 = AverageMeter('Acc@1', ':.2f'), AverageMeter('Acc@5', ':.2f')
    progress = ProgressMeter(len(val_loader), [batch_time, top1, top5], prefix='Test: ')
    model.eval()
    with torch.no_grad(), autocast(plan, device):
        end = time.time()
        for i, (input, target) in enumerate(val_loader):  # on the device (loaders.OnDevice)
            logits, output = predict_with_flip(model, input)
            losses.update(criterion(logits, target).item(), input.size(0))
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            top1.update(acc1.item(), input.size(0))
            top5.update(acc5.item(), input.size(0))
            batch_time.update(time.time() - end)
            end = time.time()
            if i % plan.print_freq == 0:
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


def diverged_message(what, plan):
    return (f"training diverged: {what}; try a lower --lr (now {plan.lr:g}), a longer "
            f"--warmup (now {plan.warmup}) or --clip-grad 1.0; the checkpoint of the last "
            f"finished epoch is intact")


def print_run_end(run_dir, summary):
    best = summary['best_acc1']
    print(f"=> best Acc@1 {best if best is not None else float('nan'):.2f} "
          f"(epoch {summary['best_epoch']}) | wall time {format_seconds(summary['wall_time_s'])}")
    print(f'=> run folder:  {run_dir}')
    print(f'=> checkpoints: {os.path.join(run_dir, rr.MODELS)}')
    print(f'=> TensorBoard: tensorboard --logdir {quoted(run_dir)}')


################################################################################
# Evaluating (-e) and attacking (-a) a trained model
################################################################################
def evaluate_or_attack(plan, given, ckpt, ckpt_file, device, val_loader):
    """-e or -a of the --resume checkpoint: a run folder of its own; the result also goes
    into the summary of the training run the checkpoint comes from. The result names the
    checkpoint's epoch and the fingerprint of the file read (ckpt_file), so that a file
    rewritten since (model_best of a run still training) shows the result as stale."""
    model = build_model(plan, from_checkpoint=True)
    load_model_state(model, ckpt.evaluated_weights(), plan.resume, plan.arch,
                     names_the_model(ckpt, given))
    model, criterion = to_device(model, plan, device), nn.CrossEntropyLoss()

    mode = 'attack' if plan.attack else 'eval'
    run_dir = run_folder.make_run_dir(plan.log_dir, plan.name or mode) if is_main() else None
    writer = SummaryWriter(run_dir) if is_main() else distributed.NoWriter()
    summary = rr.new_summary(run_dir, plan, num_params=student_code.count_params(model),
                             device=device, iters_per_epoch=0, epochs_planned=0)
    ema = ckpt.plan.get('ema')
    weights = f', the moving average of --ema {ema:g}' if ema else ''
    print(f"=> {mode} of '{plan.resume}' ({plan.arch}{weights}) on {device}; logs in {run_dir}")
    start = time.time()
    if plan.evaluate:
        key, summary['status'] = rr.EVALUATION, rr.EVALUATED
        top1, top5, loss = validate(val_loader, model, criterion, plan, device)
        result = {'top1': top1, 'top5': top5, 'loss': loss}
        if plan.vis and is_main():  # the saliency maps of rank 0's share of the images
            log_saliency(val_loader, model, criterion, plan, device, writer)
    else:
        key, summary['status'] = rr.ATTACK, rr.ATTACKED
        result = attack_validate(val_loader, model, build_attacker(criterion, plan), plan,
                                 device, writer)
    writer.close()
    result = dict(checkpoint=os.path.abspath(plan.resume), epoch=ckpt.epoch,
                  file=ckpt_file, **result)
    summary.update({key: result, 'wall_time_s': time.time() - start})
    run_folder.write_summary(run_dir, summary)
    trained_in = run_folder.run_dir_of_checkpoint(plan.resume)
    if is_main() and trained_in is not None and os.path.isfile(rr.summary_path(trained_in)):
        run_folder.add_result(trained_in, key, result)
    return summary


if __name__ == '__main__':
    main()
