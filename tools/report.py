"""Turn training runs into the figures and tables of the writeup.

    python tools/report.py RUN [RUN ...] --out results/NAME [--labels A B ...]

RUN is a run folder written by main.py (logs/exp_<timestamp>[_<name>]) or a
folder holding such runs (e.g. logs/). For every run the script reads the
TensorBoard event files with TensorBoard's own reader, so the numbers are the
ones TensorBoard shows, and RUN/summary.json. It writes into --out:

    loss.png lr.png top1.png top5.png  one curve per figure, the runs overlaid (colour and
                                       marker per run, line style per split)
    overview.png                       the four curves in one grid
    curves.csv                         every logged scalar: run, tag, split, step, epoch, value
    results.md                         comparison table, evaluation and attack results

Each file is written whole or not at all (a temporary file renamed over the old one), so
an interrupted report leaves the previous one readable.

The x axes are in epochs. Values logged every few iterations (training loss,
learning rate) sit at (step + 1) / iters_per_epoch, the epochs of training done
when they were logged; values logged once per epoch sit at the end of their
epoch, so "epoch 3" means "after 3 epochs" on every curve. A run that diverged (its
summary's status) is marked so in the legend, and the loss axis keeps to the runs
that did not: a loss of 1e34 would flatten every other curve.

Damaged input is a note, and the report is made of the rest: a summary.json field that
does not hold its kind (a text where a number belongs, a top-1 of 250) is left out, and an
event file that ends in a cut record (TensorBoard's reader stops there quietly) is named.

The one thing it writes into a run folder: a run whose summary says 'running' but
whose lock no process holds was killed (kill -9); it is marked 'interrupted', as the
next main.py in its --log-dir would (run_folder.close_dead_run).
"""
import argparse
import csv
import json
import math
import os
import shlex
import struct
import sys
from collections import namedtuple
from statistics import median

import matplotlib
matplotlib.use('Agg')  # files only, no window: works over SSH and in tests
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c  # noqa: E402

import _paths  # noqa: E402,F401  code/ and tools/ on sys.path: runs from any directory
from toolkit import checkpoint  # noqa: E402
from toolkit import run_folder  # noqa: E402
from toolkit import safe_files  # noqa: E402
from toolkit import run_record as rr  # noqa: E402

# tags main.py logs every print-freq iterations (step = global iteration);
# every other tag is logged once per epoch (step = 1-based epoch)
ITER_TAGS = rr.ITERATION_TAGS
# split of the tags logged with add_scalar; add_scalars tags get theirs from the sub-folder
TAG_SPLIT = {rr.TAG_TRAIN_LOSS: 'train', rr.TAG_VAL_LOSS: 'val'}
# which figure each tag belongs to; 'summary/...' tags stand in when a run has no event files
CURVE_OF = {rr.TAG_TRAIN_LOSS: 'loss', rr.TAG_VAL_LOSS: 'loss', 'summary/loss': 'loss',
            rr.TAG_LR: 'lr', 'summary/lr': 'lr',
            rr.TAG_TOP1: 'top1', 'summary/top1': 'top1',
            rr.TAG_TOP5: 'top5', 'summary/top5': 'top5'}
CURVES = {'loss': ('Loss', 'cross-entropy loss'),
          'lr': ('Learning rate', 'learning rate'),
          'top1': ('Top-1 accuracy', 'top-1 accuracy (%)'),
          'top5': ('Top-5 accuracy', 'top-5 accuracy (%)')}
SPLIT_STYLE = {'train': '-', 'val': '--'}
# a run's look: colour i % 10 of tab10, then marker i // 10, so 80 runs look different;
# the line style stays the split's (train solid, val dashed)
MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*')
# per-epoch event tags -> keys of the summary.json epoch records (table fallback)
RECORD_KEY = {(rr.TAG_TOP1, 'train'): 'train_top1',
              (rr.TAG_TOP1, 'val'): 'val_top1',
              (rr.TAG_TOP5, 'train'): 'train_top5',
              (rr.TAG_TOP5, 'val'): 'val_top5',
              (rr.TAG_VAL_LOSS, 'val'): 'val_loss',
              (rr.TAG_IMAGES_PER_S, ''): 'images_per_s',
              (rr.TAG_EPOCH_TIME, ''): 'epoch_time_s',
              (rr.TAG_PEAK_MEMORY, ''): 'peak_memory_mb'}
