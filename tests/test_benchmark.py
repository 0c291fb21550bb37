"""benchmark.py's own tools: the saved-for-backward meter, the interleaved timer, and
the recipe's flags and table (its training runs are checked by hand: minutes each)."""
import os
import shlex
import subprocess
import sys
from statistics import mean, stdev

import pytest
import torch

from benchmarks import bench_parts
from benchmarks import bench_recipe
from benchmarks import bench_runs
from benchmarks import bench_timing
from benchmarks.bench_timing import SavedForBackwardMeter, interleaved_times
from conftest import fashion_mnist_installed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SaveGiven(torch.autograd.Function):
    """Identity on x that saves the tensors it is given for backward (and ignores them)."""

    @staticmethod
    def forward(ctx, x, *to_save):
        ctx.save_for_backward(*to_save)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + (None,) * len(ctx.saved_tensors)


def test_meter_counts_each_storage_once_while_the_graph_lives():
    x = torch.randn(10, requires_grad=True)
    a, b = torch.randn(100), torch.randn(30, dtype=torch.float64)
    with SavedForBackwardMeter() as meter:
        # a twice, a view of a and b: two storages
        y = SaveGiven.apply(x, a, a, a[10:20], b)
        assert meter.live_bytes == 100 * 4 + 30 * 8
        del y                      # the graph goes: its saved tensors are dropped
        assert meter.live_bytes == 0
        small = SaveGiven.apply(x, torch.randn(5))
    # the peak is the most held at once, not the sum of both graphs
    assert meter.peak_bytes == 100 * 4 + 30 * 8 and meter.live_bytes == 5 * 4
    del small
    assert meter.live_bytes == 0


def test_meter_releases_after_backward():
    x = torch.randn(50, requires_grad=True)
    with SavedForBackwardMeter() as meter:
        SaveGiven.apply(x, torch.randn(50)).sum().backward()
    assert meter.peak_bytes == 50 * 4 and meter.live_bytes == 0
    assert torch.equal(x.grad, torch.ones(50))


