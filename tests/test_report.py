"""tools/report.py: runs written with SummaryWriter exactly as main.py writes them go in,
and the figures, the CSV of curves and the results table must hold what was written."""
import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import matplotlib.image
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from conftest import temp_file_of_a_dead_writer
import fake_runs
import report
from toolkit import checkpoint
from toolkit import run_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IPE = 6  # iterations per epoch of the fake runs (logged every 2nd iteration)
# the resumed session's values differ by this much: its accuracies stay percentages
RESUMED = 7.0


@pytest.fixture(scope='module')
def logs(tmp_path_factory):
    """Two finished runs of different lengths and a resumed one, in one logs/ folder."""
    root = tmp_path_factory.mktemp('logs')
    fake_runs.make_run(str(root / 'exp_20240101_000000_native'), 8, IPE, name='native')
    fake_runs.make_run(str(root / 'exp_20240101_000100_custom'), 4, IPE, name='custom')
    fake_runs.make_resumed_run(str(root / 'exp_20240101_000200_resumed'), IPE, offset=RESUMED)
    return root


@pytest.fixture(scope='module')
def report_out(logs, tmp_path_factory):
    out = tmp_path_factory.mktemp('results') / 'cmp'
    # a folder of runs expands to its runs, in name order
    assert report.main([str(logs), '--out', str(out), '--labels', 'native', 'custom', 'resumed']) == 0
    return out


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def curve(rows, run, tag, split):
    """{step: (epoch, value)} of one curve; fails on a step listed twice."""
    points = {}
    for r in rows:
        if (r['run'], r['tag'], r['split']) == (run, tag, split):
            assert int(r['step']) not in points, f'step {r["step"]} of {run} {tag} listed twice'
            points[int(r['step'])] = (float(r['epoch']), float(r['value']))
    return points


def table_rows(md_path):
    """The comparison table of results.md as {run: {column: cell}}."""
    lines = open(md_path).read().split('\n')
    start = next(i for i, line in enumerate(lines) if line.startswith('| Run | Arch'))
    header = [c.strip() for c in lines[start].strip('|').split('|')]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_figures_are_non_empty_pngs(report_out):
    for name in ['loss.png', 'lr.png', 'top1.png', 'top5.png', 'overview.png']:
        path = report_out / name
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', name
        image = matplotlib.image.imread(str(path))
        assert image.shape[0] > 400 and image.shape[1] > 600, name
        assert image[..., :3].std() > 0.05, f'{name} is blank'  # lines and text, not one colour


def test_csv_holds_every_logged_value_on_an_epoch_axis(report_out):
    rows = read_csv(report_out / 'curves.csv')
    for run, epochs in (('native', 8), ('custom', 4)):
        val = curve(rows, run, 'data/top1_accuracy', 'val')
        assert sorted(val) == list(range(1, epochs + 1))
        for step, (epoch, value) in val.items():
            assert epoch == step and value == pytest.approx(fake_runs.acc_at(step, 'val'))
        train5 = curve(rows, run, 'data/top5_accuracy', 'train')
        assert train5[epochs][1] == pytest.approx(fake_runs.acc_at(epochs, 'train', 5))
        loss = curve(rows, run, 'data/training_loss', 'train')
        assert sorted(loss) == list(range(0, epochs * IPE, 2))  # every 2nd iteration
        for step, (epoch, value) in loss.items():
            assert epoch == pytest.approx((step + 1) / IPE, abs=1e-6)
            assert value == pytest.approx(fake_runs.loss_at(step), rel=1e-6)
        lr = curve(rows, run, 'data/learning_rate', '')
        assert lr[4][1] == pytest.approx(fake_runs.lr_at(4), rel=1e-6)
        assert curve(rows, run, 'perf/peak_memory_mb', '')[2][1] == pytest.approx(52.0)


