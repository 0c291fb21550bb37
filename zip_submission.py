"""Pack the submission: `python zip_submission.py` (from the repository root).

Puts code/, writeup/ and results/ into submission.zip next to this script, and
leaves out what the handout forbids or a course site chokes on: data/, logs/ and
models/ folders, checkpoints (*.pth, *.pth.tar, *.pt), caches, virtual
environments, hidden files (.DS_Store, .ipynb_checkpoints, ...) and every file
whose real path lies outside the repository (symlinks, and code/, writeup/ or
results/ themselves when they are symlinks). Prints what went in and the total
size. Refuses file names with control characters (a newline in a name breaks the
listing, and unzip tools disagree about such names).

The zip is written to a temporary file of its own and renamed at the end, so an
error or Ctrl-C never leaves a half-written submission.zip behind (an older one
stays), and two runs at once never write into one file; the temporary file of a run
killed outright is removed by the next run (code/toolkit/safe_files.py, the toolkit's own
atomic write, which this script borrows from code/).
"""
import os
import signal
import sys
import unicodedata
import zipfile

ROOT = os.path.dirname(os.path.abspath(__file__))  # works from any working directory
# code/ last on the path: a student's file there never shadows a module of Python's own;
# no __pycache__ written into the folder being packed
sys.path.append(os.path.join(ROOT, 'code'))
sys.dont_write_bytecode = True
try:
    from toolkit import safe_files
except ImportError:  # code/ missing (check_folders says so) or incomplete
    safe_files = None

FOLDERS = ('code', 'writeup', 'results')
OUTPUT = 'submission.zip'
SKIP_DIRS = {'data', 'logs', 'models', '__pycache__', 'venv'}  # plus hidden ones (.venv, .git)
CHECKPOINTS = ('.pth', '.pth.tar', '.pt')
CACHES = ('.pyc', '.pyo')
# A correct submission (code, a PDF, a few figures) is a few MB. Course sites and
# mail servers refuse or time out on uploads of hundreds of MB, and a zip above
# 100 MB almost always holds a dataset, logs or a checkpoint by mistake.
SIZE_LIMIT_MB = 100


def skip_reason(rel):
    """Why a path (relative to the repository root) stays out of the zip, or None."""
    parts = rel.split(os.sep)
    for part in parts[:-1]:
        if part in SKIP_DIRS:
            return f'inside a {part}/ folder'
        if part.startswith('.'):
            return 'inside a hidden folder'
    name = parts[-1]
    if name.startswith('.'):
        return 'hidden file'
    if name.endswith(CHECKPOINTS):
        return 'checkpoint'
    if name.endswith(CACHES):
        return 'Python cache'
    if name == OUTPUT:
        return 'an earlier submission'
    return None


def skip_dir_reason(path, name):
    if name in SKIP_DIRS:
        return f'{name}/ folder'
    if name.startswith('.'):
        return 'hidden folder'
    if any(os.path.exists(os.path.join(path, marker)) for marker in ('pyvenv.cfg', 'conda-meta')):
        return 'virtual environment'
    if os.path.islink(path):
        return 'symlinked folder (copy it in if it belongs to the submission)'
    return None


def outside(path, root):
    """The real path of `path` when it lies outside the repository `root`, else None."""
    target = os.path.realpath(path)
    return target if os.path.commonpath([target, root]) != root else None


def link_reason(path, root):
    """Why a symlink stays out: it points outside the repository, nowhere, or at a left-out file."""
    target = os.path.realpath(path)
    if outside(path, root):
        return f'symlink to {target}, outside the repository'
    if not os.path.isfile(target):
        return 'symlink to nothing'
    reason = skip_reason(os.path.relpath(target, root))
    return reason and f'symlink to a left-out file ({reason})'