def test_interleaved_times_alternate_the_variants_after_a_warm_up():
    calls = []
    times = interleaved_times({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
                              torch.device('cpu'), repeats=3)
    assert calls == ['a', 'b'] * 4
    assert sorted(times) == ['a', 'b'] and all(len(t) == 3 and min(t) >= 0
                                               for t in times.values())


# ---------------------------------------------------------------- recipe
def makefile_demo_flags():
    """{flag: value} that the Makefile's `demo` target passes to main.py after DIR."""
    with open(os.path.join(REPO, 'Makefile')) as f:
        text = f.read().replace('\\\n', ' ')           # join continued lines
    recipe = text.split('\ndemo:', 1)[1].split('\n\n', 1)[0]
    (line,) = [line for line in recipe.splitlines() if 'code/main.py' in line]
    return flag_values(shlex.split(line.split('$(DEMO)', 1)[1]))


def flag_values(tokens):
    """{flag: its value, or True for a switch such as --no-amp}."""
    flags = {}
    for i, token in enumerate(tokens):
        if token.startswith('-'):
            value = tokens[i + 1] if i + 1 < len(tokens) else None
            flags[token] = True if value is None or value.startswith('-') else value
    return flags


def test_recipe_demo_config_is_the_makefiles_demo_command():
    make = makefile_demo_flags()
    ours = flag_values(bench_recipe.recipe_flags('cnn', 'demo', seed=7))
    assert make['--no-amp'] is True
    assert ours.pop('--seed') == '7' and ours.pop('-p') == '1000'
    make.pop('--seed'), make.pop('--name')
    assert ours == make


@pytest.mark.parametrize('model', list(bench_recipe.RECIPE_MODELS))
def test_recipe_8_epoch_config_as_main_py_reads_it(model):
    import main as driver
    args = driver.parser.parse_args(['DIR'] + bench_recipe.recipe_flags(model, '8ep', seed=3))
    assert (args.epochs, args.warmup, args.batch_size, args.workers) == (8, 1, 64, 2)
    assert (args.num_classes, args.seed, args.device) == (10, 3, 'cpu')
    assert args.use_vit == (model == 'vit')
    assert args.arch == ('simplenet' if model == 'simplenet' else None)
    if model == 'vit':          # the handout's ViT command
        assert (args.lr, args.weight_decay) == (0.01, 0.05)
    else:                       # the handout's defaults
        assert args.lr == driver.parser.get_default('lr') == 0.1
        assert args.weight_decay == driver.parser.get_default('weight_decay')


def test_recipe_quick_sets_fit_one_short_epoch(tmp_path):
    import main as driver
    for name in bench_recipe.RECIPE_DATASETS:
        out = str(tmp_path / name)
        if name == 'fashion' and not fashion_mnist_installed():
            # without Debian's package the set is refused in one line that says how to get it
            with pytest.raises(bench_recipe.RecipeError, match='apt-get install') as info:
                bench_recipe.build_recipe_data(name, out, quick=True)
            assert '\n' not in str(info.value)
            continue
        bench_recipe.build_recipe_data(name, out, quick=True)
        args = driver.parser.parse_args([out] + bench_recipe.recipe_flags('vit', '8ep', 0, True))
        assert args.epochs == 1 and args.warmup < args.epochs
        with open(os.path.join(out, 'train.txt')) as f:
            labels = [int(line.split()[1]) for line in f]
        # every class is there, and at least one full batch (main.py drops the last)
        assert sorted(set(labels)) == list(range(10)) and len(labels) >= args.batch_size


def test_recipe_data_errors_are_one_line(tmp_path):
    (tmp_path / 'mine.txt').write_text('keep')
    with pytest.raises(bench_recipe.RecipeError, match='refusing to overwrite') as info:
        bench_recipe.build_recipe_data('real', str(tmp_path), quick=True)
    assert '\n' not in str(info.value)


def fake_summary(top1, best, arch='somenet'):
    return {'best_acc1': best, 'wall_time_s': 90.0, 'arch': arch,
            'epochs': [{'epoch': i + 1, 'val_top1': v} for i, v in enumerate(top1)]}


def cells(line):
    return [c.strip() for c in line.strip().strip('|').split('|')]


def test_recipe_rows_and_mean_over_seeds_from_fake_summaries():
    results = {('real', 'vit', '8ep', 0): fake_summary([20.0, 35.5, 31.25], 35.5),
               ('real', 'vit', '8ep', 1): fake_summary([25.0, 41.0, 40.0], 41.0),
               # main.py leaves best_acc1 at None when no epoch scored above 0 %
               ('demo', 'simplenet', 'demo', 0): fake_summary([0.0, 0.0], None),
               ('demo', 'cnn', 'demo', 0): fake_summary([50.0], 50.0, arch='resnet10')}
    rows = [cells(bench_recipe.recipe_row(*key, s)) for key, s in results.items()]
    assert rows[0] == ['real', 'ViT', '8ep', '0', '35.50', '31.25', '3', '1.5']
    assert rows[2][4:6] == ['0.00', '0.00']
    assert rows[3][1] == 'default CNN (resnet10)'     # the default CNN names its arch
    assert len(cells(bench_recipe.RECIPE_HEADER.splitlines()[0])) == len(rows[0])

    header, rule, vit, simplenet, cnn = bench_recipe.recipe_summary(results)
    assert len(cells(header)) == len(cells(rule)) == len(cells(vit))
    vit = cells(vit)
    assert vit[:4] == ['real', 'ViT', '8ep', '0 1']
    assert vit[4] == f"{mean([35.5, 41.0]):.2f} ± {stdev([35.5, 41.0]):.2f} (35.50-41.00)"
    assert vit[5] == f"{mean([31.25, 40.0]):.2f} ± {stdev([31.25, 40.0]):.2f} (31.25-40.00)"
    assert cells(simplenet)[3] == '0' and cells(cnn)[1] == 'default CNN (resnet10)'
    assert cells(cnn)[4] == '50.00 (50.00-50.00)'          # one seed: no spread


def test_a_decision_is_a_paired_difference_with_a_t_interval():
    top1 = {('a', 0): 80.0, ('a', 1): 82.0, ('a', 2): 81.0,
            ('b', 0): 78.0, ('b', 1): 79.0, ('b', 2): 79.5, ('b', 3): 99.0}
    results = {('fashion', 'cnn', config, seed): fake_summary([v], v)
               for (config, seed), v in top1.items()}
    # paired differences 2.0, 3.0, 1.5 over the 3 seeds both ran: mean 2.1667,
    # sd 0.7638, t(2) = 4.30 -> half-width 4.30 * 0.7638 / sqrt(3) = 1.90
    line = bench_recipe.decision(results, 'fashion', 'cnn', 'b', 'a')
    assert line.startswith('fashion, default CNN: a beats b by 2.17 ± 1.90 points')
    assert '3 paired seeds' in line and 'no difference' not in line
    results[('fashion', 'cnn', 'a', 2)] = fake_summary([70.0], 70.0)   # now -8.0: noisy
    assert 'no difference shown' in bench_recipe.decision(results, 'fashion', 'cnn', 'a', 'b')
    assert bench_recipe.decision(results, 'fashion', 'vit', 'a', 'b') is None


def test_cpu_name_says_something():
    assert bench_timing.cpu_name().strip()


def test_train_checks_name_only_the_issues_targets():
    def summary(best, speed=10.0):
        return {'best_acc1': best, 'epochs': [{'val_top1': best, 'images_per_s': speed,
                                               'peak_memory_mb': 100.0}]}
    results = {('demo', 'cnn', 'per-image', 'fp32'): summary(60.0),
               ('demo', 'cnn', 'cached', 'fp32'): summary(58.0),
               ('demo', 'cnn', 'per-image', 'amp'): summary(50.0),
               ('demo', 'cnn', 'cached', 'amp'): summary(70.0),
               ('demo', 'simplenet', 'per-image', 'amp'): summary(10.0)}
    lines = bench_runs.train_checks(results)
    assert len(lines) == 4, lines               # nothing for SimpleNet's amp: no target
    assert any('fp32: cached - per-image = -2.00 points (PASS' in l for l in lines), lines
    assert any('per-image: amp - fp32 = -10.00 points (FAIL' in l for l in lines), lines
    assert any('cached: amp - fp32 = +12.00 points (PASS' in l for l in lines), lines
    assert bench_runs.train_speed(summary(1.0)) == (10.0, 100.0)


def test_pipeline_runs_on_a_set_smaller_than_its_device_batch(tmp_path, capsys):
    """The device path takes batches of 256: a set of 40 training images repeats them."""
    import benchmark
    from make_demo_data import make_demo_dataset
    data = str(tmp_path / 'tiny')
    make_demo_dataset(data, num_classes=10, train_per_class=4, val_per_class=1, size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)        # a count of the caller's own, not the benchmark's 1
    try:
        benchmark.main(['pipeline', '--data', data, '--repeats', '1', '--images', '8'])
        # it times one thread, and gives the caller's thread count back
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert 'ratio cached/per-image' in out and 'normalize_on_device on cpu' in out, out


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """tempfile's folder for this test alone, to see what a benchmark leaves there."""
    import tempfile
    folder = tmp_path / 'tmp'
    folder.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(folder))
    return folder