def test_resumed_run_keeps_the_later_write_of_a_repeated_step(report_out):
    rows = read_csv(report_out / 'curves.csv')
    val = curve(rows, 'resumed', 'data/top1_accuracy', 'val')
    assert sorted(val) == [1, 2, 3, 4, 5]
    assert val[2][1] == pytest.approx(fake_runs.acc_at(2, 'val'))           # written once
    assert val[3][1] == pytest.approx(fake_runs.acc_at(3, 'val', 1, RESUMED))  # twice: resumed wins
    loss = curve(rows, 'resumed', 'data/training_loss', 'train')
    assert sorted(loss) == list(range(0, 5 * IPE, 2))
    assert loss[2][1] == pytest.approx(fake_runs.loss_at(2), rel=1e-6)
    # epoch 4 was cut short in the first session, re-run in the second
    assert loss[18][1] == pytest.approx(fake_runs.loss_at(18, RESUMED), rel=1e-6)


def test_table_matches_what_the_runs_wrote(report_out):
    rows = table_rows(report_out / 'results.md')
    assert list(rows) == ['native', 'custom', 'resumed']
    native = rows['native']
    assert native['Epochs'] == '8/8' and native['Arch'] == 'SimpleNet'
    assert native['Best top-1'] == f"{fake_runs.acc_at(8, 'val'):.2f}"
    assert native['Best top-5'] == f"{fake_runs.acc_at(8, 'val', 5):.2f}"
    assert native['Final top-1'] == f"{fake_runs.acc_at(8, 'val'):.2f}"
    assert native['Images/s'] == f'{(400 + 500) / 2:.1f}'       # median of 100..800
    assert native['Peak memory (MB)'] == '58'                    # max of 51..58
    assert native['Wall time'] == '0:01:56'                      # 11 + ... + 18 = 116 s
    assert rows['custom']['Epochs'] == '4/4'
    assert rows['custom']['Final top-5'] == f"{fake_runs.acc_at(4, 'val', 5):.2f}"
    assert rows['resumed']['Final top-1'] == f"{fake_runs.acc_at(5, 'val', 1, RESUMED):.2f}"
    md = (report_out / 'results.md').read_text()
    assert '![top1](top1.png)' in md and 'Evaluation' not in md and 'Adversarial' not in md


def test_labels_must_match_the_runs(logs, tmp_path):
    with pytest.raises(SystemExit, match='2 labels for 3 runs'):
        report.main([str(logs), '--out', str(tmp_path / 'out'), '--labels', 'a', 'b'])


@pytest.fixture(scope='module')
def odd_runs(tmp_path_factory):
    """An unfinished run, a run without event files, an attack run and an empty folder,
    reported together: (output folder, what report.py printed to stderr)."""
    root = tmp_path_factory.mktemp('odd')
    unfinished = root / 'exp_unfinished'
    unfinished.mkdir()
    fake_runs.write_events(str(unfinished), 0, 2, IPE, partial_iters=3)
    fake_runs.write_summary(str(unfinished), [fake_runs.epoch_record(e, IPE) for e in (1, 2)],
                            IPE, planned=10, status='running')
    no_events = root / 'exp_no_events'
    no_events.mkdir()
    fake_runs.write_summary(str(no_events), [fake_runs.epoch_record(e, IPE) for e in (1, 2, 3)], IPE)
    fake_runs.make_run(str(root / 'exp_20240101_attack'), 2, IPE, name='attacked', status='attacked',
                       evaluation={'checkpoint': 'm.pth.tar', 'top1': 41.5, 'top5': 70.25},
                       attack={'checkpoint': 'm.pth.tar', 'clean_top1': 41.5, 'clean_top5': 70.25,
                               'adv_top1': 3.5, 'adv_top5': 20.0, 'success_rate': 91.5,
                               'num_steps': 10, 'step_size': 0.01, 'epsilon': 0.1})
    (root / 'exp_empty').mkdir()
    # an evaluation run as main.py -e -v writes it: images in the event file, no scalars
    evaluated = root / 'exp_20240101_eval'
    with SummaryWriter(str(evaluated)) as writer:
        writer.add_image('Image/Org_Image', torch.zeros(3, 4, 4), 0)
    fake_runs.write_summary(str(evaluated), [], 0, planned=90, status='evaluated', name='eval',
                            evaluation={'checkpoint': 'best.pth.tar', 'top1': 45.0, 'top5': 75.5,
                                        'loss': 2.25})
    out = root / 'out'
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert report.main([str(root / d) for d in ('exp_unfinished', 'exp_no_events',
                                                    'exp_20240101_attack', 'exp_empty',
                                                    'exp_20240101_eval')]
                           + ['--out', str(out)]) == 0
    return out, err.getvalue()


