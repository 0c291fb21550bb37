"""The run plan: what a run is asked to do, checked before any work starts, and what a
resume may change.

A new training run takes its plan from the flags (check_args, settle_new_run). A resumed
run continues its checkpoint's own plan: the PLAN flags come from the checkpoint, and a
flag given with another value is refused, except a larger --epochs, which extends the run
(adopt_checkpoint_plan). -e and -a take the model, its class count and the speed settings
that change the numbers from the checkpoint (adopt_evaluation_plan).
"""
import argparse
import math
import os
import random

import torch

from toolkit import run_record as rr
from toolkit.distributed import check_global_batch, launch_size
from toolkit.networks import ARCHS, check_arch
from student_code import cnn_models, vit_models, default_cnn_model, default_vit_model
from toolkit.run_folder import run_dir_of_checkpoint
from utils import UsageError, CheckpointError, warmup_cosine_factor

# the flags that define a training run: --resume takes them from the checkpoint
PLAN = ('epochs', 'warmup', 'batch_size', 'lr', 'weight_decay', 'momentum', 'arch',
        'num_classes', 'seed', 'clip_grad', 'adv_train', 'adv_steps', 'adv_eps', 'adv_ratio',
        'amp', 'channels_last', 'data_cache')


# the speed flags that change the numbers (PLAN above), and their value for a checkpoint
# written before they existed: fp32, contiguous, per-image (what that code did)
SPEED_PLAN = {'amp': False, 'channels_last': False, 'data_cache': False}


_NOT_GIVEN = object()


def given_flags(parser, argv, args):
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


def names_the_model(ckpt, given):
    """The checkpoint (its arch or the handout's model_arch) or the flags (--arch,
    --use-vit, --use-resnet18) say which model its weights are for; otherwise the model
    built for bare weights is only a guess, and a refusal says how to name it."""
    return ckpt.names_its_model or bool(given & {'arch', 'use_vit', 'use_resnet18'})


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
    for flag, value in (('--lr', args.lr), ('--momentum', args.momentum),
                        ('--wd', args.weight_decay), ('--clip-grad', args.clip_grad),
                        ('--attack-eps', args.attack_eps),
                        ('--attack-step-size', args.attack_step_size),
                        ('--adv-eps', args.adv_eps), ('--adv-ratio', args.adv_ratio)):
        # argparse's float() takes 'nan' and 'inf': a run would fail on them much later
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if args.seed is not None and not 0 <= args.seed < SEED_LIMIT:
        # torch.manual_seed takes 64 bits, and seed_epoch multiplies the seed by 1000
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.name is not None and not is_one_path_component(args.name):
        raise UsageError(f"--name {args.name!r} must be one folder name (no '/', not '.' or "
                         f"'..'): it becomes the suffix of the run folder's name")
    if 'gpu' in given and args.gpu >= 0 and args.device == 'auto' and not args.use_mps \
            and not torch.cuda.is_available():
        raise UsageError(f"--gpu {args.gpu}: CUDA is not available on this machine (--gpu -1 "
                         f"or --device cpu runs on the CPU)")
    if not (args.evaluate or args.attack or args.resume) and args.start_epoch >= args.epochs:
        raise UsageError(f"--start-epoch {args.start_epoch} leaves no epoch to train: --epochs "
                         f"is {args.epochs} (the run would stop at epoch {args.epochs})")
    if not args.momentum < 1:  # at 1 a step never forgets a gradient: the run drifts off
        raise UsageError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not (args.evaluate or args.attack or args.resume) and args.warmup >= args.epochs:
        raise UsageError(f"--warmup ({args.warmup}) must be smaller than --epochs ({args.epochs})")
    if args.adv_train and not 0 < args.adv_ratio <= 1:
        raise UsageError(f"--adv-ratio must be in (0, 1], got {args.adv_ratio}")
    if not (args.evaluate or args.attack) and (not args.resume or 'batch_size' in given):
        # under torchrun: refused by every process before any loads anything (a resumed
        # run's batch comes from its checkpoint: distributed.per_process_batch checks it)
        check_global_batch(args.batch_size, launch_size())


SEED_LIMIT = 2 ** 32


