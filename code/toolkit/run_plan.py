"""The run plan: every setting of a run decided once, by resolve, into a frozen RunPlan.

resolve turns the parsed flags (read-only), the checkpoint (--resume, -e, -a), the data
and the device into the plan, and records where each value came from: 'flag',
'default', 'checkpoint', 'rule: ...', 'auto: ...' (the device's measured best) or
'fell back: ...'. Nothing writes into the flags, and nothing changes the plan after.
Every check of a value applies to the resolved plan, so it holds on every path (a new
run, a resume, the handout's checkpoint, bare weights, -e and -a).

    a new run          the flags; the rules fill what they leave open
    an exact resume    the run's own plan from its checkpoint (settings.KEEP rows; a flag
                       given with another value is refused, but a larger --epochs)
    other checkpoints  (the handout's, bare weights) a new run of the flags' plan from
                       their weights, at their epoch
    -e / -a            the checkpoint's model, class count and speed settings
"""
import inspect
import os
import random
import types

import torch

from toolkit import run_record as rr
from toolkit import settings
from toolkit.distributed import check_global_batch, launch_size, world
from toolkit.loaders import VAL_BATCH, cache_fallback, class_count
from toolkit.networks import ARCHS, check_arch
from toolkit.run_folder import run_dir_of_checkpoint
from toolkit.settings import KEEP, GROW, FOLLOW, flag_name
from toolkit import speed
from student_code import cnn_models, vit_models, default_cnn_model, default_vit_model
from utils import UsageError, CheckpointError, warmup_cosine_factor

# the handout's learning rate, and the batch it belongs to
HANDOUT_LR, HANDOUT_BATCH = 0.1, 256


def resolve(flags, given, ckpt, datasets, device):
    """The run's RunPlan. flags: the read-only parsed flags; given: the dests written on
    the command line; ckpt: the --resume checkpoint (or None); datasets: {'val', and
    'train' unless -e/-a}; device: where it runs."""
    values = {s.dest: getattr(flags, s.dest) for s in settings.SETTINGS}
    sources = {s.dest: 'flag' if s.dest in given else 'default' for s in settings.SETTINGS}

    def decide(dest, value, source):
        values[dest], sources[dest] = value, source

    if flags.resume and os.path.isdir(flags.resume):  # a run folder: its best model
        decide('resume', rr.checkpoint_path(flags.resume, rr.BEST), "rule: the run folder's "
               "best model")
    path, requested = values['resume'], requested_arch(flags)
    if flags.evaluate or flags.attack:
        from_evaluated_checkpoint(decide, values, given, requested, ckpt, path)
    elif ckpt is not None and is_exact(ckpt):
        from_run_checkpoint(decide, values, given, requested, ckpt, path)
    else:
        if ckpt is not None:
            from_weights(decide, values, given, requested, ckpt, path)
        recipe_rules(decide, values, given)
        new_run_rules(decide, values, given, requested)
    for dest, value in values.items():    # the flags were checked; these came from a file
        if sources[dest] == 'checkpoint':
            settings.check_value(dest, value, path)
    classes_from = '--num-classes' if sources['num_classes'] == 'flag' else 'the checkpoint'
    decide('num_classes', class_count(values['num_classes'], classes_from, datasets),
           sources['num_classes'] if values['num_classes'] else 'data: largest label + 1')
    speed_rules(decide, values, sources, device, datasets, training='train' in datasets)
    check_plan(values, sources, datasets)
    amp_dtype = speed.amp_dtype_for(device) if values['amp'] else None
    return settings.RunPlan(**values, amp_dtype=amp_dtype,
                            world_size=world().size, val_batch_size=VAL_BATCH,
                            sources=types.MappingProxyType(sources))