def collect(root):
    """([(path, name in zip)], [(name, why left out)]) for the submission folders."""
    root = os.path.realpath(root)
    files, skipped = [], []
    for folder in FOLDERS:
        target = outside(os.path.join(root, folder), root)
        if target:  # e.g. results/ -> ~/Desktop/figures: os.walk would follow it
            skipped.append((folder + '/', f'symlink to {target}, outside the repository'))
            continue
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            for name in sorted(dirnames):
                why = skip_dir_reason(os.path.join(dirpath, name), name)
                if why:
                    dirnames.remove(name)  # do not descend
                    skipped.append((os.path.relpath(os.path.join(dirpath, name), root) + '/', why))
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                why = skip_reason(rel)
                if not why and os.path.islink(path):
                    why = link_reason(path, root)
                if not why and outside(path, root):  # never pack what is not in the repository
                    why = f'real path {os.path.realpath(path)} is outside the repository'
                if not why and not os.path.isfile(path):
                    why = 'not a regular file'
                if why:
                    skipped.append((rel, why))
                else:
                    files.append((path, rel.replace(os.sep, '/')))
    return files, skipped


def bad_name(name):
    """True for a name with a control character (newline, tab, escape, ...) or with bytes
    that are not UTF-8 (zip stores names as UTF-8; zipfile would fail half-way)."""
    try:
        name.encode('utf-8')
    except UnicodeEncodeError:
        return True
    return any(unicodedata.category(c) == 'Cc' for c in name)


def remove_leftovers(root):
    """Delete temporary zips of earlier runs killed before they could clean up (SIGKILL,
    a power cut): each can be as big as a submission. A run at work keeps its own."""
    for path, _ in safe_files.remove_dead_temp_files(root):
        print(f'  removed  {os.path.basename(path)}  (left by an interrupted run)')


def write_zip(files, out):
    """Write to a temporary file beside `out`, then rename: `out` is whole or untouched,
    also on Ctrl-C and SIGTERM (the temporary file is removed)."""
    with safe_files.replacing(out) as tmp:
        with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_DEFLATED) as zf:
            for path, name in files:
                zf.write(path, name)


def human(size):
    for unit in ('B', 'KB', 'MB', 'GB'):
        if size < 1024 or unit == 'GB':
            return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
        size /= 1024


def check_folders(root):
    if not os.path.isdir(os.path.join(root, 'code')):
        raise SystemExit(f'zip_submission.py: no code/ folder in {root}; '
                         'it must sit in the assignment folder beside code/, writeup/ and results/')
    if safe_files is None:
        raise SystemExit(f'zip_submission.py: code/toolkit/safe_files.py is missing in {root} (it '
                         'writes the zip safely); restore it from the toolkit')
    for folder in ('writeup', 'results'):
        if not os.path.isdir(os.path.join(root, folder)):
            print(f'warning: no {folder}/ folder; packing the rest (the handout asks for '
                  f'{folder}/ in the submission)', file=sys.stderr)
    writeup = os.path.join(root, 'writeup')
    if os.path.isdir(writeup) and not any(f.lower().endswith('.pdf') for f in os.listdir(writeup)):
        print('warning: writeup/ holds no PDF; the handout asks for the report as a PDF',
              file=sys.stderr)


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up like Ctrl-C
    check_folders(ROOT)
    remove_leftovers(ROOT)
    files, skipped = collect(ROOT)
    if not files:
        raise SystemExit('zip_submission.py: nothing to pack in code/, writeup/ and results/')
    bad = [name for name in [n for _, n in files] + [n for n, _ in skipped] if bad_name(name)]
    if bad:
        raise SystemExit(f'zip_submission.py: {len(bad)} file name(s) with control characters '
                         f'or bytes that are not UTF-8; rename them: '
                         + ', '.join(repr(name) for name in bad))
    for name, why in skipped:
        print(f'  left out  {name}  ({why})')
    unpacked = 0
    for path, name in files:
        size = os.path.getsize(path)
        unpacked += size
        print(f'  {human(size):>9}  {name}')
    out = os.path.join(ROOT, OUTPUT)
    try:
        write_zip(files, out)
    except KeyboardInterrupt:
        raise SystemExit('zip_submission.py: interrupted; no zip written')
    size = os.path.getsize(out)
    print(f'{out}: {len(files)} files, {human(size)} ({human(unpacked)} unpacked)')
    if size > SIZE_LIMIT_MB * 1024 ** 2:
        biggest = sorted(files, key=lambda f: -os.path.getsize(f[0]))[:5]
        print(f'warning: {OUTPUT} is over {SIZE_LIMIT_MB} MB, more than a course site is likely '
              f'to accept; the biggest files: {", ".join(name for _, name in biggest)}',
              file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