def is_one_path_component(name):
    """A run name makes LOGDIR/exp_<timestamp>_<name>: a separator would put the run
    folder elsewhere (outside LOGDIR with '../'), or nest it where report.py does not look."""
    separators = [os.sep] + ([os.altsep] if os.altsep else []) + ['/']
    return name not in ('', '.', '..') and not any(sep in name for sep in separators) \
        and '\0' not in name


# the handout's learning rate, and the batch it belongs to
HANDOUT_LR, HANDOUT_BATCH = 0.1, 256


def settle_new_run(args, given):
    """Fill in what a new training run's flags leave open: the model (or the one a
    checkpoint without a plan named: adopt_weights), its gradient clipping (the ViT by
    default, a CNN only when --clip-grad is given), the learning rate, the seed."""
    args.arch = requested_arch(args) or args.arch or \
        registry_name(default_cnn_model, cnn_models, 'default_cnn_model')
    if ARCHS[args.arch] != 'vit' and 'clip_grad' not in given:
        args.clip_grad = 0.0
    if 'lr' not in given:
        args.lr = scaled_lr(args.batch_size)
    if args.seed is None:  # draw one, and record it so that the run can be replayed
        args.seed = random.SystemRandom().randrange(2 ** 31)


def scaled_lr(batch_size):
    """The handout's lr 0.1 belongs to its batch of 256: at a smaller batch the same lr
    is a larger step per image, and SimpleNet diverged at batch 64 (docs/benchmarks.md,
    "Learning rate and batch size"). Scaled linearly to the (global) batch, as timm does
    when --lr is not given: 0.1 x batch / 256. The start line says so."""
    lr = HANDOUT_LR * batch_size / HANDOUT_BATCH
    if batch_size != HANDOUT_BATCH:
        print(f'=> lr {lr:g}: the handout\'s {HANDOUT_LR:g} is for its batch of '
              f'{HANDOUT_BATCH}, scaled to -b {batch_size} ({HANDOUT_LR:g} x {batch_size} / '
              f'{HANDOUT_BATCH}); --lr sets it')
    return lr


def adopt_checkpoint_plan(args, given, ckpt, path):
    """Resume continues the run's own plan: every PLAN flag comes from the checkpoint;
    one given on the command line with another value is refused, except a larger
    --epochs, which extends the run."""
    saved = dict(ckpt.plan, arch=ckpt.arch)
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
    check_arch(args.arch, path)
    fill_speed_plan(args, saved, given)
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
    if ckpt.kind == 'best' or os.path.basename(path) == rr.BEST:
        raise UsageError(f"'{path}' is the best model of its run, not a point to continue "
                         f"training from: evaluate it with -e, attack it with -a, or continue "
                         f"the run from its {rr.CHECKPOINT}")
    if run_finished:
        raise UsageError(f"the run of '{path}' finished all its {planned} epochs: evaluate it "
                         f"with -e or attack it with -a (use model_best.pth.tar), or train it "
                         f"longer with --epochs N (N > {planned})")


def ends_the_run(args, ckpt, planned):
    """The checkpoint holds the run's last epoch, and --epochs does not extend it."""
    return ckpt.epoch >= planned and args.epochs == planned


def finished_cleanly(args, ckpt, planned):
    """The checkpoint holds the run's last epoch and its summary says so."""
    if not ends_the_run(args, ckpt, planned):
        return False
    run_dir = run_dir_of_checkpoint(args.resume)
    return run_dir is not None and rr.read_summary(run_dir).get('status') == rr.FINISHED


def print_extension(args, planned, start_epoch, n_iters):
    """Where --epochs extends a resumed run, say how the learning rate changes."""
    if args.epochs == planned:
        return
    it = start_epoch * n_iters
    old = args.lr * warmup_cosine_factor(it, args.warmup * n_iters, planned * n_iters)
    new = args.lr * warmup_cosine_factor(it, args.warmup * n_iters, args.epochs * n_iters)
    print(f'=> extending the run from {planned} to {args.epochs} epochs: the cosine now ends '
          f'at epoch {args.epochs}, so the learning rate at epoch {start_epoch} goes from '
          f'{old:.6g} to {new:.6g} and decays from there')


def fill_speed_plan(args, saved, given):
    """The speed flags that change the numbers (SPEED_PLAN) of a checkpoint's run, where
    the command line does not give them; a checkpoint written before a flag existed ran
    without it."""
    for key, before_flags in SPEED_PLAN.items():
        if key not in given:
            setattr(args, key, saved.get(key, before_flags))