def check_flags(flags, given):
    """Every flag given, checked against its row (settings.check_value), and the
    combinations that cannot run: one line each, before any work starts."""
    for dest in given:
        settings.check_value(dest, getattr(flags, dest))
    if flags.evaluate and flags.attack:
        raise UsageError("-e/--evaluate and -a/--attack are exclusive: run them one at a time")
    if (flags.evaluate or flags.attack) and not flags.resume:
        raise UsageError(f"{'-e' if flags.evaluate else '-a'} needs a trained model: "
                         f"add --resume=PATH/TO/model_best.pth.tar")
    if flags.use_vit and flags.use_resnet18:
        raise UsageError("--use-vit and --use-resnet18 are exclusive")
    wanted = requested_arch(flags)
    if flags.arch and wanted != flags.arch:
        raise UsageError(f"--arch {flags.arch} contradicts "
                         f"{'--use-vit' if flags.use_vit else '--use-resnet18'}")
    if flags.use_custom_conv and wanted in vit_models:
        raise UsageError("--use-custom-conv swaps the convolutions of CNNs, not of the ViT")
    if flags.compile and (flags.evaluate or flags.attack):
        raise UsageError(f"--compile is for training: {'-e' if flags.evaluate else '-a'} runs "
                         f"the model eagerly (one pass over the validation set does not repay "
                         f"the compilation)")
    if flags.resume and 'start_epoch' in given:
        raise UsageError("--start-epoch cannot be combined with --resume: the checkpoint "
                         "says where the run continues")
    if flags.name is not None and not is_one_path_component(flags.name):
        raise UsageError(f"--name {flags.name!r} must be one folder name (no '/', not '.' or "
                         f"'..'): it becomes the suffix of the run folder's name")
    check_device_flags(flags, given)
    if not (flags.evaluate or flags.attack) and (not flags.resume or 'batch_size' in given):
        # under torchrun: refused by every process before any loads anything (a resumed
        # run's batch comes from its checkpoint: checked again on the plan)
        check_global_batch(flags.batch_size, launch_size())


def check_device_flags(flags, given):
    """--gpu names a CUDA device: it cannot also say CPU, MPS or another device."""
    if 'gpu' not in given or flags.gpu < 0:
        return
    if flags.device != 'auto' and flags.device != f'cuda:{flags.gpu}':
        raise UsageError(f"--gpu {flags.gpu} picks a CUDA device, but --device {flags.device} "
                         f"says where to run: give one of them (--device cuda:{flags.gpu} is "
                         f"--gpu {flags.gpu})")
    if flags.use_mps:
        raise UsageError(f"--gpu {flags.gpu} picks a CUDA device, but --use-mps asks for Apple "
                         f"MPS: give one of them")
    if not torch.cuda.is_available():
        raise UsageError(f"--gpu {flags.gpu}: CUDA is not available on this machine (--gpu -1 "
                         f"or --device cpu runs on the CPU)")


def check_plan(values, sources, datasets):
    """The checks between settings, on the resolved values: one line each, which says
    where a value came from when no flag gave it (a recipe, a checkpoint, a rule)."""
    def said(dest):
        text = f"{settings.flag_name(dest)} {values[dest]}"
        return text if sources[dest] == 'flag' else f"{text} ({sources[dest]})"
    epochs, training = values['epochs'], 'train' in datasets
    if training and values['start_epoch'] >= epochs:
        raise UsageError(f"{said('start_epoch')} leaves no epoch to train: --epochs is "
                         f"{epochs} (the run would stop at epoch {epochs})")
    if training and values['warmup'] >= epochs:
        raise UsageError(f"{said('warmup')} must be smaller than {said('epochs')}")
    if values['adv_train'] and not 0 < values['adv_ratio'] <= 1:
        raise UsageError(f"--adv-ratio must be in (0, 1], got {values['adv_ratio']}")
    if training and values['batch_size'] > len(datasets['train']):
        raise UsageError(f"{said('batch_size')} is larger than the training set "
                         f"({len(datasets['train'])} images): every batch would be dropped")
    if training:
        check_global_batch(values['batch_size'], world().size)


def is_one_path_component(name):
    """A run name makes LOGDIR/exp_<timestamp>_<name>: a separator would put the run
    folder elsewhere (outside LOGDIR with '../'), or nest it where report.py does not look."""
    separators = [os.sep] + ([os.altsep] if os.altsep else []) + ['/']
    return name not in ('', '.', '..') and not any(sep in name for sep in separators) \
        and '\0' not in name


################################################################################
# The model
################################################################################
def registry_name(builder, models, which):
    for name, model in models.items():
        if model is builder:
            return name
    raise UsageError(f"student_code.{which} ({getattr(builder, '__name__', builder)}) is not "
                     f"registered: add a line for it to "
                     f"student_code.{'vit' if 'vit' in which else 'cnn'}_models")


