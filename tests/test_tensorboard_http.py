"""The real `tensorboard` program opens a run folder written like main.py's: it is started on
a loopback port and the scalars are read back over its HTTP API, as the browser does."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import fake_runs

TENSORBOARD = os.path.join(os.path.dirname(sys.executable), 'tensorboard')
IPE = 6


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# loopback only: never go through a proxy from the environment
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url):
    with OPENER.open(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def tensorboard(tmp_path):
    """(base URL, run folder) of a tensorboard serving a fake run; always stopped afterwards."""
    if not os.path.exists(TENSORBOARD):
        pytest.fail(f'no tensorboard program beside {sys.executable}')
    run_dir = tmp_path / 'exp_20240101_000000_demo'
    fake_runs.make_run(str(run_dir), 3, IPE, name='demo')
    port = free_port()
    log = open(tmp_path / 'tensorboard.log', 'w+')  # a file, not a pipe: it never fills up
    proc = subprocess.Popen([TENSORBOARD, '--logdir', str(run_dir), '--host', '127.0.0.1',
                             '--port', str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log
    try:
        yield f'http://127.0.0.1:{port}', proc
    finally:
        # the whole process group this test started (tensorboard may start a data server)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def wait_for_tags(base, proc, expected_runs, timeout=60):
    """Poll /data/plugin/scalars/tags until every run is loaded (bounded wait)."""
    deadline = time.monotonic() + timeout
    tags = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.log.seek(0)
            pytest.fail(f'tensorboard exited with {proc.returncode}: {proc.log.read()[-2000:]}')
        try:
            tags = get_json(base + '/data/plugin/scalars/tags')
            if expected_runs <= set(tags):
                return tags
        except (urllib.error.URLError, ConnectionError, OSError):
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f'tensorboard did not show runs {expected_runs} within {timeout} s '
                f'(got {sorted(tags)})')


def scalars(base, run, tag):
    query = urllib.parse.urlencode({'run': run, 'tag': tag})
    points = get_json(f'{base}/data/plugin/scalars/scalars?{query}')  # [[wall_time, step, value]]
    return {step: value for _, step, value in points}


@pytest.mark.slow
def test_tensorboard_serves_the_logged_scalars(tensorboard):
    base, proc = tensorboard
    tags = wait_for_tags(base, proc, {'.', 'data_top1_accuracy_val', 'data_top5_accuracy_train'})
    assert {'data/training_loss', 'data/learning_rate', 'data/val_loss',
            'perf/images_per_sec', 'perf/epoch_time_s', 'perf/peak_memory_mb'} <= set(tags['.'])
    assert 'data/top1_accuracy' in tags['data_top1_accuracy_val']

    val = scalars(base, 'data_top1_accuracy_val', 'data/top1_accuracy')
    assert val == pytest.approx({e: fake_runs.acc_at(e, 'val') for e in (1, 2, 3)})
    train5 = scalars(base, 'data_top5_accuracy_train', 'data/top5_accuracy')
    assert train5 == pytest.approx({e: fake_runs.acc_at(e, 'train', 5) for e in (1, 2, 3)})
    loss = scalars(base, '.', 'data/training_loss')
    assert loss == pytest.approx({s: fake_runs.loss_at(s) for s in range(0, 3 * IPE, 2)}, rel=1e-6)
    memory = scalars(base, '.', 'perf/peak_memory_mb')
    assert memory == pytest.approx({e: 50.0 + e for e in (1, 2, 3)})