OUTPUTS = ['loss.png', 'lr.png', 'top1.png', 'top5.png', 'overview.png', 'curves.csv', 'results.md']


def note(msg):
    print(f'report.py: {msg}', file=sys.stderr)


# ----------------------------------------------------------------------------- reading runs
def has_events(folder):
    return any(f.startswith('events.out.tfevents') for f in os.listdir(folder))


def is_run(folder):
    return os.path.isfile(rr.summary_path(folder)) or has_events(folder)


def find_runs(paths):
    """Run folders named on the command line; a folder of runs (logs/) expands to its runs."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise SystemExit(f'report.py: no such run folder: {path!r}')
        children = sorted(os.path.join(path, c) for c in os.listdir(path))
        children = [c for c in children if os.path.isdir(c) and is_run(c)]
        runs += [path] if is_run(path) or not children else children
    return runs


def split_of(folder_name, tag):
    """add_scalars(tag, {split: value}) writes to the sub-folder '<tag, / as _>_<split>'."""
    prefix = tag.replace('/', '_') + '_'
    return folder_name[len(prefix):] if folder_name.startswith(prefix) else folder_name


def read_scalars(run_dir):
    """{(tag, split): [(step, value), ...]} sorted by step, from the run folder and its
    add_scalars sub-folders. A step written twice (a resumed run) keeps the later write."""
    folders = [run_dir] + sorted(os.path.join(run_dir, d) for d in os.listdir(run_dir)
                                 if os.path.isdir(os.path.join(run_dir, d)))
    series = {}
    for folder in filter(has_events, folders):
        note_cut_event_files(folder)
        # size_guidance 0 = keep every value (the default keeps a random sample of 10000)
        acc = event_accumulator.EventAccumulator(
            folder, size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()['scalars']:
            split = (TAG_SPLIT.get(tag, '') if folder == run_dir
                     else split_of(os.path.basename(folder), tag))
            latest = {}  # step -> (wall_time, value)
            for event in acc.Scalars(tag):
                if event.step not in latest or event.wall_time >= latest[event.step][0]:
                    latest[event.step] = (event.wall_time, event.value)
            series[(tag, split)] = sorted((step, value) for step, (_, value) in latest.items())
    return series


def note_cut_event_files(folder):
    """One note for each event file of `folder` that ends in a cut or damaged record:
    TensorBoard's reader stops there without a word (it waits for a writer to finish the
    record), so the curves would end early and look whole."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith('events.out.tfevents') and os.path.isfile(path):
            end, size = whole_records_end(path), os.path.getsize(path)
            if end < size:
                note(f'{path} is cut short or damaged after {end:,} of its {size:,} bytes '
                     f'(a copy or a write cut short?); what it logged after that is missing')


def whole_records_end(path):
    """The number of bytes of the whole records an event file starts with. Each record is
    framed (TFRecord) as its length (8 bytes), the masked CRC-32C of the length (4), the
    data, and the data's CRC (4): the framing is walked, the data skipped."""
    end = 0
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        while True:
            header = f.read(12)
            if len(header) < 12:
                return end
            length, crc = struct.unpack('<QI', header)
            if crc != masked_crc32c(header[:8]) or end + 12 + length + 4 > size:
                return end
            end += 12 + length + 4
            f.seek(end)


def read_summary(run_dir):
    """run_record.read_summary, each field checked against its kind (checked_summary); a
    summary of an unknown schema version stops the report (one line); a damaged one (not
    JSON, or JSON that is no run summary: `[]`, `null`) or an unreadable one is skipped
    with a note."""
    try:
        return checked_summary(rr.read_summary(run_dir), rr.summary_path(run_dir))
    except rr.SchemaError as e:
        if not is_damaged(run_dir):  # a summary of a newer layout: its figures would be misread
            raise SystemExit(f'report.py: {e}')
        note(f'{e}; using the event files only')
    except (OSError, ValueError) as e:
        note(f'cannot read {rr.summary_path(run_dir)} ({e}); using the event files only')
    return {}


# ----------------------------------------------------------------------------- typed fields
Kind = namedtuple('Kind', 'words test')


def is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


