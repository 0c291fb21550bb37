"""The checkpoint file: what it holds, defined once, with one writer and one reader.

RUN/models/checkpoint.pth.tar is the commit point of an epoch and holds everything an
exact resume needs; RUN/models/model_best.pth.tar holds the best epoch's weights for -e
and -a (kind 'best'). On disk both are dicts written by torch.save, with the names of
Checkpoint's fields as keys (to_file); every module reads them through from_file, which
also takes the handout's own checkpoints ({'epoch', 'model_arch', 'state_dict',
'best_acc1' (a tensor), 'optimizer'}) and bare state dicts, and checks the kind of every
entry, so that a damaged or hand-edited file is one line naming the entry.
"""
import dataclasses
import math
import reprlib
from typing import Optional

import torch

from toolkit import settings
from utils import CheckpointError


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    state_dict: dict                          # the model's weights (every file has them)
    epoch: Optional[int] = None               # epochs trained
    arch: Optional[str] = None                # the --arch name of the model
    args: Optional[dict] = None               # the run's plan (vars of run_plan.RunPlan)
    optimizer: Optional[dict] = None          # the optimizer's, schedule's and fp16 loss
    scheduler: Optional[dict] = None          # scaler's state_dict()
    scaler: Optional[dict] = None
    best_acc1: Optional[float] = None         # the best epoch so far: its val top-1,
    best_epoch: Optional[int] = None          # number and weights (None: this epoch's)
    best_state_dict: Optional[dict] = None
    history: Optional[list] = None            # one record per epoch (summary.json's epochs)
    wall_time_s: float = 0.0                  # the run's time so far
    kind: Optional[str] = None                # 'best': model_best.pth.tar
    model_arch: Optional[str] = None          # the handout main.py's name of the model
    schema: Optional[int] = None

    def best_model(self):
        """What model_best.pth.tar holds, derived from this checkpoint."""
        return Checkpoint(kind='best', epoch=self.best_epoch, arch=self.arch,
                          state_dict=self.best_state_dict or self.state_dict,
                          best_acc1=self.best_acc1, args=self.args)

    def missing_for_resume(self):
        """What an exact resume needs beyond the weights and this file lacks (the
        handout's main.py saves no args or schedule; bare weights have nothing else)."""
        return [name for name in EXACT_RESUME if getattr(self, name) is None]

    @property
    def names_its_model(self):
        """The file says which model its weights are for (this toolkit's arch, the
        handout's model_arch); bare weights do not."""
        return self.arch is not None or self.model_arch is not None

    @property
    def plan(self):
        """The flags its run was trained with ({} where the file has none)."""
        return self.args or {}


EXACT_RESUME = ('epoch', 'args', 'optimizer', 'scheduler')
# the entries each kind of file holds on disk
ENTRIES = ('schema', 'epoch', 'arch', 'state_dict', 'optimizer', 'scheduler', 'best_acc1',
           'best_epoch', 'best_state_dict', 'history', 'wall_time_s', 'args', 'scaler')
BEST_ENTRIES = ('kind', 'epoch', 'arch', 'state_dict', 'best_acc1', 'args')


def to_file(ckpt):
    """The dict torch.save writes for a Checkpoint."""
    entries = BEST_ENTRIES if ckpt.kind == 'best' else ENTRIES
    return {name: getattr(ckpt, name) for name in entries}