def requested_arch(flags):
    """The --arch name the flags ask for (None: they leave it open)."""
    if flags.use_resnet18:
        return 'resnet18'
    if flags.use_vit:
        return registry_name(default_vit_model, vit_models, 'default_vit_model')
    return flags.arch


def default_arch():
    return registry_name(default_cnn_model, cnn_models, 'default_cnn_model')


def names_the_model(ckpt, given):
    """The checkpoint (its arch or the handout's model_arch) or the flags (--arch,
    --use-vit, --use-resnet18) say which model its weights are for; otherwise the model
    built for bare weights is only a guess, and a refusal says how to name it."""
    return ckpt.names_its_model or bool(given & {'arch', 'use_vit', 'use_resnet18'})


################################################################################
# The rules of a new run
################################################################################
def new_run_rules(decide, values, given, requested):
    """Fill in what a new training run's flags leave open: the model, its gradient
    clipping (the ViT by default, a CNN only when --clip-grad is given), the learning
    rate, the seed. requested: the model the flags name (requested_arch)."""
    if requested is not None:
        decide('arch', requested, 'flag')
    elif values['arch'] is None:   # (a handout checkpoint may have named it: from_weights)
        decide('arch', default_arch(), 'rule: student_code.default_cnn_model')
    if ARCHS[values['arch']] != 'vit' and 'clip_grad' not in given:
        decide('clip_grad', 0.0, 'rule: CNNs train unclipped unless --clip-grad is given')
    elif 'clip_grad' not in given:
        decide('clip_grad', settings.BY_DEST['clip_grad'].handout, 'rule: the ViT clips at 1.0')
    if 'lr' not in given:
        batch = values['batch_size']
        decide('lr', scaled_lr(batch), f'rule: {HANDOUT_LR:g} x {batch} / {HANDOUT_BATCH}')
    if values['seed'] is None:  # draw one, and record it so that the run can be replayed
        decide('seed', random.SystemRandom().randrange(2 ** 31), 'rule: drawn at random')


def recipe_rules(decide, values, given):
    """--recipe: its values (settings.RECIPES) for the settings the flags leave open."""
    for dest, value in settings.RECIPES[values['recipe']].items():
        if dest not in given:
            decide(dest, value, f"rule: --recipe {values['recipe']}")


def scaled_lr(batch_size):
    """The handout's lr 0.1 belongs to its batch of 256: at a smaller batch the same lr
    is a larger step per image, and SimpleNet diverged at batch 64 (docs/benchmarks.md,
    "Learning rate and batch size"). Scaled linearly to the (global) batch, as timm does
    when --lr is not given: 0.1 x batch / 256. The start line says so."""
    return HANDOUT_LR * batch_size / HANDOUT_BATCH


def speed_rules(decide, values, sources, device, datasets, training):
    """The speed settings still open (None: auto) get the device's measured best for the
    model; a cache that cannot serve the run falls back to the per-image path."""
    for key, (value, why) in speed.auto_speed_settings(device, values['arch']).items():
        if values[key] is None:
            if key == 'compile' and not training:
                why = '-e and -a run the model eagerly'
            decide(key, value, f'auto: {why}')
    if values['data_cache']:
        asked = not sources['data_cache'].startswith('auto: ')
        reason = cache_fallback(values['data_folder'], values['rebuild_cache'], datasets,
                                asked)
        if reason is not None:
            decide('data_cache', False, 'fell back: ' + (
                f'--data-cache asked for, but {reason}' if asked else reason))


################################################################################
# Checkpoints: an exact resume, the handout's files and bare weights, -e and -a
################################################################################
def is_exact(ckpt):
    """This toolkit's checkpoint (its best model is refused for training later); the
    handout's checkpoint and bare weights lack what an exact resume needs."""
    return ckpt.kind == 'best' or not ckpt.missing_for_resume()