def test_unfinished_and_empty_runs_are_reported_on_one_line_each(odd_runs):
    out, err = odd_runs
    lines = err.strip().split('\n')
    for expected in ('exp_unfinished is unfinished (2 of 10 epochs); plotting what exists',
                     'exp_no_events has no event files; plotting what summary.json holds',
                     'exp_empty has no event files and no summary.json; skipped',
                     'exp_20240101_eval is an evaluation run: no curves, its results go into the tables'):
        assert sum(expected in line for line in lines) == 1, (expected, lines)
    rows = table_rows(out / 'results.md')
    assert list(rows) == ['exp_unfinished', 'exp_no_events', 'attacked', 'eval']  # default labels
    assert rows['eval']['Epochs'] == '–' and rows['eval']['Best top-1'] == '–'
    assert rows['exp_unfinished']['Epochs'] == '2/10'
    assert rows['exp_unfinished']['Final top-1'] == f"{fake_runs.acc_at(2, 'val'):.2f}"
    for name in ['loss.png', 'lr.png', 'top1.png', 'top5.png', 'overview.png']:
        assert (out / name).stat().st_size > 1000


def test_run_without_event_files_is_plotted_from_its_summary(odd_runs):
    rows = read_csv(odd_runs[0] / 'curves.csv')
    val = curve(rows, 'exp_no_events', 'summary/top1', 'val')
    assert {step: value for step, (_, value) in val.items()} == pytest.approx(
        {e: fake_runs.acc_at(e, 'val') for e in (1, 2, 3)})
    assert curve(rows, 'exp_no_events', 'summary/loss', 'train')[2][1] == pytest.approx(
        fake_runs.loss_at(2 * IPE - 1))
    # the unfinished run's partial epoch is plotted too
    assert max(curve(rows, 'exp_unfinished', 'data/training_loss', 'train')) == 2 * IPE + 2


def test_evaluation_and_attack_results(odd_runs):
    md = (odd_runs[0] / 'results.md').read_text()
    # results recorded without the epoch and the file's fingerprint: '–' in both
    assert '| attacked | `m.pth.tar` | – | – | 41.50 | 70.25 | – |' in md
    assert '| eval | `best.pth.tar` | – | – | 45.00 | 75.50 | 2.2500 |' in md
    assert ('| attacked | `m.pth.tar` | – | – | 41.50 | 3.50 | 38.00 | 70.25 | 20.00 | – | – | 91.50 | 10 | 0.01 | 0.1 |'
            in md)


@pytest.mark.slow
def test_bad_input_one_line_errors(tmp_path):
    empty = tmp_path / 'exp_empty'
    empty.mkdir()
    with pytest.raises(SystemExit, match='nothing to report: no event files or summary.json'):
        report.main([str(empty), '--out', str(tmp_path / 'out')])
    with pytest.raises(SystemExit, match='no such run folder'):
        report.main([str(tmp_path / 'missing'), '--out', str(tmp_path / 'out')])
    # the command line: no run at all
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'report.py'), '--out', 'x'],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().count('\n') == 0 and 'no run given' in proc.stderr


def test_run_without_summary_estimates_iterations_per_epoch(logs, tmp_path, capsys):
    run_dir = tmp_path / 'exp_no_summary'
    shutil.copytree(logs / 'exp_20240101_000000_native', run_dir)
    (run_dir / 'summary.json').unlink()
    run = report.load_run(str(run_dir), 'x')
    assert run['ipe'] == IPE
    assert 'no iters_per_epoch in summary.json; estimated from the logs' in capsys.readouterr().err
    stats = report.run_stats(run)  # the table falls back to the event files
    assert stats['epochs'] == '8' and stats['final_top1'] == pytest.approx(fake_runs.acc_at(8, 'val'))
    assert stats['peak_memory'] == pytest.approx(58.0) and stats['wall'] == pytest.approx(116.0)