def work_folders(folder):
    """The benchmarks' work folders in `folder` (torch keeps caches of its own there)."""
    return [name for name in os.listdir(folder) if name.startswith('bench_')]


@pytest.mark.slow
def test_ddp_compares_one_and_two_processes(own_tempdir, capsys):
    """`benchmark.py ddp --quick`: a row per process count, the 2-process row with its
    speed-up and its distance from the 1-process weights (tiny: nothing is measured); its
    data and logs removed at the end."""
    import argparse
    args = argparse.Namespace(device='cpu', quick=True, small=False, epochs=1, batch_size=10,
                              lr=0.02, processes=[1, 2], model='simplenet', keep=False)
    runs = bench_runs.bench_ddp(args)
    out = capsys.readouterr().out
    assert not work_folders(own_tempdir), out
    assert sorted(runs) == [1, 2] and runs[2]['world_size'] == 2
    rows = [line for line in out.splitlines() if line.startswith('| 2 | gloo |')]
    assert len(rows) == 1 and 'x |' in rows[0], out
    difference = float(rows[0].rstrip(' |').rsplit('|', 1)[1])
    assert difference < 1e-3  # SimpleNet: no BatchNorm, the same global batches


@pytest.mark.slow
def test_attack_benchmark_runs_a_pgd_step(capsys):
    """benchmark.py attack times one PGD step as perturb() takes it (the box included)."""
    import argparse
    bench_parts.bench_attack(argparse.Namespace(device='cpu', repeats=1, batch_size=2))
    out = capsys.readouterr().out
    assert 'one PGD step' in out and 'ratio' in out and 'peak memory (autograd saved)' in out


