"""The checkpoint file: what it holds, defined once, with one writer and one reader
(write_file, read_checkpoint: the file I/O and its one-line diagnoses live here too).

RUN/models/checkpoint.pth.tar is the commit point of an epoch and holds everything an
exact resume needs; RUN/models/model_best.pth.tar holds the best epoch's weights for -e
and -a (kind 'best'). On disk both are dicts written by torch.save, with the names of
Checkpoint's fields as keys (to_file); every module reads them through from_file, which
also takes the handout's own checkpoints ({'epoch', 'model_arch', 'state_dict',
'best_acc1' (a tensor), 'optimizer'}) and bare state dicts, and checks the kind of every
entry, so that a damaged or hand-edited file is one line naming the entry.
"""
import dataclasses
import hashlib
import os
import pickle
import math
import reprlib
from typing import Optional

import torch

from toolkit import run_record as rr
from toolkit import safe_files
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
    ema_state_dict: Optional[dict] = None     # --ema: AveragedModel's state_dict()
    history: Optional[list] = None            # one record per epoch (summary.json's epochs)
    wall_time_s: float = 0.0                  # the run's time so far
    kind: Optional[str] = None                # 'best': model_best.pth.tar
    model_arch: Optional[str] = None          # the handout main.py's name of the model
    schema: Optional[int] = None

    def best_model(self):
        """What model_best.pth.tar holds, derived from this checkpoint."""
        return Checkpoint(kind='best', epoch=self.best_epoch, arch=self.arch,
                          state_dict=self.best_state_dict or self.evaluated_weights(),
                          best_acc1=self.best_acc1, args=self.args)

    def evaluated_weights(self):
        """The weights the run validates: the EMA's (--ema) where it keeps one, else the
        model's."""
        if self.ema_state_dict is None:
            return self.state_dict
        return {key[len(EMA_PREFIX):]: value for key, value in self.ema_state_dict.items()
                if key.startswith(EMA_PREFIX)}

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
           'best_epoch', 'best_state_dict', 'history', 'wall_time_s', 'args', 'scaler',
           'ema_state_dict')
# AveragedModel's state_dict: the averaged model's entries under this prefix, and n_averaged
EMA_PREFIX = 'module.'
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
                 ('ema_state_dict', 'EMA weights'),
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


################################################################################
# The files: one writer, one reader, and the fingerprint of the file read
################################################################################
def write_file(ckpt, path):
    """Write a Checkpoint to `path` atomically (a kill leaves the old file or the new one)."""
    safe_files.write_or_explain(path, lambda f: torch.save(to_file(ckpt), f), binary=True)


def load_checkpoint(path):
    """Load a Checkpoint safely (weights_only) onto the CPU, or explain in one
    line."""
    return read_checkpoint(path)[0]


def read_checkpoint(path):
    """load_checkpoint, and the fingerprint of the very file it read (file_fingerprint):
    what an -e or -a records of the checkpoint it evaluated. A run folder stands for its
    best model, RUN/models/model_best.pth.tar (said in one line)."""
    if os.path.isdir(path):
        best = rr.checkpoint_path(path, rr.BEST)
        if not os.path.isfile(best):
            raise CheckpointError(f"'{path}' is a folder, not a checkpoint file, and {best} "
                                  f"(a run folder's best model) is not there: give a "
                                  f"checkpoint file, e.g. RUN/models/{rr.BEST}")
        from toolkit.distributed import launch_rank  # once under torchrun: rank 0 says it
        if launch_rank() == 0:
            print(f"=> '{path}' is a run folder: reading its best model {best}")
        path = best
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint found at '{path}'")
    try:
        with open(path, 'rb') as f:
            raw = torch.load(f, map_location='cpu', weights_only=True)
            fingerprint = file_fingerprint(f)
    except pickle.UnpicklingError:
        # weights_only refused a Python object: loading it could run arbitrary code
        raise CheckpointError(f"'{path}' holds Python objects that no checkpoint of this "
                              f"toolkit holds; refused without loading them (unpickling "
                              f"them could run arbitrary code)")
    except OSError as exc:  # no permission, an I/O error of the disk ...
        raise CheckpointError(f"cannot read checkpoint '{path}': {exc.strerror or exc}")
    except Exception:  # truncated zip, garbage, not a torch file ...
        raise CheckpointError(f"cannot read checkpoint '{path}': {unreadable_reason(path)}")
    return from_file(raw, path), fingerprint


def file_fingerprint(f):
    """{'bytes', 'mtime_ns', 'sha256'} of an open file. The hash of the whole file: a
    checkpoint of this toolkit is at most about 100 MB, which sha256 reads in about 0.1 s
    (nothing next to an evaluation), and only a hash tells a file rewritten with the
    same size (every epoch's checkpoint of one model has the same size) within the
    resolution of its modification time, or a copy that kept the old time (cp -p)."""
    st = os.fstat(f.fileno())
    f.seek(0)
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
    return {'bytes': st.st_size, 'mtime_ns': st.st_mtime_ns, 'sha256': digest.hexdigest()}


def file_changed(path, fingerprint):
    """Why the file at `path` is no longer the one of `fingerprint` ('changed', 'gone'),
    or None while it is. Size and time unchanged: the same file, without reading
    it; else its hash decides (a copy of the same bytes is the same checkpoint)."""
    try:
        st = os.stat(path)
        if (st.st_size, st.st_mtime_ns) == (fingerprint['bytes'], fingerprint['mtime_ns']):
            return None
        with open(path, 'rb') as f:
            same = file_fingerprint(f)['sha256'] == fingerprint['sha256']
    except OSError:
        return 'gone'
    return None if same else 'changed'


def unreadable_reason(path):
    """Why torch.load failed on a file, in words: its own errors say "EOFError" for an
    empty file, a KeyError '101' for text, a miniz error for a cut zip archive."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(4)
    if size == 0:
        return 'the file is empty (an interrupted save or copy?)'
    if head == b'PK\x03\x04':  # torch.save writes a zip archive since PyTorch 1.6
        return (f'the zip archive that torch.save writes is damaged or cut short ({size} '
                f'bytes; an interrupted save or copy?)')
    if head[:1] == b'\x80':  # a pickle: the format of torch.save before PyTorch 1.6
        return f'the pickle of the old torch.save format is damaged or cut short ({size} bytes)'
    return f'it is not a file that torch.save wrote ({size} bytes, starting with {head!r})'