@pytest.fixture(scope='module')
def fifty_runs(tmp_path_factory):
    """50 runs of 3 epochs (summary.json only: the figures are drawn the same way, and it
    keeps the test fast), each with its own values."""
    root = tmp_path_factory.mktemp('fifty')
    for i in range(50):
        run_dir = root / f'exp_20240101_{i:06d}'
        run_dir.mkdir()
        fake_runs.write_summary(str(run_dir), [fake_runs.epoch_record(e, IPE, offset=i)
                                               for e in (1, 2, 3)], IPE, name=f'run{i:02d}')
    return root


@pytest.mark.slow
def test_fifty_runs_stay_readable(fifty_runs, tmp_path):
    out = tmp_path / 'out'
    with contextlib.redirect_stderr(io.StringIO()):
        assert report.main([str(fifty_runs), '--out', str(out)]) == 0
        run_dirs = report.find_runs([str(fifty_runs)])
        runs = [report.load_run(d, label)
                for d, label in zip(run_dirs, report.default_labels(run_dirs))]
    labels = [f'run{i:02d}' for i in range(50)]
    assert [run['label'] for run in runs] == labels
    report.assign_styles(runs)
    for name, fig, dpi in [('top1', report.curve_figure(runs, 'top1'), 150),
                           ('overview', report.overview_figure(runs), 120)]:
        fig.savefig(str(tmp_path / f'{name}.png'), dpi=dpi)
        # the figure checked here is the one report.main saved: same size in pixels
        saved = matplotlib.image.imread(str(out / f'{name}.png'))
        assert saved.shape[:2] == matplotlib.image.imread(str(tmp_path / f'{name}.png')).shape[:2]
        assert abs(saved.shape[1] - fig.get_size_inches()[0] * dpi) <= 1  # nothing cropped
        (legend,) = fig.legends
        handles = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
        assert set(labels) <= set(handles), name
        looks = {label: (tuple(handles[label].get_color()), handles[label].get_marker())
                 for label in labels}
        assert len(set(looks.values())) == 50, f'{name}: two runs look the same'
        for ax in fig.axes:  # each drawn curve looks like its run's legend entry
            for line in ax.get_lines():
                if line.get_marker() not in (None, 'None', ''):
                    assert (tuple(line.get_color()), line.get_marker()) == looks[line.get_gid()]
        # the legend lies inside the saved figure and covers no plot
        box = legend.get_window_extent()
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, name
        assert fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, name
        assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes), name
        matplotlib.pyplot.close(fig)


def test_a_summary_of_an_unknown_schema_version_is_refused_in_one_line(tmp_path):
    run = str(tmp_path / 'run')
    fake_runs.make_run(run, 2)
    path = os.path.join(run, 'summary.json')
    summary = json.load(open(path))
    summary['schema'] = 99
    with open(path, 'w') as f:
        json.dump(summary, f)
    with pytest.raises(SystemExit) as exc:
        report.main([run, '--out', str(tmp_path / 'out')])
    assert 'schema version 99' in str(exc.value) and '\n' not in str(exc.value)