def adopt_evaluation_plan(args, given, ckpt):
    """-e/-a: the checkpoint's architecture (the flags may only confirm it), its class
    count unless --num-classes is given, and its run's speed settings (its validation
    numbers). Returns where the class count comes from, for settle_num_classes."""
    saved = ckpt.plan
    arch, requested = ckpt.arch, requested_arch(args)
    if requested is not None and arch is not None and requested != arch:
        raise CheckpointError(f"'{args.resume}' holds a '{arch}' model, but the flags build "
                              f"'{requested}'")
    args.arch = arch or requested or handout_arch(ckpt, args.resume) or \
        registry_name(default_cnn_model, cnn_models, 'default_cnn_model')
    check_arch(args.arch, args.resume)
    args.num_classes = args.num_classes or saved.get('num_classes') or \
        classifier_size(ckpt.state_dict)
    fill_speed_plan(args, saved, given)
    return '--num-classes' if 'num_classes' in given else 'the checkpoint'


################################################################################
# Checkpoints without this toolkit's plan: the handout's main.py, bare state dicts
################################################################################
def classifier_size(state_dict):
    """The class count of a model's weights: the outputs of its last layer (None where no
    tensor has a dimension: the labels then count the classes)."""
    return next((v.shape[0] for v in reversed(list(state_dict.values()))
                 if torch.is_tensor(v) and v.ndim >= 1), None)


def handout_arch(ckpt, path):
    """The --arch name of the handout's 'model_arch' ('vit': the default ViT; any other
    that is an --arch name as it is), or None where the checkpoint names no model."""
    name = ckpt.model_arch
    if name is None:
        return None
    if name == 'vit':
        return registry_name(default_vit_model, vit_models, 'default_vit_model')
    if name not in ARCHS:
        raise CheckpointError(f"'{path}' names its model '{name}', which is no --arch name "
                              f"({', '.join(sorted(ARCHS))}): say which it is with --arch")
    return name


def adopt_weights(args, given, ckpt, path):
    """--resume of a checkpoint without what exact resumption needs (Checkpoint.missing_for_resume):
    a new run of the flags' plan that starts from its weights, its optimizer state and
    its epoch where it has them (the learning rate fast-forwarded to that epoch, as with
    --start-epoch), saying in one line what is missing. The model is --arch's, else the
    checkpoint's model_arch; the class count its classifier's unless --num-classes is
    given."""
    args.arch = requested_arch(args) or handout_arch(ckpt, path) or args.arch
    settle_new_run(args, given)
    check_arch(args.arch, path)
    if 'num_classes' not in given:
        args.num_classes = classifier_size(ckpt.state_dict)
    args.start_epoch = ckpt.epoch or 0
    if args.start_epoch >= args.epochs:
        raise UsageError(f"'{path}' is at epoch {args.start_epoch}: --epochs {args.epochs} "
                         f"leaves no epoch to train (give --epochs N, N > {args.start_epoch})")
    kept = ['weights'] + (['optimizer state'] if ckpt.optimizer is not None else [])
    print(f"note: '{path}' has no {', '.join(ckpt.missing_for_resume())}, which exact "
          f"resumption needs: a new run starts from its {' and '.join(kept)} at epoch "
          f"{args.start_epoch}, with the flags' plan ({args.arch}, --epochs {args.epochs})")


class RunPlan(argparse.Namespace):
    """A run's configuration once it is resolved: every flag as parsed, and what the
    checkpoint, the data and the device settled (architecture, lr, seed, class count,
    speed settings and amp dtype, the cache, the world size). Read-only: every function
    after main.py's resolution reads it, none may change it. vars() gives what the
    checkpoint and summary.json store as the run's args."""

    def __setattr__(self, name, value):
        raise AttributeError(f"the run plan is resolved and read-only: '{name}' cannot be "
                             f"changed after run_plan.freeze (settle it before)")

    def __delattr__(self, name):
        self.__setattr__(name, None)


def freeze(args):
    """The resolved flags as a RunPlan (a copy: args itself stays as it was)."""
    plan = RunPlan()
    for key, value in vars(args).items():
        object.__setattr__(plan, key, value)
    return plan

