"""Every setting of a run, declared once: one row of SETTINGS each.

A row says a setting's flag, type, default (or the rule that derives it, applied by
run_plan.resolve), bounds, help, what a resume does with it and whether -e/-a use it.
Everything else is made from the table: the command-line parser (build_parser), the
check of every value, given as a flag or stored in a checkpoint (check_value), the
fields of the frozen RunPlan, the kinds a checkpoint's stored settings must have, and
the start line's list of what differs from the handout. Adding a flag is adding a row.
"""
import argparse
import dataclasses
import math
import os
from typing import Optional

from toolkit.networks import ARCHS
from utils import CheckpointError, UsageError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# what a resume does with a setting: KEEP the run's value (another one given is refused),
# GROW (--epochs: only a larger value, which extends the run), FOLLOW (the run's value
# unless the flag is given); None: this invocation's own (workers, device, ...)
KEEP, GROW, FOLLOW = 'keep', 'grow', 'follow'


@dataclasses.dataclass(frozen=True)
class Setting:
    dest: str                      # the name in the plan, the checkpoint and summary.json
    flags: tuple                   # its command-line spellings ('' for the positional DIR)
    help: str
    kind: type = str               # int, float, bool or str
    default: object = None         # the parser's default (the handout's, for its flags)
    rule: Optional[str] = None     # how run_plan.resolve derives it when not given
    low: Optional[float] = None    # the smallest value allowed
    below: Optional[float] = None  # values must be smaller than this
    resume: Optional[str] = None   # KEEP, GROW, FOLLOW or None (above)
    before: object = None          # a KEEP value of a checkpoint older than the setting
                                   # (None: unknown, the flag's value stands)
    evaluation: bool = False       # -e/-a use it (their summary records only these)
    handout: object = None         # the handout's value (the start line says what differs)
    switch: bool = False           # --x / --no-x, default None (auto)
    choices: Optional[tuple] = None
    metavar: Optional[str] = None
    group: str = 'run'


H = "the handout's flags (names and defaults as in its main.py)"
RUN, ATTACK = 'model and run', 'attack (-a) and adversarial training'
RECIPE = 'recipe (off by default: the handout\'s recipe; docs/training.md)'
SPEED = "speed (auto by default: the device's measured best, said at start; docs/training.md)"
DIST = 'several processes (under torchrun; -b stays the global batch)'

# --recipe NAME: a named set of values for settings of the table, which a new run takes for
# each of them not given as a flag (run_plan.recipe_rules; the start line says 'rule:
# --recipe fast'); a resume keeps its run's values. 'handout' sets none. 'fast' is the
# short-budget recipe, decided with paired seeds on Fashion-MNIST and checked on the digit
# scans and the demo set (docs/training.md, "The fast recipe").
RECIPES = {
    'handout': {},
    'fast': {'warmup': 1, 'augment': 0.25, 'label_smoothing': 0.1, 'image_size': 64,
             'batch_size': 128},
}