TEXT = Kind('a text', lambda v: isinstance(v, str))
OBJECT = Kind('an object', lambda v: isinstance(v, dict))
RECORDS = Kind('a list of epoch records', lambda v: isinstance(v, list))
EPOCH_RECORD = Kind('an epoch record (an object)', lambda v: isinstance(v, dict))
COUNT = Kind('a whole number >= 0', is_count)
EPOCH = Kind('a whole number >= 1', lambda v: is_count(v) and v >= 1)
AMOUNT = Kind('a number >= 0', lambda v: is_number(v) and v >= 0)   # seconds, MB, lr, loss
PERCENT = Kind('a percentage (0-100)', lambda v: is_number(v) and 0 <= v <= 100)

# the kind of every field of the run record (run_record.py); JSON null is allowed in each
# (main.py writes null for a figure it has not measured, or for NaN) but an epoch's number
SUMMARY_KINDS = {'schema': COUNT, 'run_dir': TEXT, 'name': TEXT, 'status': TEXT,
                 'args': OBJECT, 'sources': OBJECT, 'arch': TEXT, 'num_params': COUNT,
                 'device': TEXT, 'iters_per_epoch': COUNT, 'epochs_planned': COUNT,
                 'epochs': RECORDS,
                 'best_epoch': COUNT, 'best_acc1': PERCENT, 'wall_time_s': AMOUNT,
                 'world_size': COUNT, 'dist_backend': TEXT,
                 rr.EVALUATION: OBJECT, rr.ATTACK: OBJECT}
EPOCH_KINDS = {key: EPOCH if key == 'epoch' else
               PERCENT if key.endswith(('_top1', '_top5')) else AMOUNT
               for key in rr.EPOCH_KEYS}
ACCURACIES = ('top1', 'top5', 'clean_top1', 'clean_top5', 'adv_top1', 'adv_top5',
              'clean_top1_noflip', 'clean_top5_noflip', 'adv_top1_noflip', 'adv_top5_noflip',
              'success_rate', 'target_hit_rate')
RESULT_KINDS = {'checkpoint': TEXT, 'epoch': COUNT, 'file': OBJECT, 'loss': AMOUNT,
                'num_steps': COUNT, 'step_size': AMOUNT, 'epsilon': AMOUNT, 'time_s': AMOUNT,
                **dict.fromkeys(ACCURACIES, PERCENT)}


def checked_summary(summary, path):
    """The summary with every field that does not hold its kind (a hand-edited or damaged
    file: valid JSON, a text where a number belongs) left out, each named in one note; an
    epoch record without a valid epoch number is left out whole. The report is made of
    the rest, as of a run that did not record those fields."""
    # field -> [where it is first wrong, that value, its kind's words, what is left out,
    # how many records it is wrong in]
    problems = {}

    def fits(kind, value, where, field=None, dropped='left out', required=False):
        if kind is None or (value is None and not required) or (
                value is not None and kind.test(value)):
            return True
        problems.setdefault(field or where, [where, value, kind.words, dropped, 0])[4] += 1
        return False

    clean = {k: v for k, v in summary.items() if fits(SUMMARY_KINDS.get(k), v, k)}
    for key in rr.RESULT_KEYS:
        if key in clean:
            clean[key] = {k: v for k, v in clean[key].items()
                          if fits(RESULT_KINDS.get(k), v, f'{key}.{k}')}
    if 'epochs' in clean:
        clean['epochs'] = checked_epochs(clean['epochs'], fits)
    for where, value, words, dropped, count in problems.values():
        more = f' (and in {count - 1} more records)' if count > 1 else ''
        what = 'missing' if value is None else f'{shorten(value)}, not {words}'
        note(f'{path}: {where} is {what}; {dropped}{more}')
    return clean


def checked_epochs(records, fits):
    """summary.json's epoch records through checked_summary's `fits`: a record that is no
    object or lacks a valid epoch number is left out whole, a wrong figure by itself."""
    kept = []
    for i, record in enumerate(records):
        where, whole = f'epochs[{i}]', 'the record left out'
        if not fits(EPOCH_RECORD, record, where, 'epochs[]', whole, required=True) or \
                not fits(EPOCH_KINDS['epoch'], record.get('epoch'), f'{where}.epoch',
                         'epochs[].epoch', whole, required=True):
            continue
        kept.append({k: v for k, v in record.items()
                     if fits(EPOCH_KINDS.get(k), v, f'{where}.{k}', f'epochs[].{k}')})
    return kept