def test_a_summary_of_another_json_type_is_skipped_as_damaged(logs, tmp_path):
    """`[]` or `null` in summary.json (a damaged file): a note, and the run's event files;
    neither a traceback nor the end of the report."""
    root = tmp_path / 'runs'
    shutil.copytree(logs / 'exp_20240101_000100_custom', root / 'exp_good')
    for name, text in (('exp_list', '[]'), ('exp_null', 'null')):
        shutil.copytree(logs / 'exp_20240101_000100_custom', root / name)
        (root / name / 'summary.json').write_text(text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert report.main([str(root), '--out', str(tmp_path / 'out')]) == 0
    lines = err.getvalue().strip().split('\n')
    for name, kind in (('exp_list', 'list'), ('exp_null', 'NoneType')):
        notes = [line for line in lines if f'{name}/summary.json holds JSON {kind}' in line]
        assert len(notes) == 1 and 'using the event files only' in notes[0], lines
    rows = table_rows(tmp_path / 'out' / 'results.md')
    assert list(rows) == ['custom', 'exp_list', 'exp_null']
    assert rows['exp_list']['Final top-1'] == f"{fake_runs.acc_at(4, 'val'):.2f}"  # from events


def test_one_diverged_run_does_not_flatten_the_loss_of_the_others(tmp_path):
    """A run that diverged to a loss of 2.8e34 among runs near 1 to 5: the loss axis keeps
    to the others' range, and the legend says which run diverged (its summary's status)."""
    for i in range(3):
        fake_runs.make_run(str(tmp_path / f'exp_{i}'), 3, IPE, name=f'run{i}')
    bad = tmp_path / 'exp_bad'
    with SummaryWriter(str(bad)) as writer:
        for step, loss in enumerate([4.6, 4.2, 3.9, 40.0, 3e9, 2.8e34]):
            writer.add_scalar('data/training_loss', loss, 2 * step)
    fake_runs.write_summary(str(bad), [], IPE, planned=3, status='diverged', name='bad')
    with contextlib.redirect_stderr(io.StringIO()):
        run_dirs = report.find_runs([str(tmp_path)])
        runs = [report.load_run(d, label)
                for d, label in zip(run_dirs, report.default_labels(run_dirs))]
    report.assign_styles(runs)
    for fig in (report.curve_figure(runs, 'loss'), report.overview_figure(runs)):
        ax = fig.axes[0]  # the loss, in both
        low, high = ax.get_ylim()
        assert 0 < high < 6 and low > 0, (low, high)  # the others' losses: 0.5 to 4.6
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert 'bad (diverged)' in texts and 'run0' in texts, texts
        matplotlib.pyplot.close(fig)


LOCK_HOLDER = '''import sys, time
sys.path.insert(0, sys.argv[1])
from toolkit import run_folder
run_folder.run_lock(sys.argv[2]).__enter__()
print('locked', flush=True)
time.sleep(600)
'''


@pytest.mark.slow
def test_a_run_killed_while_running_is_marked_interrupted(tmp_path):
    """A training whose process was killed (kill -9) still says 'running': report.py finds
    its lock free, marks it interrupted and removes its temporary files. A run whose lock
    is held is left alone; a failed run is reported as unfinished."""
    killed, alive, failed = (str(tmp_path / name) for name in ('killed', 'alive', 'failed'))
    for run in (killed, alive):
        fake_runs.make_run(run, 2, IPE, status='running', epochs_planned=10)
        os.makedirs(os.path.join(run, 'models'))
        with open(temp_file_of_a_dead_writer(os.path.join(run, 'models', 'checkpoint.pth.tar')),
                  'wb') as f:
            f.write(b'\0' * 100)  # the write that the kill cut short
    fake_runs.make_run(failed, 2, IPE, status='failed', epochs_planned=10)
    holder = subprocess.Popen([sys.executable, '-c', LOCK_HOLDER, os.path.join(REPO, 'code'),
                               killed], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    holder.kill()  # SIGKILL: nothing of it runs again, its lock file keeps its name
    holder.wait(timeout=60)
    err = io.StringIO()
    with run_folder.run_lock(alive), contextlib.redirect_stderr(err):
        assert report.main([killed, alive, failed, '--out', str(tmp_path / 'out')]) == 0
    lines = err.getvalue().strip().split('\n')
    assert sum('killed was killed while running' in line and '1 temporary file' in line
               for line in lines) == 1, lines
    assert not any('alive was killed' in line for line in lines), lines
    assert any('failed is unfinished (2 of 10 epochs)' in line for line in lines), lines
    status = {run: json.load(open(os.path.join(run, 'summary.json')))['status']
              for run in (killed, alive, failed)}
    assert status == {killed: 'interrupted', alive: 'running', failed: 'failed'}
    assert os.listdir(os.path.join(killed, 'models')) == []
    assert os.listdir(os.path.join(alive, 'models')) == [os.path.basename(
        temp_file_of_a_dead_writer(os.path.join(alive, 'models', 'checkpoint.pth.tar')))]


def test_an_epoch_killed_while_being_saved_is_not_claimed(tmp_path):
    """kill -9 during the first checkpoint write: the event files log epoch 1, summary.json
    holds no epoch and no checkpoint exists. The table says 0 of 2 epochs, no best."""
    run = str(tmp_path / 'killed')
    os.makedirs(run)
    fake_runs.write_events(run, 0, 1, IPE)
    fake_runs.write_summary(run, [], IPE, planned=2, status='interrupted')
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert report.main([run, '--out', str(tmp_path / 'out')]) == 0
    row = table_rows(tmp_path / 'out' / 'results.md')['killed']
    assert (row['Epochs'], row['Best top-1'], row['Final top-1']) == ('0/2', '–', '–'), row
    assert 'its event files log epoch(s) 1 that summary.json does not hold' in err.getvalue()


@pytest.mark.parametrize('out', ['/etc/passwd', 'FILE/sub', '/proc/x'])
def test_an_unusable_out_folder_is_one_line(logs, tmp_path, out):
    """main's SystemExit(message) is what Python prints as the script's one line, exit 1
    (test_bad_input_one_line_errors runs the script itself)."""
    (tmp_path / 'FILE').write_text('a file')
    out = out if out.startswith('/') else str(tmp_path / out)
    with pytest.raises(SystemExit) as info:
        report.main([str(logs), '--out', out])
    line = info.value.code
    assert isinstance(line, str) and '\n' not in line, line
    assert line.startswith(f'report.py: --out {out}'), line


@pytest.mark.slow
def test_a_result_on_a_checkpoint_changed_since_is_shown_stale(tmp_path):
    """An -e of model_best.pth.tar while the run trains on: the run then saves a better
    epoch into the same file. The result names the epoch it evaluated and is marked stale."""
    run = str(tmp_path / 'run')
    best = os.path.join(run, 'models', 'model_best.pth.tar')
    os.makedirs(os.path.dirname(best))
    with open(best, 'wb') as f:
        f.write(b'epoch 1 weights')
    with open(best, 'rb') as f:
        fingerprint = checkpoint.file_fingerprint(f)
    assert fingerprint['sha256'] == hashlib.sha256(b'epoch 1 weights').hexdigest()
    fake_runs.make_run(run, 2, IPE, evaluation={'checkpoint': best, 'epoch': 1, 'top1': 10.0,
                                                'file': fingerprint})
    out = tmp_path / 'out'

    def evaluation_row():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert report.main([run, '--out', str(out)]) == 0
        md = (out / 'results.md').read_text()
        return md[md.index('## Evaluation'):].splitlines()[4], err.getvalue()
    row, err = evaluation_row()
    assert f'| run | `{best}` | 1 | current | 10.00 |' in row and 'stale' not in err
    os.utime(best, ns=(1, 1))  # touched, same bytes: still the file evaluated
    assert '| 1 | current |' in evaluation_row()[0]
    with open(best, 'wb') as f:
        f.write(b'epoch 2 weights')  # the same size: only the bytes tell
    row, err = evaluation_row()
    assert '| 1 | **stale**: changed | 10.00 |' in row, row
    assert f'its evaluation result is stale: {best} (epoch 1 when evaluated) has changed' in err
    os.remove(best)
    assert '| 1 | **stale**: gone |' in evaluation_row()[0]


def test_an_interrupted_report_leaves_the_previous_one_whole(logs, tmp_path, monkeypatch):
    """Ctrl-C while results.md is being written: the figures, curves.csv and results.md of
    the previous report are still there, whole, and no temporary file is left beside them."""
    out = tmp_path / 'cmp'
    assert report.main([str(logs), '--out', str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == set(report.OUTPUTS)

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, 'results_markdown', interrupted)
    for name in ('curves.csv', 'top1.png'):      # so that a rewrite would show
        (out / name).write_bytes(before[name] + b'old')
    with pytest.raises(KeyboardInterrupt):
        report.main([str(logs), '--out', str(out)])
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(report.OUTPUTS), sorted(after)   # no temporary file
    assert after['results.md'] == before['results.md']
    assert after['curves.csv'] == before['curves.csv']        # written anew, whole
    assert after['top1.png'][:8] == b'\x89PNG\r\n\x1a\n'


# a field of the wrong type (or a number out of its range) in an otherwise good summary:
# run name -> (field, value, the start of its note)
WRONG_FIELDS = {
    'epoch_a': ('epochs', [{'epoch': 'a'}], "epochs[2].epoch is 'a'"),   # after the 2 good
    'wall': ('wall_time_s', 'x', "wall_time_s is 'x'"),
    'eval': ('evaluation', {'checkpoint': 'm.pth.tar', 'top1': 'x', 'top5': 70.0},
             "evaluation.top1 is 'x'"),
    'best': ('best_acc1', 250.0, 'best_acc1 is 250.0'),
    'name': ('name', 7, 'name is 7'),
    'lots': ('epochs', 'lots', "epochs is 'lots', not a list"),
}


@pytest.fixture(scope='module')
def damaged(tmp_path_factory):
    """Runs whose summary.json is valid JSON with a field of the wrong type, and a run whose
    event files are cut to 100 bytes (a partial copy), reported together into a folder
    whose name has a space: (root, out, argv, the notes printed, the cut files)."""
    root = tmp_path_factory.mktemp('damaged')
    for name, (field, value, _) in WRONG_FIELDS.items():
        run = str(root / name)
        summary = fake_runs.make_run(run, 2, IPE, name=name)
        summary[field] = summary['epochs'] + value if name == 'epoch_a' else value
        with open(os.path.join(run, 'summary.json'), 'w') as f:
            json.dump(summary, f)
    fake_runs.make_run(str(root / 'cut'), 3, IPE, name='cut')
    cut = sorted((root / 'cut').rglob('events.out.tfevents.*'))
    for path in cut:
        with open(path, 'r+b') as f:
            f.truncate(100)
    out = root / 'my results'
    argv = [str(root), '--out', str(out)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert report.main(argv) == 0
    return root, out, argv, err.getvalue().strip().split('\n'), cut


@pytest.mark.parametrize('name', list(WRONG_FIELDS))
def test_a_field_of_the_wrong_type_is_one_note_and_the_report_is_written(damaged, name):
    """One note naming the file and the field, and the rest of the run in the report."""
    root, out, _, lines, _ = damaged
    notes = [line for line in lines if f'{root / name}/summary.json' in line]
    assert len(notes) == 1 and WRONG_FIELDS[name][2] in notes[0], lines
    assert 'left out' in notes[0] and 'killed' not in notes[0]
    row = table_rows(out / 'results.md')[name]
    assert row['Final top-1'] == f"{fake_runs.acc_at(2, 'val'):.2f}"   # the rest is read
    assert row['Epochs'] == '2/2'        # "epochs": "lots": the event files stand in


def test_a_wrong_field_leaves_out_only_itself(damaged):
    _, out, _, lines, _ = damaged
    rows = table_rows(out / 'results.md')
    assert rows['wall']['Wall time'] == report.fmt_time(11.0 + 12.0)  # the epochs' times
    assert rows['best']['Best top-1'] == f"{fake_runs.acc_at(2, 'val'):.2f}"
    assert '| eval | `m.pth.tar` | – | – | – | 70.00 |' in (out / 'results.md').read_text()
    assert not any('killed' in line for line in lines), lines   # "lots" is no lost epoch


def test_the_summary_kinds_cover_the_run_record():
    """Every key of the run record has a kind to be checked against."""
    assert set(fake_runs.rr.SUMMARY_KEYS) <= set(report.SUMMARY_KINDS)
    assert set(report.EPOCH_KINDS) == set(fake_runs.rr.EPOCH_KEYS)


def test_event_files_cut_short_are_named_once_each(damaged):
    """TensorBoard's reader stops at a cut record without a word: the report names each
    cut file in one note (and no whole one) and plots the rest."""
    _, out, _, lines, cut = damaged
    assert len(cut) > 1      # the run folder's and the add_scalars sub-folders'
    for path in cut:
        notes = [line for line in lines if str(path) in line]
        assert len(notes) == 1 and 'cut short' in notes[0], (path, lines)
    assert sum('cut short' in line for line in lines) == len(cut), lines
    assert table_rows(out / 'results.md')['cut']['Epochs'] == '3/3'


def test_the_command_in_results_md_pastes(damaged):
    """results.md names the command that made it, quoted so that it pastes in a shell:
    a folder with a space stays one argument."""
    import shlex
    _, out, argv, _, _ = damaged
    made_by = next(line for line in (out / 'results.md').read_text().splitlines()
                   if line.startswith('Made by'))
    command = made_by[len('Made by `'):-len('`.')]
    assert shlex.split(command)[2:] == argv, command