SETTINGS = (
    Setting('data_folder', ('',), 'path to dataset', metavar='DIR', evaluation=True, group=H),
    Setting('workers', ('-j', '--workers'), 'number of data loading workers', int, 4, low=0,
            metavar='N', evaluation=True, handout=4, group=H),
    Setting('epochs', ('--epochs',), 'number of total epochs to run', int, 90, low=1,
            resume=GROW, metavar='N', handout=90, group=H),
    Setting('warmup', ('--warmup',), 'number of epochs of linear lr warmup', int, 5, low=0,
            resume=KEEP, metavar='N', handout=5, group=H),
    Setting('clip_grad', ('--clip-grad',), 'gradient norm clipping; 0 disables', float, 1.0,
            rule='1.0 for the ViT, off (0) for CNNs', low=0, resume=KEEP, metavar='NORM',
            handout=1.0, group=H),
    Setting('start_epoch', ('--start-epoch',), 'manual epoch number (useful on restarts; '
            '--resume sets it)', int, 0, low=0, metavar='N', handout=0, group=H),
    Setting('batch_size', ('-b', '--batch-size'), 'mini-batch size', int, 256, low=1,
            resume=KEEP, metavar='N', handout=256, group=H),
    Setting('lr', ('--lr', '--learning-rate'), 'initial learning rate', float, 0.1,
            rule="the handout's 0.1 at its batch of 256, scaled linearly to -b: 0.1 x b / 256",
            low=0, resume=KEEP, metavar='LR', handout=0.1, group=H),
    Setting('momentum', ('--momentum',), 'momentum of SGD', float, 0.9, low=0, below=1,
            resume=KEEP, metavar='M', handout=0.9, group=H),
    Setting('weight_decay', ('--wd', '--weight-decay'), 'weight decay', float, 1e-4, low=0,
            resume=KEEP, metavar='W', handout=1e-4, group=H),
    Setting('print_freq', ('-p', '--print-freq'), 'print frequency in iterations', int, 10,
            low=1, metavar='N', evaluation=True, handout=10, group=H),
    Setting('resume', ('--resume',), 'path to a checkpoint: continue its run (or evaluate '
            'it with -e/-a)', str, '', metavar='PATH', evaluation=True, handout='', group=H),
    Setting('evaluate', ('-e', '--evaluate'), 'evaluate the --resume model on the '
            'validation set', bool, False, evaluation=True, handout=False, group=H),
    Setting('attack', ('-a', '--attack'), 'attack the --resume model with adversarial '
            'samples', bool, False, evaluation=True, handout=False, group=H),
    Setting('vis', ('-v', '--vis'), 'log images to TensorBoard (saliency with -e, '
            'adversarial with -a)', bool, False, evaluation=True, handout=False, group=H),
    Setting('use_custom_conv', ('--use-custom-conv',), 'use our own convolution '
            '(student_code.CustomConv2d)', bool, False, handout=False, group=H),
    Setting('use_vit', ('--use-vit',), 'use the vision Transformer (= --arch of '
            'default_vit_model)', bool, False, handout=False, group=H),
    Setting('use_resnet18', ('--use-resnet18',), 'fine-tune torchvision ResNet-18 '
            'pre-trained on ImageNet (= --arch resnet18)', bool, False, handout=False, group=H),
    Setting('gpu', ('--gpu',), 'GPU id to use, -1 for the CPU', int, 0, evaluation=True,
            handout=0, group=H),
    Setting('use_mps', ('--use-mps',), 'use Apple MPS', bool, False, evaluation=True,
            handout=False, group=H),
    Setting('recipe', ('--recipe',), 'a named set of values for the settings not given as '
            'flags: handout (none: the handout\'s recipe) or fast (for a short budget: '
            + ', '.join(f"--{dest.replace('_', '-')} {value}"
                        for dest, value in RECIPES['fast'].items())
            + '; docs/training.md)', str, 'handout', choices=tuple(RECIPES),
            resume=KEEP, before='handout', handout='handout', metavar='NAME', group=RECIPE),
    Setting('label_smoothing', ('--label-smoothing',), 'label smoothing of the training loss '
            '(F.cross_entropy\'s label_smoothing; the validation loss stays plain)', float, 0.0,
            low=0, below=1, resume=KEEP, before=0.0, handout=0.0, metavar='EPS', group=RECIPE),
    Setting('ema', ('--ema',), 'decay per step of an exponential moving average of the '
            'weights (torch.optim.swa_utils.AveragedModel; 0: off): the average is validated '
            'and is what model_best.pth.tar holds, the raw weights train on', float, 0.0,
            low=0, below=1, resume=KEEP, before=0.0, handout=0.0, metavar='DECAY',
            group=RECIPE),
    Setting('augment', ('--augment',), 'strength of the training augmentation: scales '
            'RandomRotate\'s angle, RandomColor\'s range and how much of the image '
            'RandomSizedCrop may cut away (1: get_train_transforms as it is; 0: none of '
            'them)', float, 1.0, low=0, resume=KEEP, before=1.0, handout=1.0, metavar='S',
            group=RECIPE),
    Setting('image_size', ('--image-size',), 'train and validate on batches resized to '
            'N x N pixels on the device, after the transforms (FixRes: a lower size costs '
            'less; 0: the transforms\' own size)', int, 0, low=0, resume=KEEP, before=0,
            metavar='N', evaluation=True, handout=0, group=RECIPE),
    Setting('min_train_size', ('--min-train-size',), 'progressive resizing (FFCV): the first '
            'epoch trains at N x N pixels, the size grows linearly to the full size (or '
            '--image-size), which the last epoch and validation use (0: off)', int, 0,
            low=0, resume=KEEP, before=0, metavar='N', handout=0, group=RECIPE),
    Setting('device', ('--device',), 'auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or '
            'mps', str, 'auto', evaluation=True, group=RUN),
    Setting('seed', ('--seed',), 'random seed', int, rule='drawn at random and recorded',
            low=0, below=2 ** 32, resume=KEEP, group=RUN),
    Setting('log_dir', ('--log-dir',), 'where run folders go', str,
            os.path.join(REPO_ROOT, 'logs'), metavar='DIR', evaluation=True, group=RUN),
    Setting('name', ('--name',), 'suffix of the run folder name', str, resume=FOLLOW,
            evaluation=True, group=RUN),
    Setting('arch', ('--arch',), 'the model: ' + ', '.join(sorted(ARCHS)), str,
            rule='student_code.default_cnn_model; with -e/-a and --resume, the checkpoint\'s',
            resume=KEEP, choices=tuple(sorted(ARCHS)), metavar='NAME', evaluation=True,
            group=RUN),
    Setting('num_classes', ('--num-classes',), 'number of classes', int,
            rule="largest label + 1 in the label files, or the checkpoint's", low=2,
            resume=KEEP, evaluation=True, group=RUN),
    Setting('pretrained_weights', ('--pretrained-weights',), 'local ResNet-18 state dict '
            'for --use-resnet18 (no download)', str, metavar='PATH', group=RUN),
    Setting('stop_after', ('--stop-after',), 'stop after N epochs of this invocation '
            '(resume later)', int, low=1, metavar='N', group=RUN),
    Setting('attack_steps', ('--attack-steps',), 'PGD steps for -a', int,
            rule="student_code.default_attack's", low=0, evaluation=True, group=ATTACK),
    Setting('attack_step_size', ('--attack-step-size',), 'PGD step size for -a', float,
            rule="student_code.default_attack's", low=0, evaluation=True, group=ATTACK),
    Setting('attack_eps', ('--attack-eps',), 'PGD epsilon for -a', float,
            rule="student_code.default_attack's", low=0, evaluation=True, group=ATTACK),
    Setting('adv_train', ('--adv-train',), 'adversarial training: mix PGD samples into each '
            'batch (CNNs)', bool, False, resume=KEEP, group=ATTACK),
    Setting('adv_steps', ('--adv-steps',), 'PGD steps for --adv-train', int, 5, low=1,
            resume=KEEP, group=ATTACK),
    Setting('adv_eps', ('--adv-eps',), 'PGD epsilon for --adv-train', float, 0.1, low=0,
            resume=KEEP, group=ATTACK),
    Setting('adv_ratio', ('--adv-ratio',), 'fraction of each batch replaced by adversarial '
            'samples, in (0, 1]', float, 0.5, low=0, resume=KEEP, group=ATTACK),
    Setting('amp', ('--amp',), 'mixed precision (torch.autocast): bf16 where the device has '
            'it, else fp16 with a GradScaler', bool, rule='per device and model', switch=True,
            resume=KEEP, before=False, evaluation=True, handout=False, group=SPEED),
    Setting('channels_last', ('--channels-last',), 'NHWC memory format for model and '
            'batches', bool, rule='per device', switch=True, resume=KEEP, before=False,
            evaluation=True, handout=False, group=SPEED),
    Setting('compile', ('--compile',), 'torch.compile the model for training; falls back to '
            'eager, saying so, where it cannot', bool, rule='off: compiling costs minutes',
            switch=True, resume=FOLLOW, handout=False, group=SPEED),
    Setting('data_cache', ('--data-cache',), 'decode the images once into DIR/cache/ and '
            'augment with one fused warp (fast_data.py)', bool, rule='on where the cached '
            'path can serve', switch=True, resume=KEEP, before=False, evaluation=True,
            handout=False, group=SPEED),
    Setting('rebuild_cache', ('--rebuild-cache',), 'with --data-cache: decode the images '
            'into DIR/cache/ again, even where its fingerprint says it is fresh', bool, False,
            evaluation=True, group=SPEED),
    Setting('dist_backend', ('--dist-backend',), 'under torchrun: nccl on GPUs, gloo on the '
            'CPU', str, 'auto', choices=('auto', 'nccl', 'gloo'), evaluation=True, group=DIST),
    Setting('sync_bn', ('--sync-bn',), 'under torchrun: BatchNorm statistics over the '
            'global batch (for small per-GPU batches; CUDA only)', bool, False, group=DIST),
)
BY_DEST = {setting.dest: setting for setting in SETTINGS}