def from_file(raw, path):
    """The Checkpoint of what torch.load returned for `path`; CheckpointError (one line)
    for anything that is not a checkpoint, or one with a damaged entry or non-finite
    weights."""
    if isinstance(raw, dict) and raw and all(torch.is_tensor(v) for v in raw.values()):
        raw = {'state_dict': raw}  # bare weights: torch.save(model.state_dict(), path)
    if not isinstance(raw, dict) or not isinstance(raw.get('state_dict'), dict):
        raise CheckpointError(f"'{path}' is not a checkpoint of this toolkit (no state_dict)")
    # the handout's main.py saves best_acc1 as a tensor: every numeric entry becomes one
    # Python number (or one line naming it) before anything computes with it
    raw = {**raw, **{name: one_number(raw[name], name, path)
                     for name in NUMBER_ENTRIES if raw.get(name) is not None}}
    check_kinds(raw, path)
    known = {field.name for field in dataclasses.fields(Checkpoint)}
    values = {name: value for name, value in raw.items() if name in known}
    values.update(wall_time_s=raw.get('wall_time_s') or 0.0)
    bad = non_finite_part(raw)
    if bad is not None:
        what, key = bad
        raise CheckpointError(f"'{path}' holds non-finite {what} (NaN or inf) in '{key}': "
                              f"the run diverged before it was saved; use an earlier "
                              f"checkpoint or train again with a lower --lr")
    return Checkpoint(**values)


# the numeric entries of a checkpoint: what each must be, and the test of it
NUMBER_ENTRIES = {
    'epoch': ('a whole number >= 0', lambda v: isinstance(v, int) and v >= 0),
    'best_epoch': ('a whole number >= 0', lambda v: isinstance(v, int) and v >= 0),
    'best_acc1': ('a percentage (0-100)', lambda v: 0 <= v <= 100),
    'wall_time_s': ('a number >= 0', lambda v: v >= 0)}


def one_number(value, name, path):
    """A checkpoint's numeric entry as one Python number: a tensor of one element (the
    handout's best_acc1) gives its value; a tensor of another shape, a value that is no
    finite number or one out of its range is a damaged entry, said in one line (float()
    of a two-element tensor is a ValueError naming neither file nor entry)."""
    words, test = NUMBER_ENTRIES[name]
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise CheckpointError(f"'{path}' is damaged: its '{name}' is a tensor of shape "
                                  f"{tuple(value.shape)}, not {words}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not test(value):
        raise CheckpointError(f"'{path}' is damaged: its '{name}' is "
                              f"{reprlib.repr(value)}, not {words}")
    return value


def check_kinds(raw, path):
    """The run's settings, epoch and arch as a checkpoint holds them, each checked as its
    flag is (settings.check_stored: the same table): a damaged or hand-edited file is one
    line naming the entry, not a TypeError deep in a resume."""
    settings.check_stored(raw.get('args'), path)
    for name, value, kind, words in (("'epoch'", raw.get('epoch'), int, 'a whole number >= 0'),
                                     ("'arch'", raw.get('arch'), str, 'a text')):
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                                  or (kind is int and value < 0)):
            raise CheckpointError(f"'{path}' is damaged: its {name} is {value!r}, not {words}")


# the parts of a checkpoint that a resumed run trains on or writes out again (the best
# weights become model_best.pth.tar), with their names in messages
CHECKED_PARTS = (('state_dict', 'weights'), ('best_state_dict', 'best weights'),
                 ('optimizer', 'optimizer state'))


def non_finite_part(raw):
    """(what, key) of the first tensor holding NaN or inf in the checkpoint's weights, best
    weights or optimizer state (momentum buffers, Adam's moments), or None. Checked before
    anything is written from the checkpoint: a NaN there would reach model_best.pth.tar."""
    for part, what in CHECKED_PARTS:
        tensors = raw.get(part)
        if part == 'optimizer' and isinstance(tensors, dict):
            # {'state': {parameter index: {'momentum_buffer': tensor, ...}}, 'param_groups': ..}
            tensors = {f'state.{index}.{name}': value
                       for index, state in (tensors.get('state') or {}).items()
                       if isinstance(state, dict) for name, value in state.items()}
        key = first_non_finite(tensors) if isinstance(tensors, dict) else None
        if key is not None:
            return what, key
    return None


def first_non_finite(state_dict):
    """Name of the first floating-point tensor of a state dict holding NaN or inf, or None."""
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and \
                not torch.isfinite(value).all():
            return key
    return None