def from_run_checkpoint(decide, values, given, requested, ckpt, path):
    """Resume continues the run's own plan: every KEEP setting comes from the checkpoint;
    one given on the command line with another value is refused, except a larger
    --epochs (GROW), which extends the run. FOLLOW settings are the run's unless given."""
    saved = dict(ckpt.plan, arch=ckpt.arch)
    if requested is not None:
        decide('arch', requested, 'flag')
        given = given | {'arch'}
    for s in settings.SETTINGS:
        stored = saved.get(s.dest, s.before)
        if s.resume is None or stored is None:
            continue  # an older checkpoint without it: the flag's value stands
        if s.dest in given and values[s.dest] != stored:
            if s.resume == FOLLOW or (s.resume == GROW and values[s.dest] > stored):
                continue
            refuse_change(s, values[s.dest], stored, path)
        if s.dest not in given:
            decide(s.dest, stored, 'checkpoint')
    check_arch(values['arch'], path)
    if 'compile' in given and saved.get('compile') is not None and \
            values['compile'] != saved['compile']:
        print(f"note: the run was trained {'with' if saved['compile'] else 'without'} "
              f"--compile: the compiled and the eager model differ in the last bits, so the "
              f"rest of the run will not equal an uninterrupted one exactly")
    if saved.get('use_custom_conv') and not values['use_custom_conv']:
        print('note: the checkpoint was trained with --use-custom-conv; continuing with '
              'nn.Conv2d (the weights are interchangeable)')
    refuse_unresumable(ckpt, path, planned_epochs(ckpt, values['epochs']),
                       finished_cleanly(values['epochs'], ckpt, path))


def refuse_change(setting, value, stored, path):
    flag = flag_name(setting.dest)
    if isinstance(stored, bool):  # --amp / --no-amp
        no = flag.replace('--', '--no-')
        raise UsageError(f"{no if stored else flag}: the run in '{path}' was trained with "
                         f"{flag if stored else no}; resume keeps the run's plan (start a new "
                         f"run to change it)")
    raise UsageError(f"{flag} {value} differs from the run's {stored} in '{path}': resume "
                     f"keeps the run's plan (start a new run to change it; only --epochs can "
                     f"grow, to extend the run)")


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


def planned_epochs(ckpt, epochs):
    """The epochs the checkpoint's run planned (`epochs`, the plan's, where it has none)."""
    return ckpt.plan.get('epochs', epochs)


def ends_the_run(epochs, ckpt):
    """The checkpoint holds the run's last epoch, and --epochs does not extend it."""
    planned = planned_epochs(ckpt, epochs)
    return ckpt.epoch >= planned and epochs == planned


def finished_cleanly(epochs, ckpt, path):
    """The checkpoint holds the run's last epoch and its summary says so."""
    if not ends_the_run(epochs, ckpt):
        return False
    run_dir = run_dir_of_checkpoint(path)
    return run_dir is not None and rr.read_summary(run_dir).get('status') == rr.FINISHED


def print_extension(plan, planned, start_epoch, n_iters):
    """Where --epochs extends a resumed run, say how the learning rate changes."""
    if plan.epochs == planned:
        return
    it = start_epoch * n_iters
    old = plan.lr * warmup_cosine_factor(it, plan.warmup * n_iters, planned * n_iters)
    new = plan.lr * warmup_cosine_factor(it, plan.warmup * n_iters, plan.epochs * n_iters)
    print(f'=> extending the run from {planned} to {plan.epochs} epochs: the cosine now ends '
          f'at epoch {plan.epochs}, so the learning rate at epoch {start_epoch} goes from '
          f'{old:.6g} to {new:.6g} and decays from there')


def from_evaluated_checkpoint(decide, values, given, requested, ckpt, path):
    """-e/-a: the checkpoint's architecture (the flags may only confirm it), its class
    count unless --num-classes is given, and its run's other settings that change what
    they compute (KEEP rows that -e/-a use: the speed settings) unless given."""
    saved = ckpt.plan
    arch = ckpt.arch
    if requested is not None and arch is not None and requested != arch:
        raise CheckpointError(f"'{path}' holds a '{arch}' model, but the flags build "
                              f"'{requested}'")
    if arch is not None:
        decide('arch', arch, 'checkpoint')
    else:
        handout = handout_arch(ckpt, path)
        decide('arch', requested or handout or default_arch(),
               'flag' if requested else 'checkpoint' if handout else
               'rule: student_code.default_cnn_model')
    check_arch(values['arch'], path)
    if 'num_classes' not in given:
        decide('num_classes', saved.get('num_classes') or classifier_size(ckpt.state_dict),
               'checkpoint')
    for s in settings.SETTINGS:  # the run's settings that change what -e/-a compute
        stored = saved.get(s.dest, s.before)
        if s.resume == KEEP and s.evaluation and s.dest not in given and stored is not None \
                and s.dest not in ('arch', 'num_classes'):
            decide(s.dest, stored, 'checkpoint')
    for dest, value in attack_defaults().items():
        if values[dest] is None:
            decide(dest, value, "rule: student_code.default_attack's")