# what resolve derives beyond the flags: (name, kind, meaning)
DERIVED = (('amp_dtype', str, "'bfloat16' or 'float16' under --amp, else None"),
           ('world_size', int, 'how many processes train together (torchrun)'),
           ('val_batch_size', int, 'images per validation batch, training and -e/-a alike'))


################################################################################
# The command line
################################################################################
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming it (not the whole usage block)."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def help_text(setting):
    if setting.kind is bool and not setting.switch:
        return setting.help
    if setting.rule is not None:
        return f'{setting.help} (default: {setting.rule})'
    if setting.default is None:
        return setting.help
    return f'{setting.help} (default: {setting.default})'


def build_parser(prog=None):
    parser = OneLineParser(prog=prog, description='PyTorch Image Classification (MiniPlaces)')
    groups = {}
    for s in SETTINGS:
        group = groups.get(s.group) or groups.setdefault(s.group, parser.add_argument_group(s.group))
        if s.flags == ('',):
            group.add_argument(s.dest, metavar=s.metavar, help=s.help)
        elif s.switch:
            group.add_argument(*s.flags, dest=s.dest, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text(s))
        elif s.kind is bool:
            group.add_argument(*s.flags, dest=s.dest, action='store_true', help=help_text(s))
        else:
            group.add_argument(*s.flags, dest=s.dest, type=s.kind, default=s.default,
                               choices=s.choices, metavar=s.metavar, help=help_text(s))
    return parser