def shorten(value, limit=40):
    """repr(value), at most `limit` characters: a note stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def is_damaged(run_dir):
    """summary.json holds JSON of another type than an object: a damaged file."""
    with open(rr.summary_path(run_dir)) as f:
        return not isinstance(json.load(f), dict)


def close_dead_runs(run_dirs):
    """A run that a kill ended while running still says 'running': mark it interrupted
    (run_folder.close_dead_run), so that its status tells the truth from now on."""
    for run_dir in run_dirs:
        removed = run_folder.close_dead_run(run_dir)
        if removed is not None:
            note(run_folder.closed_note(run_dir, removed))


def summary_epochs(summary):
    """The per-epoch records of summary.json, one per epoch (a resumed run keeps the later)."""
    records = {}
    for record in summary.get('epochs') or []:
        if isinstance(record, dict) and record.get('epoch') is not None:
            records[record['epoch']] = record
    return [records[e] for e in sorted(records)]


def series_from_summary(summary):
    """Epoch-level curves from summary.json, for a run without event files."""
    series = {}
    for record in summary_epochs(summary):
        for key, value in record.items():
            split, name = key.split('_', 1) if key.startswith(('train_', 'val_')) else ('', key)
            if value is not None and name in ('loss', 'lr', 'top1', 'top5'):
                series.setdefault((f'summary/{name}', split), []).append((record['epoch'], value))
    return series


def iters_per_epoch(run):
    """From summary.json; without it, estimated from the last iteration and epoch logged."""
    ipe = run['summary'].get('iters_per_epoch')
    if ipe:
        return ipe
    last_iter = max((s for (tag, _), pts in run['series'].items() if tag in ITER_TAGS
                     for s, _ in pts), default=None)
    if last_iter is None:
        return 1
    last_epoch = max((s for (tag, _), pts in run['series'].items() if tag not in ITER_TAGS
                      for s, _ in pts), default=0)
    if last_epoch < 1:
        note(f'{run["dir"]}: iterations per epoch unknown; loss and lr x axis in iterations')
        return 1
    note(f'{run["dir"]}: no iters_per_epoch in summary.json; estimated from the logs')
    return math.ceil((last_iter + 1) / last_epoch)


def load_run(run_dir, label, summary=None):
    """One run's curves and summary (read here unless given); None for an empty folder."""
    summary = read_summary(run_dir) if summary is None else summary
    run = {'dir': run_dir, 'label': label, 'summary': summary}
    run['series'] = read_scalars(run_dir)
    if not run['series'] and not run['summary']:
        note(f'{run_dir} has no event files and no summary.json; skipped')
        return None
    status = run['summary'].get('status')
    if not run['series']:
        run['series'] = series_from_summary(run['summary'])
        if status in (rr.EVALUATED, rr.ATTACKED) and not run['series']:
            kind = {rr.EVALUATED: rr.EVALUATION, rr.ATTACKED: rr.ATTACK}[status]
            note(f'{run_dir} is an {kind} run: no curves, its results go into the tables')
        else:
            where = 'no scalars in its event files' if has_events(run_dir) else 'no event files'
            what = 'plotting what summary.json holds' if run['series'] else 'nothing to plot'
            note(f'{run_dir} has {where}; {what}')
    run['ipe'] = iters_per_epoch(run)
    unsaved = unsaved_epochs(run)
    if unsaved:
        note(f'{run_dir}: its event files log epoch(s) {", ".join(map(str, unsaved))} that '
             f'summary.json does not hold (the run was killed before saving them); the '
             f'tables leave them out')
    done, planned = len(run_records(run)), run['summary'].get('epochs_planned')
    if status in (rr.RUNNING, rr.STOPPED, rr.INTERRUPTED, rr.DIVERGED, rr.FAILED) or (
            status is None and planned and done < planned):
        note(f'{run_dir} is unfinished ({done} of {planned or "?"} epochs); plotting what exists')
    return run


