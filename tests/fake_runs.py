"""Run folders shaped like main.py's, written with the same SummaryWriter calls and tags,
for the tests of report.py and of TensorBoard reading the logs.

Every value is a known function of (session, step), so tests can check what comes out
against what went in. A second session on the same folder (a resumed run) writes
`offset`-shifted values, which must win wherever a step is written twice."""
import json
import os

from torch.utils.tensorboard import SummaryWriter

from toolkit import run_record as rr

TOPK = {1: rr.TAG_TOP1, 5: rr.TAG_TOP5}


def loss_at(step, offset=0.0):
    return 4.6 / (1 + 0.05 * step) + offset


def lr_at(step, offset=0.0):
    return 0.1 / (1 + 0.01 * step) + offset


def acc_at(epoch, split, k=1, offset=0.0):
    base = {1: 10.0, 5: 30.0}[k] + 5.0 * epoch
    return base + (2.0 if split == 'train' else 0.0) + offset


def epoch_record(epoch, ipe, offset=0.0):
    """summary.json's record of 1-based `epoch`, matching the event values."""
    return {'epoch': epoch, 'lr': lr_at(epoch * ipe - 1, offset),
            'train_loss': loss_at(epoch * ipe - 1, offset), 'val_loss': loss_at(epoch * ipe, offset),
            'train_top1': acc_at(epoch, 'train', 1, offset), 'train_top5': acc_at(epoch, 'train', 5, offset),
            'val_top1': acc_at(epoch, 'val', 1, offset), 'val_top5': acc_at(epoch, 'val', 5, offset),
            'epoch_time_s': 10.0 + epoch, 'images_per_s': 100.0 * epoch, 'peak_memory_mb': 50.0 + epoch}


def write_events(run_dir, first_epoch, last_epoch, ipe=6, print_freq=2, offset=0.0, partial_iters=0):
    """Log 0-based epochs first_epoch..last_epoch-1 as main.py does, then `partial_iters`
    iterations of the next epoch (a run killed mid-epoch)."""
    writer = SummaryWriter(run_dir)
    for epoch in range(first_epoch, last_epoch + (1 if partial_iters else 0)):
        for i in range(partial_iters if epoch == last_epoch else ipe):
            if i % print_freq == 0:
                step = epoch * ipe + i
                writer.add_scalar(rr.TAG_TRAIN_LOSS, loss_at(step, offset), step)
                writer.add_scalar(rr.TAG_LR, lr_at(step, offset), step)
        if epoch == last_epoch:
            break
        rec = epoch_record(epoch + 1, ipe, offset)
        for k in (1, 5):
            writer.add_scalars(TOPK[k], {'train': rec[f'train_top{k}']}, epoch + 1)
            writer.add_scalars(TOPK[k], {'val': rec[f'val_top{k}']}, epoch + 1)
        writer.add_scalar(rr.TAG_VAL_LOSS, rec['val_loss'], epoch + 1)
        writer.add_scalar(rr.TAG_IMAGES_PER_S, rec['images_per_s'], epoch + 1)
        writer.add_scalar(rr.TAG_EPOCH_TIME, rec['epoch_time_s'], epoch + 1)
        writer.add_scalar(rr.TAG_PEAK_MEMORY, rec['peak_memory_mb'], epoch + 1)
    writer.close()


def write_summary(run_dir, records, ipe=6, planned=None, status='finished', name=None, **extra):
    with_val = [r for r in records if r.get('val_top1') is not None]
    best = max(with_val, key=lambda r: r['val_top1']) if with_val else None
    summary = {'run_dir': run_dir, 'name': name, 'status': status,
               'args': {'epochs': planned, 'batch_size': 8, 'lr': 0.1},
               'arch': 'SimpleNet', 'num_params': 12345, 'device': 'cpu',
               'iters_per_epoch': ipe, 'epochs_planned': planned or len(records),
               'epochs': records, 'best_epoch': best and best['epoch'],
               'best_acc1': best and best['val_top1'],
               'wall_time_s': sum(r['epoch_time_s'] for r in records)}
    summary.update(extra)
    with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f)
    return summary


def make_run(run_dir, epochs, ipe=6, print_freq=2, name=None, **extra):
    """A finished run of `epochs` epochs."""
    os.makedirs(run_dir, exist_ok=True)
    write_events(run_dir, 0, epochs, ipe, print_freq)
    return write_summary(run_dir, [epoch_record(e, ipe) for e in range(1, epochs + 1)],
                         ipe, name=name, **extra)


def make_resumed_run(run_dir, ipe=6, print_freq=2, offset=100.0):
    """Killed during epoch 4 after 3 epochs, resumed from the epoch-2 checkpoint, run to 5:
    steps of epochs 3 and 4 are written twice and the resumed session's values must win."""
    os.makedirs(run_dir, exist_ok=True)
    write_events(run_dir, 0, 3, ipe, print_freq, partial_iters=3)
    write_events(run_dir, 2, 5, ipe, print_freq, offset=offset)
    records = [epoch_record(e, ipe) for e in (1, 2)] + [epoch_record(e, ipe, offset) for e in (3, 4, 5)]
    return write_summary(run_dir, records, ipe, name='resumed')