def attack_defaults():
    """{--attack-* dest: the value student_code.default_attack takes when not given}."""
    from student_code import default_attack   # at call time: a grader may replace it
    params = inspect.signature(default_attack).parameters
    names = {'attack_steps': 'num_steps', 'attack_step_size': 'step_size',
             'attack_eps': 'epsilon'}
    return {dest: params[name].default for dest, name in names.items()
            if name in params and params[name].default is not inspect.Parameter.empty}


def classifier_size(state_dict):
    """The class count of a model's weights: the outputs of its classifier, the last
    weight matrix or convolution (a trailing 1-d tensor is a bias or a buffer, not a
    classifier); None where there is none (the labels then count the classes)."""
    return next((v.shape[0] for v in reversed(list(state_dict.values()))
                 if torch.is_tensor(v) and v.ndim >= 2), None)


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


def from_weights(decide, values, given, requested, ckpt, path):
    """--resume of a checkpoint without what exact resumption needs
    (Checkpoint.missing_for_resume): a new run of the flags' plan that starts from its
    weights, its optimizer state and its epoch where it has them (the learning rate
    fast-forwarded to that epoch, as with --start-epoch), saying in one line what is
    missing. The model is --arch's, else the checkpoint's model_arch; the class count
    its classifier's unless --num-classes is given."""
    if requested is not None:      # the flags name the model: the file's name is not read
        decide('arch', requested, 'flag')
    elif (handout := handout_arch(ckpt, path)) is not None:
        decide('arch', handout, 'checkpoint')
    if values['arch'] is not None:
        check_arch(values['arch'], path)
    if 'num_classes' not in given:
        decide('num_classes', classifier_size(ckpt.state_dict), 'checkpoint')
    decide('start_epoch', ckpt.epoch or 0, 'checkpoint')
    if values['start_epoch'] >= values['epochs']:
        raise UsageError(f"'{path}' is at epoch {values['start_epoch']}: --epochs "
                         f"{values['epochs']} leaves no epoch to train (give --epochs N, "
                         f"N > {values['start_epoch']})")
    kept = 'weights' + (' (and optimizer state, where it fits the model)'
                        if ckpt.optimizer is not None else '')
    print(f"note: '{path}' has no {', '.join(ckpt.missing_for_resume())}, which exact "
          f"resumption needs: a new run starts from its {kept} at epoch "
          f"{values['start_epoch']}, with the flags' plan "
          f"({values['arch'] or default_arch()}, --epochs {values['epochs']})")


################################################################################
# What the start line says
################################################################################
def settings_line(plan):
    """The start line: every setting whose value differs from the handout's, or that was
    decided for this run (by a rule, the data or the checkpoint), with where it came from.
    The command's own flags (DIR, --resume, -e, -a, -v) are the command line; the speed
    settings have their line (speed.speed_line)."""
    parts = []
    for s in settings.SETTINGS:
        value, source = getattr(plan, s.dest), plan.sources[s.dest]
        if s.dest in speed.SPEED_SETTINGS or s.dest in COMMAND or value is None or value is False \
                or value == '':
            continue
        if value == s.handout or (s.handout is None and source == 'default'):
            continue
        shown = f'{value:g}' if isinstance(value, float) else value
        parts.append(f"{flag_name(s.dest).lstrip('-')} {shown} ({source})")
    return '=> settings: ' + (' | '.join(parts) if parts else "the handout's")


# the flags that say what the command does, not how: the command line shows them
COMMAND = ('data_folder', 'resume', 'evaluate', 'attack', 'vis')


def plan_from_argv(argv, device, datasets=None):
    """(the RunPlan main.py resolves for `argv` on `device` without a checkpoint, the
    datasets): how the tools and tests build a plan, through the same table and the same
    resolve, so that no caller makes one by hand."""
    flags, given = settings.parse(settings.build_parser(), argv)
    check_flags(flags, given)
    if datasets is None:
        from toolkit.loaders import load_datasets
        datasets = load_datasets(flags.data_folder, train=not (flags.evaluate or flags.attack))
    return resolve(flags, given, None, datasets, device), datasets