def unsaved_epochs(run):
    """The epochs the event files log a validation for but summary.json does not hold."""
    if 'epochs' not in run['summary']:
        return []
    saved = {record['epoch'] for record in summary_epochs(run['summary'])}
    return sorted({step for step, _ in run['series'].get((rr.TAG_TOP1, 'val'), [])} - saved)


def epoch_of(run, tag, step):
    return (step + 1) / run['ipe'] if tag in ITER_TAGS else step


# ----------------------------------------------------------------------------- figures
def epoch_means(xs, ys):
    """Mean of the values logged within each epoch, placed at the epoch's end."""
    bins = {}
    for x, y in zip(xs, ys):
        bins.setdefault(math.ceil(x - 1e-9), []).append(y)
    return sorted(bins), [sum(bins[k]) / len(bins[k]) for k in sorted(bins)]


def diverged(run):
    return run['summary'].get('status') == rr.DIVERGED


def legend_label(run):
    return run['label'] + (' (diverged)' if diverged(run) else '')


def sane_loss_range(plotted):
    """(low, high) of the losses worth an axis, from [(run, values)]: the finite values of
    the runs that did not diverge; where every run diverged, their values up to 10 times
    their first loss (before they exploded). None when nothing is cut."""
    finite = [(run, [v for v in values if math.isfinite(v)]) for run, values in plotted]
    every = [v for _, values in finite for v in values]
    sane = [v for run, values in finite if not diverged(run) for v in values]
    if not sane:
        sane = [v for _, values in finite if values for v in values
                if v <= 10 * abs(values[0])]
    if not sane or (min(sane), max(sane)) == (min(every), max(every)):
        return None
    return min(sane), max(sane)


def draw(ax, runs, curve):
    """One curve of every run on one axis: colour = run, line style = split. The loss
    axis keeps to the runs that did not diverge (sane_loss_range): one diverged run's 1e34
    would flatten every other curve to a line at 0; its own curve leaves the axis."""
    splits, plotted = set(), []
    for run in runs:
        for (tag, split), points in sorted(run['series'].items()):
            if CURVE_OF.get(tag) != curve or not points:
                continue
            xs = [epoch_of(run, tag, step) for step, _ in points]
            ys = [value for _, value in points]
            plotted.append((run, ys))
            style = dict(color=run['color'], linestyle=SPLIT_STYLE.get(split, '-'),
                         gid=run['label'])  # whose line it is, for the tests
            ex, ey = epoch_means(xs, ys)
            if curve == 'loss' and tag in ITER_TAGS and len(ex) < len(xs):
                # every logged training loss faintly, its mean per epoch boldly: the mean
                # lines up with the validation loss measured at the end of each epoch
                ax.plot(xs, ys, alpha=0.25, linewidth=0.8, **style)
                xs, ys = ex, ey
            # the run's marker on every point, or on about 15 of a long curve
            ax.plot(xs, ys, marker=run['marker'], markevery=max(1, len(xs) // 15),
                    markersize=3.5, **style)
            splits.add(split)
    title, ylabel = CURVES[curve]
    ax.set(title=title, xlabel='epoch', ylabel=ylabel)
    limits = sane_loss_range(plotted) if curve == 'loss' else None
    if limits is not None:
        low, high = limits
        margin = 0.05 * (high - low) or 0.05 * abs(high) or 1.0  # matplotlib's own margin
        ax.set_ylim(low - margin, high + margin)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
    ax.grid(alpha=0.3)
    if not splits:
        ax.text(0.5, 0.5, 'no data logged', transform=ax.transAxes, ha='center', color='gray')
    return splits


def legend_handles(runs, splits):
    handles = [Line2D([], [], color=run['color'], marker=run['marker'], markersize=3.5,
                      label=legend_label(run)) for run in runs]
    if len(splits - {''}) > 0:
        handles += [Line2D([], [], color='gray', linestyle=SPLIT_STYLE.get(s, '-'), label=s)
                    for s in sorted(splits - {''})]
    return handles


def assign_styles(runs):
    colors = plt.get_cmap('tab10').colors
    for i, run in enumerate(runs):
        run['color'] = colors[i % len(colors)]
        run['marker'] = MARKERS[i // len(colors) % len(MARKERS)]


def add_legend(fig, handles, fontsize):
    """The legend right of the plots, in as many columns as the figure's height needs, and
    the figure widened by its width: a legend inside the axes hid the curves and was cut
    off after about 21 runs."""
    rows = max(1, int(fig.get_size_inches()[1] * 72 / (1.8 * fontsize)) - 1)  # entry ~1.8 em
    legend = fig.legend(handles=handles, loc='outside right upper', fontsize=fontsize,
                        ncol=math.ceil(len(handles) / rows), frameon=False)
    fig.draw_without_rendering()  # lays the legend out, to measure it
    width, height = fig.get_size_inches()
    fig.set_size_inches(width + legend.get_window_extent().width / fig.dpi, height)
    return legend


def curve_figure(runs, curve):
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout='constrained')
    splits = draw(ax, runs, curve)
    if splits:
        add_legend(fig, legend_handles(runs, splits), 8)
    return fig


def overview_figure(runs):
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout='constrained')
    splits = set()
    for ax, curve in zip(axes.flat, CURVES):
        splits |= draw(ax, runs, curve)
    add_legend(fig, legend_handles(runs, splits), 9)
    return fig


