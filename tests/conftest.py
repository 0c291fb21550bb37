"""Pytest set-up: code/ and tools/ on sys.path, as the scripts put them."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(REPO, "code")
TOOLS = os.path.join(REPO, "tools")
for folder in (TOOLS, CODE):          # code/ ends up first, as main.py has it
    if folder not in sys.path:
        sys.path.insert(0, folder)

import pytest  # noqa: E402


# small-and-fast training flags shared by the driver's tests
FAST = ['--arch', 'simplenet', '-j', '0', '-b', '8', '--lr', '0.02', '-p', '1',
        '--device', 'cpu', '--seed', '3', '--warmup', '1', '--num-classes', '4']


def run_main(argv, capsys):
    """Run main.main in-process; return (exit code, stdout, stderr). The suite runs on
    the CPU unless a test names a device: main.py's own default (auto) would move a
    resumed run onto a GPU where one is, and its numbers would no longer equal the CPU's."""
    import main as driver
    code = 0
    if '--device' not in argv:
        argv = list(argv) + ['--device', 'cpu']
    try:
        driver.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


NO_SUCH_PID = 1 << 30  # above any pid a Linux system gives (its pid_max is at most 2**22)


def temp_file_of_a_dead_writer(path):
    """The temporary file a writer of `path` leaves when killed mid-write
    (safe_files.temp_path, written by a process that no longer exists)."""
    from toolkit import safe_files
    return safe_files.temp_path(path).rsplit('-', 1)[0] + f'-{NO_SUCH_PID}'


def checkpoint_of(run_dir, name='checkpoint.pth.tar'):
    return os.path.join(run_dir, 'models', name)


def only_run(log_dir):
    runs = sorted(os.listdir(log_dir))
    assert len(runs) == 1, runs
    return os.path.join(log_dir, runs[0])


def expect_error(argv, capsys, *words, code=1):
    got, out, err = run_main(argv, capsys)
    assert got == code, (got, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def strict_json(path):
    """json.load that refuses NaN/Infinity, as strict JSON parsers do."""
    import json

    def refuse(name):
        raise ValueError(f'{path}: non-standard JSON constant {name}')
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def fashion_mnist_installed():
    """Whether the four IDX files of Debian's dataset-fashion-mnist are where
    make_real_data.py --set fashion-mnist looks for them (found as it finds them)."""
    from make_real_data import FASHION_DIR, FASHION_FILES, idx_path
    try:
        for names in FASHION_FILES.values():
            for name in names:
                idx_path(FASHION_DIR, name)
    except ValueError:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_installed(), reason="Fashion-MNIST is not installed in "
    "/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)")


def transforms_edited():
    """Why the fused cache path is off for custom_transforms.py as it is now (None: the
    shipped code, which the fused path reproduces)."""
    import custom_transforms
    from toolkit import fast_data
    return fast_data.module_difference(custom_transforms)


# the tests that compare the fused path with the shipped transforms: with a student's
# edit of custom_transforms.py every run takes the per-image path, and they skip
EDITED_TRANSFORMS = transforms_edited()
shipped_transforms_only = pytest.mark.skipif(
    EDITED_TRANSFORMS is not None, reason=f'{EDITED_TRANSFORMS}: every run takes the '
    f'per-image path, and the fused path is compared with the shipped transforms only')


@pytest.fixture(autouse=True)
def cpu_without_amx(monkeypatch):
    """The suite's in-process runs see a CPU without AMX, whatever this machine has: the
    CPU's auto --amp turns bf16 on only with AMX tiles, and the suite's exact comparisons
    (resume, processes, paths) are written for its fp32 runs. Tests of the AMX default
    fake the capability; subprocess runs give --no-amp or --amp themselves."""
    from toolkit import speed
    monkeypatch.setattr(speed, 'cpu_has_amx', lambda: False)


@pytest.fixture(scope='session')
def demo(tmp_path_factory):
    """A tiny demo set (4 classes, 48x48 JPEGs) in MiniPlaces layout."""
    from make_demo_data import make_demo_dataset
    root = tmp_path_factory.mktemp('demo')
    make_demo_dataset(str(root), num_classes=4, train_per_class=6, val_per_class=3,
                      size=48, seed=0)
    return str(root)


@pytest.fixture(scope='session')
def real_data(tmp_path_factory):
    """The real-image set of make_real_data.py with its defaults (1797 handwritten digit
    scans from scikit-learn, 32x32 JPEGs, 10 classes) in MiniPlaces layout; about 1 s."""
    from make_real_data import make_real_dataset
    root = tmp_path_factory.mktemp('real')
    make_real_dataset(str(root))
    return str(root)


@pytest.fixture(scope='session')
def real600(tmp_path_factory):
    """600 of the real digit scans for training (60 a class), all 359 for validation."""
    from make_real_data import make_real_dataset
    root = str(tmp_path_factory.mktemp('real600'))
    make_real_dataset(root, max_train=600)
    return root


@pytest.fixture(scope='session')
def trained_run(demo, tmp_path_factory):
    """A SimpleNet trained 2 epochs on the demo set by main.py: its run folder."""
    import main as driver
    logs = str(tmp_path_factory.mktemp('trained_logs'))
    driver.main([demo, '--log-dir', logs, '--epochs', '2'] + FAST)
    (run,) = os.listdir(logs)
    return os.path.join(logs, run)


@pytest.fixture(scope='module')
def one_thread():
    """Run a test module on one torch thread, then restore the setting: for tiny models
    a second OpenMP thread on a busy 2-core machine only waits (up to 20x slower).
    Use it as `pytestmark = pytest.mark.usefixtures('one_thread')`; module scope, so
    the module's own module-scoped fixtures (models trained once) run on one thread too."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    # `make test-fast` (pytest -m "not slow") leaves these out: each takes seconds, most
    # because it trains with main.py or starts processes; `make test` runs everything
    config.addinivalue_line('markers', 'slow: takes seconds (trains, starts processes); '
                                       'left out by make test-fast')