class Flags(argparse.Namespace):
    """The parsed command line, read-only: run_plan.resolve turns it into the plan and
    nothing writes into it."""

    def __setattr__(self, name, value):
        raise AttributeError(f"the parsed flags are read-only: '{name}' is decided by "
                             f"run_plan.resolve, into the plan")

    __delattr__ = __setattr__


_NOT_GIVEN = object()


def parse(parser, argv):
    """(read-only Flags, the dests written on the command line). argparse fills in a
    default only where the namespace has no value yet: a second parse into a namespace
    of markers shows which were given."""
    parsed = parser.parse_args(argv)
    probe = argparse.Namespace(**{dest: _NOT_GIVEN for dest in vars(parsed)})
    parser.parse_args(argv, namespace=probe)
    given = frozenset(d for d, value in vars(probe).items() if value is not _NOT_GIVEN)
    flags = Flags()
    for dest, value in vars(parsed).items():
        object.__setattr__(flags, dest, value)
    return flags, given


################################################################################
# One check of a value, for flags and checkpoints alike
################################################################################
def flag_name(dest):
    flags = BY_DEST[dest].flags
    return next((f for f in flags if f.startswith('--')), flags[0]) or dest.upper()


def value_problem(setting, value):
    """What is wrong with a value of the setting (None: nothing)."""
    kind = setting.kind
    if kind is bool:
        return None if isinstance(value, bool) else 'true or false'
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return 'a whole number'
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                          or not math.isfinite(value)):
        return 'a finite number'
    if kind is str and not isinstance(value, str):
        return 'a text'
    low, below = setting.low, setting.below
    if (low is not None and value < low) or (below is not None and not value < below):
        if low is not None and below is not None:
            return f'in [{number(low)}, {number(below)})'
        return f'>= {number(low)}' if low is not None else f'< {number(below)}'
    if setting.choices is not None and value not in setting.choices:
        return f"one of {', '.join(setting.choices)}"
    return None


def number(x):
    """A bound as a person writes it: 0, 1, 0.5, 2**32."""
    if x >= 2 ** 16 and float(x).is_integer() and (int(x) & (int(x) - 1)) == 0:
        return f'2**{int(x).bit_length() - 1}'
    return f'{x:g}'


def check_value(dest, value, origin='flag'):
    """Refuse a value outside the setting's kind and bounds in one line: UsageError for a
    flag, CheckpointError naming the file for one a checkpoint stores (origin: its path)."""
    setting = BY_DEST.get(dest)
    if setting is None or value is None:
        return
    problem = value_problem(setting, value)
    if problem is None:
        return
    if origin == 'flag':
        raise UsageError(f'{flag_name(dest)} must be {problem}, got {value!r}')
    raise CheckpointError(f"'{origin}' is damaged: its args['{dest}'] is {value!r}, not "
                          f"{problem}")


def check_stored(saved, path):
    """Every setting a checkpoint stores, checked as a flag would be (the same rows)."""
    if saved is not None and not isinstance(saved, dict):
        raise CheckpointError(f"'{path}' is damaged: its 'args' is a {type(saved).__name__}, "
                              f"not the flags of its run")
    derived = {name: kind for name, kind, _ in DERIVED}
    for dest, value in (saved or {}).items():
        if dest in derived and value is not None and not isinstance(value, derived[dest]):
            raise CheckpointError(f"'{path}' is damaged: its args['{dest}'] is {value!r}")
        check_value(dest, value, path)


################################################################################
# The plan: a frozen record of every setting, as resolved
################################################################################
def _as_dict(self):
    """A copy of the plan's values (summary.json's and the checkpoint's 'args')."""
    return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
            if field.name != 'sources'}


def _for_evaluation(self):
    """The settings -e and -a use (their summary records only these)."""
    return {dest: value for dest, value in self.as_dict().items()
            if dest not in BY_DEST or BY_DEST[dest].evaluation}


def plan_type(rows):
    """The RunPlan record of a table: one field per row, then DERIVED, then sources.
    Frozen and slotted: no field can be set, and vars() has no live dict to write into."""
    return dataclasses.make_dataclass(
        'RunPlan', [(s.dest, object) for s in rows] +
        [(name, object) for name, _, _ in DERIVED] + [('sources', dict)],
        frozen=True, slots=True,
        namespace={'as_dict': _as_dict, 'for_evaluation': _for_evaluation,
                   '__module__': __name__,
                   '__doc__': "A run's settings once resolved (run_plan.resolve): one field "
                              "per row of SETTINGS, then DERIVED, then sources {dest: where "
                              "its value came from}."})


RunPlan = plan_type(SETTINGS)