def save_png(fig, path, dpi):
    """fig as a PNG at `path`, written whole or not at all (a report rewritten while a
    viewer has the old figure open never shows half a file)."""
    with safe_files.replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format='png')


def save_figures(runs, out):
    for curve in CURVES:
        fig = curve_figure(runs, curve)
        save_png(fig, os.path.join(out, f'{curve}.png'), dpi=150)
        plt.close(fig)
    fig = overview_figure(runs)
    save_png(fig, os.path.join(out, 'overview.png'), dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- tables
def write_csv(runs, path):
    def write(f):
        writer = csv.writer(f, lineterminator='\n')  # text mode gives the platform's ending
        writer.writerow(['run', 'tag', 'split', 'step', 'epoch', 'value'])
        for run in runs:
            for (tag, split), points in sorted(run['series'].items()):
                for step, value in points:
                    writer.writerow([run['label'], tag, split, step,
                                     round(epoch_of(run, tag, step), 6), repr(float(value))])
    safe_files.atomic_write(path, write)


def run_records(run):
    """Per-epoch records: summary.json's, or, for a run without them (no summary.json),
    rebuilt from the event files. summary.json names an epoch only once its checkpoint is
    written; the event files also hold an epoch whose checkpoint a kill cut short."""
    if 'epochs' in run['summary']:
        return summary_epochs(run['summary'])
    by_epoch = {}
    for key, name in RECORD_KEY.items():
        for step, value in run['series'].get(key, []):
            by_epoch.setdefault(step, {'epoch': step})[name] = value
    return [by_epoch[e] for e in sorted(by_epoch)]


def fmt(value, digits=2):
    return '–' if value is None else f'{value:.{digits}f}'


def fmt_time(seconds):
    if seconds is None:
        return '–'
    minutes, s = divmod(int(round(seconds)), 60)
    return f'{minutes // 60}:{minutes % 60:02d}:{s:02d}'


def run_stats(run):
    """The numbers of one table row (None where the run did not record them)."""
    summary, records = run['summary'], run_records(run)
    with_val = [r for r in records if r.get('val_top1') is not None]
    best = next((r for r in records if r['epoch'] == summary.get('best_epoch')), None)
    if best is None and with_val:
        best = max(with_val, key=lambda r: r['val_top1'])
    final = with_val[-1] if with_val else {}
    def values(key):
        return [r[key] for r in records if r.get(key) is not None]

    times, speeds, memory = values('epoch_time_s'), values('images_per_s'), values('peak_memory_mb')
    wall = summary.get('wall_time_s')
    if wall is None and times:
        wall = sum(times)
    planned = summary.get('epochs_planned')
    if not records and summary.get('status') in (rr.EVALUATED, rr.ATTACKED):
        epochs = '–'  # an evaluation or attack run trains nothing
    else:
        epochs = f'{len(records)}/{planned}' if planned else str(len(records))
    return {
        'epochs': epochs,
        'best_top1': (best or {}).get('val_top1'), 'best_top5': (best or {}).get('val_top5'),
        'best_epoch': (best or {}).get('epoch'),
        'final_top1': final.get('val_top1'), 'final_top5': final.get('val_top5'),
        'train_top1': final.get('train_top1'), 'train_top5': final.get('train_top5'),
        'wall': wall, 'epoch_time': median(times) if times else None,
        'images_per_s': median(speeds) if speeds else None,
        'peak_memory': max(memory) if memory else None,
    }


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]


