"""Resuming a training run: the training state to go on from, in one step (resume).

An exact resume (this toolkit's checkpoint of an unfinished run) restores the weights, the
optimizer, the schedule and the loss scale, and the run folder's files; a checkpoint
without a plan (the handout's, bare weights) gives its weights and, where it fits, its
optimizer state. main.py calls resume() once, after the run folder is open.
"""
from toolkit import run_folder
from toolkit import run_record as rr
from toolkit.distributed import world
from toolkit.networks import load_model_state
from toolkit.run_plan import ends_the_run, planned_epochs, print_extension
from utils import one_line


def resume(plan, ckpt, exact, learner, run_dir, summary, model_named):
    """The training state to go on from, in one step: (start epoch, best so far
    {'epoch', 'acc1', 'weights'}). A new run starts at --start-epoch; an exact resume
    restores the learner and the run's files (summary included) from the checkpoint, and
    returns start epoch None where the checkpoint already holds the run's last epoch (a run
    killed between its last checkpoint and its summary: the summary is completed); a
    checkpoint without a plan gives its weights (restore_weights; model_named: the file
    or the flags said which model they are for, run_plan.names_the_model)."""
    best = {'epoch': None, 'acc1': None, 'weights': None}
    if ckpt is None or not exact:
        if ckpt is not None:
            restore_weights(learner, ckpt, plan, model_named)
        return plan.start_epoch, best
    restore_training_state(learner, ckpt, plan)
    run_folder.restore_run_files(ckpt, plan.resume, run_dir, summary, best)
    planned = planned_epochs(ckpt, plan.epochs)
    if ends_the_run(plan.epochs, ckpt):
        summary['status'] = rr.FINISHED
        run_folder.write_summary(run_dir, summary)
        print(f'=> the run had finished its {planned} epochs; its files are consistent now')
        return None, best
    print_extension(plan, planned, ckpt.epoch, summary['iters_per_epoch'])
    return ckpt.epoch, best


def restore_training_state(learner, ckpt, plan):
    """Weights, optimizer, schedule and loss scale as the checkpoint left them."""
    load_model_state(learner.model, ckpt.state_dict, plan.resume, plan.arch)
    learner.optimizer.load_state_dict(ckpt.optimizer)
    learner.scheduler.load_state_dict(ckpt.scheduler)
    if learner.scaler is not None and ckpt.scaler:  # fp16: the scale it had reached
        learner.scaler.load_state_dict(ckpt.scaler)
    if learner.ema is not None and ckpt.ema_state_dict is not None:  # --ema: its average
        learner.ema.load_state_dict(ckpt.ema_state_dict)
    # the lr of the schedule's closed form at this iteration: it differs from the saved
    # one when --epochs extends the run
    scheduler = learner.scheduler
    for group, base_lr, factor in zip(learner.optimizer.param_groups, scheduler.base_lrs,
                                      scheduler.lr_lambdas):
        group['lr'] = base_lr * factor(scheduler.last_epoch)
    saved_world = ckpt.plan.get('world_size', 1)
    if saved_world != world().size:
        print(f'note: the run was trained by {saved_world} process(es), now by '
              f'{world().size}: the global batches are the same, but BatchNorm statistics '
              f'are per process, so the rest will not equal an uninterrupted run exactly')
    print(f"=> resumed '{plan.resume}' at epoch {ckpt.epoch} (best Acc@1 "
          f"{ckpt.best_acc1:.2f})")


def restore_weights(learner, ckpt, plan, model_named):
    """The weights of a checkpoint without a plan (run_plan.from_weights), and its
    optimizer state where it has one that fits the model; the optimizer keeps the flags'
    hyperparameters and the schedule's learning rate at the start epoch."""
    load_model_state(learner.model, ckpt.state_dict, plan.resume, plan.arch, model_named)
    if ckpt.optimizer is None:
        return
    optimizer = learner.optimizer
    ours = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt.optimizer)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"note: the optimizer state of '{plan.resume}' does not fit ({one_line(exc)}): "
              f"the weights are kept, the optimizer starts afresh")
        return
    for group, settings in zip(optimizer.param_groups, ours):
        group.update(settings)