# ---------------------------------------------------------------- scale
def table_after(out, first_cell):
    """The rows (lists of cells) of the markdown table whose header starts with
    `first_cell`, header first, the rule left out."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'| {first_cell} |'))
    rows = [cells(lines[start])]
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append(cells(line))
    return rows


@pytest.mark.slow
def test_scale_runs_end_to_end_on_a_tiny_set(tmp_path, capsys):
    """`benchmark.py scale` on 60 and 120 images of 4 classes: it writes the set, measures
    both paths at both sizes with one worker, reads PSS from /proc, prints the tables and
    the projection, and removes its caches (nothing here is a measurement)."""
    import benchmark
    from benchmarks import bench_scale_tables
    data = tmp_path / 'scale'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # the default CNN's step: a second thread only waits here
    try:
        benchmark.main(['scale', '--data', str(data), '--sizes', '120', '60', '--classes', '4',
                        '--image-size', '32', '--batch-size', '4', '-j', '1', '--repeats', '1'])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out

    header, *rows = table_after(out, 'images (train + val)')
    assert header == bench_scale_tables.SCALE_HEADER
    assert [row[:2] for row in rows] == [['60', 'cached'], ['60', 'per-image'],
                                         ['120', 'cached'], ['120', 'per-image']]
    column = {name: i for i, name in enumerate(header)}
    for row in rows:
        assert len(row) == len(header)
        main_pss, worker_pss, all_pss = (float(row[column[name]].replace(',', '')) for name in
                                         ('main PSS MB', 'worker PSS MB, max', 'all PSS MB'))
        assert main_pss > 0 and worker_pss > 0 and all_pss >= main_pss   # read from /proc
        assert float(row[column['epoch images/s']].replace(',', '')) > 0
        if row[1] == 'cached':
            assert float(row[column['cache build s']]) > 0
            assert row[column['private copy of the cache']] in ('yes', 'no')
    # 120 images of 128 x 128 x 3 bytes in the caches (cached at 128 px whatever the size)
    assert float(rows[2][column['cache MB on disk']]) >= 120 * 128 * 128 * 3 / 2 ** 20 - 0.5

    growth = table_after(out, 'figure, per image')
    assert growth[0] == ['figure, per image', '60 images', '120 images', 'growth exponent']
    assert len(growth) > 10 and all(len(row) == 4 for row in growth)
    projection = table_after(out, '60-epoch run')
    assert len(projection) == 5 and 'on paper' in projection[3][0]
    assert 'an estimate, not a measurement' in out
    assert sorted(os.listdir(data / 'subsets')) == ['120', '60']
    assert not [name for name in os.listdir(data / 'subsets' / '120' / 'cache')
                if name.endswith('.npy')]


# ---------------------------------------------------------------- options
@pytest.mark.parametrize('argv, flag', [
    (['conv', '--repeats', '0'], '--repeats'),
    (['conv', '--batch-size', '0'], '--batch-size'),
    (['attack', '--batch-size', '-3'], '--batch-size'),
    (['attention', '--batch-size', '0'], '--batch-size'),
    (['step', '--threads', '-1'], '--threads'),
    (['pipeline', '--images', '0'], '--images'),
    (['ddp', '--processes', '0', '--quick'], '--processes'),
    (['ddp', '--processes', '1', '-2'], '--processes'),
    (['models', '--epochs', '0'], '--epochs'),
    (['models', '--lr', 'nan'], '--lr'),
    (['train', '--lr', '-0.1'], '--lr'),
    (['recipe', '--seeds', '0', '-1'], '--seeds'),
    (['scale', '--sizes', '0'], '--sizes'),
    (['scale', '-j', '-1'], '--workers'),
    (['scale', '--classes', '1'], '--classes'),
    (['scale', '--image-size', '8'], '--image-size'),
    (['scale', '--gpu-step-ms', 'inf'], '--gpu-step-ms'),
])
def test_every_option_is_range_checked_by_its_parser(argv, flag, capsys):
    """A value out of range stops in the parser with argparse's usage error naming the
    flag (exit 2), before anything runs."""
    import benchmark
    with pytest.raises(SystemExit) as info:
        benchmark.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f'benchmark.py {argv[0]}: error: argument') and flag in line, err


def benchmark_error(argv, capsys):
    """The one error line of benchmark.main(argv), which must stop with exit 2."""
    import benchmark
    with pytest.raises(SystemExit) as info:
        benchmark.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and 'Traceback' not in err, err
    return err.strip().splitlines()[-1]


def test_an_unknown_device_is_a_usage_error(capsys):
    line = benchmark_error(['conv', '--device', 'foo', '--repeats', '1'], capsys)
    assert line.startswith('benchmark.py conv: error:') and "--device 'foo'" in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
@pytest.mark.parametrize('which', ['conv', 'step'])
def test_cuda_without_a_gpu_is_a_usage_error(which, capsys):
    line = benchmark_error([which, '--device', 'cuda', '--repeats', '1'], capsys)
    assert '--device cuda: CUDA is not available' in line, line


def test_a_missing_data_folder_is_an_error_not_a_new_set(tmp_path, capsys):
    missing = tmp_path / 'nonexistent'
    for which in ('pipeline', 'models'):
        line = benchmark_error([which, '--data', str(missing)], capsys)
        assert f"argument --data: '{missing}' holds no train.txt" in line, line
    assert not missing.exists()


@pytest.mark.slow
def test_models_trains_one_epoch_and_leaves_no_folder(tmp_path, own_tempdir, capsys):
    """`models --epochs 1`: no warm-up epoch in a run of one, three rows, and main.py's
    logs removed at the end."""
    import benchmark
    from make_demo_data import make_demo_dataset
    data = str(tmp_path / 'demo')
    make_demo_dataset(data, num_classes=10, train_per_class=4, val_per_class=2, size=32)
    rows = benchmark.main(['models', '--epochs', '1', '--data', data, '--device', 'cpu'])
    out = capsys.readouterr().out
    assert [label for label, _ in rows] == ['SimpleNet, nn.Conv2d', 'default CNN, nn.Conv2d',
                                           'default CNN, CustomConv2d'], out
    assert all(len(summary['epochs']) == 1 for _, summary in rows)
    assert 'removed at the end' in out and not work_folders(own_tempdir), out


@pytest.mark.slow
def test_keep_keeps_the_work_folder_and_says_where(own_tempdir, capsys):
    import benchmark
    results = benchmark.main(['train', '--quick', '--keep', '--datasets', 'demo', '--models',
                              'simplenet', '--train-configs', 'fp32', '--paths', 'per-image'])
    out = capsys.readouterr().out
    assert list(results) == [('demo', 'simplenet', 'per-image', 'fp32')], out
    (kept,) = work_folders(own_tempdir)
    assert f'train: its data and logs are kept in {own_tempdir / kept}' in out
    assert os.path.isdir(own_tempdir / kept / 'logs')


def test_every_help_text_prints(capsys):
    import benchmark
    """argparse formats help lazily: a stray % in one summary broke the top-level --help."""
    for argv in [['--help']] + [[which, '--help'] for which in benchmark.BENCHMARKS]:
        with pytest.raises(SystemExit) as exit_info:
            benchmark.build_parser().parse_args(argv)
        assert exit_info.value.code == 0, argv
    assert 'accuracy-time' in capsys.readouterr().out


# ---------------------------------------------------------------- Ctrl-C
def interrupted(argv, capsys):
    """benchmark.main(argv) stopped by Ctrl-C: its exit code and what it printed."""
    import benchmark
    try:
        benchmark.main(argv)
    except SystemExit as stop:
        code = stop.code
    except KeyboardInterrupt:   # what Python prints as a traceback
        pytest.fail('KeyboardInterrupt escaped benchmark.main')
    else:
        pytest.fail('benchmark.main returned')
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize('which', ['conv', 'attention', 'attack', 'models', 'recipe',
                                   'pipeline', 'train', 'step', 'ddp', 'scale', 'shared',
                                   'accuracy-time'])
def test_ctrl_c_in_any_benchmark_is_one_line_and_exit_130(which, monkeypatch, capsys):
    import benchmark
    assert which in benchmark.BENCHMARKS

    def ctrl_c(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(benchmark.BENCHMARKS, which, ctrl_c)
    code, out, err = interrupted([which], capsys)
    assert code == 130, (code, err)
    assert err.strip() == f'benchmark.py {which}: interrupted', err
    assert 'Traceback' not in out + err


def test_ctrl_c_in_models_gives_no_advice_into_the_removed_folder(tmp_path, own_tempdir,
                                                                 monkeypatch, capsys):
    """models runs main.py in-process: Ctrl-C stops main.py, which says where to resume
    from, a folder inside the benchmark's temporary one. That folder is removed: the advice
    stays in the removed console log; the benchmark says one line and exits 130."""
    import main as driver
    (tmp_path / 'train.txt').write_text('x.jpg 0\n')

    def stopped_training(argv):
        log_dir = argv[argv.index('--log-dir') + 1]
        resume = os.path.join(log_dir, 'exp_1', 'models', 'checkpoint.pth.tar')
        print(f'\nmain.py: interrupted; the last finished epoch is in {resume}: continue '
              f'with --resume={resume}', file=sys.stderr)
        sys.exit(130)
    monkeypatch.setattr(driver, 'main', stopped_training)
    code, out, err = interrupted(['models', '--data', str(tmp_path), '--epochs', '1'], capsys)
    assert code == 130, (code, err)
    assert err.strip() == 'benchmark.py models: interrupted', err
    assert '--resume' not in out + err and not work_folders(own_tempdir)


def test_a_main_py_cell_stopped_by_ctrl_c_stops_the_benchmark(tmp_path, monkeypatch):
    """A cell's main.py that exits 130 (Ctrl-C reached it first) is an interruption, not a
    failed cell whose last line, main.py's --resume advice, goes into the table."""
    def interrupted_run(command, stdout, **kwargs):
        stdout.write('main.py: interrupted; continue with --resume=/tmp/x/checkpoint.pth.tar\n')
        return subprocess.CompletedProcess(command, 130)
    monkeypatch.setattr(bench_recipe.subprocess, 'run', interrupted_run)
    with pytest.raises(KeyboardInterrupt):
        bench_recipe.run_recipe_cell(str(tmp_path), [], str(tmp_path / 'logs'))


def test_the_shared_benchmark_child_stops_quietly_on_ctrl_c(monkeypatch, capsys):
    """Ctrl-C reaches every process of the terminal: a timed child of `shared` exits 130
    without a traceback of its own."""
    from benchmarks import bench_shared

    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench_shared, 'time_steps', ctrl_c)
    with pytest.raises(SystemExit) as info:
        try:
            bench_shared.child_main(['cnn', '2', '1'])
        except KeyboardInterrupt:
            pytest.fail('KeyboardInterrupt escaped the child')
    assert info.value.code == 130 and capsys.readouterr().err == ''