def comparison_table(runs, stats):
    rows = [[r['label'], r['summary'].get('arch', '–'), s['epochs'],
             fmt(s['best_top1']), fmt(s['best_top5']), fmt(s['final_top1']), fmt(s['final_top5']),
             fmt_time(s['wall']), fmt(s['images_per_s'], 1), fmt(s['peak_memory'], 0)]
            for r, s in zip(runs, stats)]
    return table(['Run', 'Arch', 'Epochs', 'Best top-1', 'Best top-5', 'Final top-1',
                  'Final top-5', 'Wall time', 'Images/s', 'Peak memory (MB)'], rows)


def details_table(runs, stats):
    rows = [[r['label'], r['summary'].get('status', '–'), r['summary'].get('device', '–'),
             f"{r['summary']['num_params']:,}" if r['summary'].get('num_params') else '–',
             s['best_epoch'] or '–', fmt(s['train_top1']), fmt(s['train_top5']),
             fmt_time(s['epoch_time']), f"`{r['dir']}`"]
            for r, s in zip(runs, stats)]
    return table(['Run', 'Status', 'Device', 'Parameters', 'Best epoch', 'Final train top-1',
                  'Final train top-5', 'Time/epoch', 'Folder'], rows)


def results_markdown(runs, stats, command):
    lines = ['# Results', '', f'Made by `{command}`.', '',
             'Validation accuracy in %. *Best* is the epoch with the highest top-1 '
             '(the model_best checkpoint) and its top-5; *final* is the last epoch. '
             'Images/s and time/epoch are medians over epochs (training pass); '
             'peak memory is the largest per-epoch peak of the accelerator (or process).', '']
    lines += comparison_table(runs, stats)
    lines += ['', '## Details', ''] + details_table(runs, stats)
    lines += evaluation_markdown(runs) + attack_markdown(runs)
    lines += ['', '## Curves', ''] + [f'![{c}]({c}.png)' for c in CURVES] + ['']
    return '\n'.join(lines)


def checkpoint_state(result):
    """Whether the file an -e/-a result was computed on is still that file: 'current', or
    'changed' / 'gone' (the result is stale: model_best.pth.tar of a run that went on
    training holds another epoch now); '–' for a result recorded without a fingerprint."""
    fingerprint = result.get('file')
    if not (isinstance(fingerprint, dict) and {'bytes', 'mtime_ns', 'sha256'} <= set(fingerprint)):
        return '–'
    path = result.get('checkpoint') or ''
    if os.path.isdir(path):  # main.py's -e/-a of a run folder read its best model
        path = rr.checkpoint_path(path, rr.BEST)
    return checkpoint.file_changed(path, fingerprint) or 'current'


def checkpoint_cells(result):
    """The Checkpoint, Epoch and File cells of an -e/-a result."""
    state = checkpoint_state(result)
    epoch = result.get('epoch')
    return [f"`{result.get('checkpoint', '–')}`", '–' if epoch is None else epoch,
            state if state in ('current', '–') else f'**stale**: {state}']


def note_stale_results(runs):
    """One line for each -e/-a result whose checkpoint file has changed since."""
    for run in runs:
        for key in rr.RESULT_KEYS:
            result = run['summary'].get(key)
            state = checkpoint_state(result) if isinstance(result, dict) else '–'
            if state not in ('current', '–'):
                why = 'has changed since' if state == 'changed' else 'is gone'
                epoch = '?' if result.get('epoch') is None else result['epoch']
                note(f"{run['dir']}: its {key} result is stale: {result.get('checkpoint')} "
                     f"(epoch {epoch} when evaluated) {why}")


def evaluation_markdown(runs):
    rows = [[r['label']] + checkpoint_cells(e) + [fmt(e.get('top1')), fmt(e.get('top5')),
                                                  fmt(e.get('loss'), 4)]
            for r in runs for e in [r['summary'].get(rr.EVALUATION)] if isinstance(e, dict)]
    if not rows:
        return []
    header = ['Run', 'Checkpoint', 'Epoch', 'File', 'Top-1', 'Top-5', 'Loss']
    return ['', '## Evaluation (`-e`)', ''] + table(header, rows)


