"""The run record: what a run folder holds, defined once, and how to read its summary.

main.py writes it (run_folder.py), report.py and the tests read it; every file name, key
and TensorBoard tag they share is named here, so that renaming one cannot silently
break the others.

    RUN/summary.json           SUMMARY_KEYS below, strict JSON (no NaN: null instead)
    RUN/events.out.tfevents.*  the TAG_* scalars below
    RUN/models/checkpoint.pth.tar, RUN/models/model_best.pth.tar   (see checkpoint.py)
"""
import json
import os

from utils import ToolkitError

# the files of a run folder
SUMMARY = 'summary.json'
MODELS = 'models'
CHECKPOINT, BEST = 'checkpoint.pth.tar', 'model_best.pth.tar'

# Version of the summary.json layout. 1: the first layout (no 'schema' key);
# 2: adds 'schema', statuses 'interrupted' and 'diverged', attack results without
# the flip test-time augmentation. report.py refuses a version it does not know.
SCHEMA_VERSION = 2

# TensorBoard tags: the handout's four, then ours. TOP1/TOP5 are written with
# add_scalars(tag, {'train': ..}) and ({'val': ..}): one chart, two curves.
TAG_TRAIN_LOSS = 'data/training_loss'      # every print-freq iterations (step: iteration)
TAG_LR = 'data/learning_rate'              # every print-freq iterations (step: iteration)
TAG_TOP1 = 'data/top1_accuracy'            # per epoch (step: 1-based epoch), train and val
TAG_TOP5 = 'data/top5_accuracy'
TAG_VAL_LOSS = 'data/val_loss'             # per epoch
TAG_IMAGES_PER_S = 'perf/images_per_sec'   # per epoch
TAG_EPOCH_TIME = 'perf/epoch_time_s'       # per epoch
TAG_PEAK_MEMORY = 'perf/peak_memory_mb'    # per epoch
ITERATION_TAGS = (TAG_TRAIN_LOSS, TAG_LR)

# summary['status']. 'interrupted': Ctrl-C or SIGTERM, or killed (kill -9, a crash of the
# machine): a later run in the same --log-dir finds its lock free and says so.
# 'failed': ended by an error (a lost torchrun process, an exception in student_code.py).
# 'failed' came after schema 2 without a new version: an older reader shows it as it is.
RUNNING, FINISHED, STOPPED, INTERRUPTED, DIVERGED, FAILED = (
    'running', 'finished', 'stopped', 'interrupted', 'diverged', 'failed')
EVALUATED, ATTACKED = 'evaluated', 'attacked'   # runs of -e and -a

# summary['epochs'][i]: one record per finished epoch
EPOCH_KEYS = ('epoch', 'lr', 'train_loss', 'train_top1', 'train_top5', 'epoch_time_s',
              'images_per_s', 'peak_memory_mb', 'val_loss', 'val_top1', 'val_top5')

# results -e and -a add to their own summary and to the training run's: the checkpoint's
# path, the epoch it held, 'file' (checkpoint.file_fingerprint of the file read: report.py
# tells a result whose file has changed since), then the figures
EVALUATION, ATTACK = 'evaluation', 'attack'
RESULT_KEYS = (EVALUATION, ATTACK)

SUMMARY_KEYS = ('schema', 'run_dir', 'name', 'status', 'args', 'sources', 'arch', 'num_params',
                'device', 'iters_per_epoch', 'epochs_planned', 'epochs', 'best_epoch', 'best_acc1',
                'wall_time_s', 'world_size', 'dist_backend') + RESULT_KEYS


class SchemaError(ToolkitError):
    """A summary.json of a layout this code does not know."""


def new_summary(run_dir, plan, *, num_params, device, iters_per_epoch, epochs_planned):
    """A run's summary before its first epoch (SUMMARY_KEYS less the results); plan: the
    run's run_plan.RunPlan. 'args' holds a copy of the settings the run used (for -e and
    -a only those they use: settings.Setting.evaluation), 'sources' where each came from.
    run_dir is None in the processes of a torchrun launch other than rank 0."""
    from toolkit.distributed import world
    used = plan.for_evaluation() if plan.evaluate or plan.attack else plan.as_dict()
    return {'schema': SCHEMA_VERSION, 'run_dir': run_dir and os.path.abspath(run_dir),
            'name': plan.name, 'status': RUNNING, 'args': used,
            'sources': {dest: plan.sources[dest] for dest in used if dest in plan.sources},
            'arch': plan.arch, 'num_params': num_params,
            'device': str(device), 'iters_per_epoch': iters_per_epoch,
            'epochs_planned': epochs_planned, 'epochs': [], 'best_epoch': None,
            'best_acc1': None, 'wall_time_s': 0.0, 'world_size': plan.world_size,
            'dist_backend': world().backend}


def summary_path(run_dir):
    return os.path.join(run_dir, SUMMARY)


def checkpoint_path(run_dir, name=CHECKPOINT):
    return os.path.join(run_dir, MODELS, name)


def read_summary(run_dir):
    """RUN/summary.json as a dict ({} when there is none); SchemaError for a layout
    newer than this code."""
    path = summary_path(run_dir)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        summary = json.load(f)
    if not isinstance(summary, dict):
        raise SchemaError(f"{path} holds JSON {type(summary).__name__}, not a run summary "
                          f"(damaged?)")
    version = summary.get('schema', 1)
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise SchemaError(f"{path}: summary schema version {version!r} is unknown to this "
                          f"code (it reads 1 to {SCHEMA_VERSION}); update the toolkit")
    return summary