def attack_markdown(runs):
    rows = []
    for run in runs:
        a = run['summary'].get(rr.ATTACK)
        if not isinstance(a, dict):
            continue
        drop = (a['clean_top1'] - a['adv_top1']
                if a.get('clean_top1') is not None and a.get('adv_top1') is not None else None)
        rows.append([run['label']] + checkpoint_cells(a) + [
                     fmt(a.get('clean_top1')), fmt(a.get('adv_top1')), fmt(drop),
                     fmt(a.get('clean_top5')), fmt(a.get('adv_top5')),
                     fmt(a.get('clean_top1_noflip')), fmt(a.get('adv_top1_noflip')),
                     fmt(a.get('success_rate')),
                     a.get('num_steps', '–'), a.get('step_size', '–'), a.get('epsilon', '–')])
    if not rows:
        return []
    # accuracies with the flip test-time augmentation (the handout's), then without it
    # (schema 2): an attack crafted on the plain image can lose part of its effect
    # on the mirrored one, so the flip-averaged figure is the kinder of the two
    return ['', '## Adversarial attack (`-a`): clean vs adversarial', ''] + table(
        ['Run', 'Checkpoint', 'Epoch', 'File', 'Clean top-1', 'Adv top-1', 'Top-1 drop',
         'Clean top-5', 'Adv top-5', 'Clean top-1 (no flip)', 'Adv top-1 (no flip)',
         'Success rate', 'Steps', 'Step size', 'Epsilon'], rows)


# ----------------------------------------------------------------------------- main
def default_labels(run_dirs, summaries=None):
    """summary.json's run name, or the folder name; folder names where names repeat."""
    summaries = summaries or [read_summary(d) for d in run_dirs]
    names = [s.get('name') or os.path.basename(os.path.normpath(d))
             for s, d in zip(summaries, run_dirs)]
    return [n if names.count(n) == 1 else os.path.basename(os.path.normpath(d))
            for n, d in zip(names, run_dirs)]


def out_error(out, e):
    """The one line for an --out folder that cannot be written."""
    return f'report.py: --out {out}: cannot write there ({e.strerror or e})'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='*', metavar='RUN', help='run folder(s) of main.py, or logs/')
    parser.add_argument('--out', required=True, help='output folder, e.g. results/custom_vs_native')
    parser.add_argument('--labels', nargs='+', help='legend names, one per run (default: run name)')
    args = parser.parse_args(argv)
    if not args.runs:
        raise SystemExit('report.py: no run given: '
                         'python tools/report.py RUN [RUN ...] --out results/NAME')
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # before any work
        raise SystemExit(f'report.py: --out {args.out} is a file, not a folder')
    run_dirs = find_runs(args.runs)
    close_dead_runs(run_dirs)
    summaries = [read_summary(d) for d in run_dirs]  # once: a damaged one gets one note
    labels = args.labels or default_labels(run_dirs, summaries)
    if len(labels) != len(run_dirs):
        raise SystemExit(f'report.py: {len(labels)} labels for {len(run_dirs)} runs '
                         f'({", ".join(run_dirs)})')
    runs = [run for run in map(load_run, run_dirs, labels, summaries) if run is not None]
    if not runs:
        raise SystemExit('report.py: nothing to report: no event files or summary.json in '
                         + ', '.join(run_dirs))
    note_stale_results(runs)
    assign_styles(runs)
    stats = [run_stats(run) for run in runs]
    # quoted, so that it pastes into a shell (a folder name with a space stays one word)
    command = shlex.join(['python', 'tools/report.py']
                         + (argv if argv is not None else sys.argv[1:]))
    try:
        os.makedirs(args.out, exist_ok=True)
        save_figures(runs, args.out)
        write_csv(runs, os.path.join(args.out, 'curves.csv'))
        safe_files.atomic_write(os.path.join(args.out, 'results.md'),
                                lambda f: f.write(results_markdown(runs, stats, command)))
    except OSError as e:  # read-only, a file in the way, /proc, a full disk ...
        raise SystemExit(out_error(args.out, e))
    print('\n'.join(comparison_table(runs, stats)))
    print(f'Figures and tables of {len(runs)} run(s) are in {args.out}/: {" ".join(OUTPUTS)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
