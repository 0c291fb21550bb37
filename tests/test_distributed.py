"""Several processes (torchrun + DistributedDataParallel, gloo on the CPU): the same
global batches as one process, one run folder, exact resume (distributed.py)."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import CODE, FAST, run_main, checkpoint_of, only_run
from toolkit import distributed
from custom_dataloader import MiniPlacesLoader, seed_worker
from toolkit.data_order import TrainOrder, SeededSamples, val_share
import student_code


@pytest.fixture
def world_of(monkeypatch):
    def set_world(rank, size):
        monkeypatch.setattr(distributed, 'WORLD', distributed.World(rank=rank, size=size))
    return set_world


################################################################################
# the training order and validation shares, for any number of processes
################################################################################
def order_of(world_of, rank, size, n=50, batch=8, seed=3, epoch=2):
    world_of(rank, size)
    order = TrainOrder(n, batch)
    order.set_epoch(seed, epoch)
    return list(order)


@pytest.mark.parametrize('size', [2, 4])
def test_processes_split_the_global_batches_of_one_process(world_of, size):
    alone = order_of(world_of, 0, 1)
    assert len(alone) == 48 and len({i for i, _ in alone}) == 48  # 6 full batches
    shares = [order_of(world_of, rank, size) for rank in range(size)]
    per = 8 // size
    for b in range(6):  # global batch b = the ranks' shares of it, in rank order
        joined = [item for share in shares for item in share[b * per:(b + 1) * per]]
        assert joined == alone[b * 8:(b + 1) * 8]


def test_the_order_depends_on_seed_and_epoch_only(world_of):
    assert order_of(world_of, 0, 1) == order_of(world_of, 0, 1)
    assert order_of(world_of, 0, 1) != order_of(world_of, 0, 1, epoch=3)
    assert order_of(world_of, 0, 1) != order_of(world_of, 0, 1, seed=4)


def test_a_global_batch_that_does_not_divide_is_refused(world_of):
    world_of(0, 3)
    with pytest.raises(distributed.UsageError, match='divide evenly over the 3 processes'):
        TrainOrder(50, 8)


@pytest.mark.parametrize('size', [1, 2, 3, 4])
def test_validation_sees_every_image_once(world_of, size):
    seen = []
    for rank in range(size):
        world_of(rank, size)
        seen += list(val_share(359))
    assert seen == list(range(359))


def test_augmentation_does_not_depend_on_the_workers(demo):
    """An image's augmentation comes from its seed, not from the worker that loads it."""
    dataset = SeededSamples(MiniPlacesLoader(demo, 'train', student_code.get_train_transforms(),
                                             num_classes=None))
    order = TrainOrder(len(dataset), 8)
    order.set_epoch(5, 0)

    def batches(workers):
        loader = DataLoader(dataset, batch_size=4, sampler=order, num_workers=workers,
                            worker_init_fn=seed_worker)
        return [x for x, _ in loader]
    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a, b)


################################################################################
# torchrun, 2 processes, gloo
################################################################################
def torchrun(args, nproc=2, **kw):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               f'--nproc_per_node={nproc}', os.path.join(CODE, 'main.py')] + args
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, **kw)


TRAIN = FAST + ['--epochs', '3', '--no-compile', '--no-amp']


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


@pytest.fixture(scope='module')
def two_process_run(demo, tmp_path_factory):
    logs = str(tmp_path_factory.mktemp('ddp'))
    done = torchrun([demo, '--log-dir', logs] + TRAIN)
    assert done.returncode == 0, done.stdout + done.stderr
    return only_run(logs), done


@pytest.mark.slow
def test_two_processes_train_like_one(two_process_run, demo, tmp_path, capsys):
    """Same global batch, seed and data: the same weights, up to float rounding. Each
    process averages the loss of its half of a global batch and DDP averages the two
    gradients, which is the gradient of the whole batch summed in another order (float32
    rounding, 1e-6 after a few steps). SimpleNet has no BatchNorm (whose statistics are
    per process) and no dropout (whose draws are per process): nothing else differs."""
    run2, done = two_process_run
    code, out, err = run_main([demo, '--log-dir', str(tmp_path)] + TRAIN, capsys)
    assert code == 0, err
    run1 = only_run(str(tmp_path))
    w1, w2 = weights(checkpoint_of(run1)), weights(checkpoint_of(run2))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-4)
    s1, s2 = (torch.load(checkpoint_of(r), weights_only=True)['history'] for r in (run1, run2))
    for e1, e2 in zip(s1, s2):  # the same curves: losses, accuracies on all images
        assert e2['train_loss'] == pytest.approx(e1['train_loss'], abs=1e-4)
        assert e2['val_top1'] == pytest.approx(e1['val_top1'], abs=1e-6)
    assert 'x 2 processes (gloo)' in done.stdout


@pytest.mark.slow
def test_one_process_under_torchrun_trains_through_a_process_group(demo, tmp_path, capsys):
    """torchrun with one process starts a process group of one (gloo here, NCCL on a GPU)
    and trains through DDP: its summary names the backend, and its weights are those of a
    plain run (gradients averaged over one process)."""
    import json
    flags = FAST + ['--epochs', '2', '--no-compile', '--no-amp']
    done = torchrun([demo, '--log-dir', str(tmp_path / 'torchrun')] + flags, nproc=1)
    assert done.returncode == 0, done.stdout + done.stderr
    run = only_run(str(tmp_path / 'torchrun'))
    with open(os.path.join(run, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['world_size'] == 1 and summary['dist_backend'] == 'gloo'
    code, out, err = run_main([demo, '--log-dir', str(tmp_path / 'plain')] + flags, capsys)
    assert code == 0, err
    plain = weights(checkpoint_of(only_run(str(tmp_path / 'plain'))))
    for key, value in weights(checkpoint_of(run)).items():
        torch.testing.assert_close(value, plain[key], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_one_run_folder_written_by_rank_0(two_process_run):
    import json
    run, done = two_process_run
    assert only_run(os.path.dirname(run)) == run
    events = glob.glob(os.path.join(run, '**', 'events.out.tfevents.*'), recursive=True)
    writers = {os.path.basename(path).split('.')[-2] for path in events}  # their pids
    assert len(events) >= 2 and len(writers) == 1, events
    with open(os.path.join(run, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['world_size'] == 2 and summary['dist_backend'] == 'gloo'
    assert summary['status'] == 'finished' and len(summary['epochs']) == 3
    assert done.stdout.count('Epoch: [1][0/') == 1  # rank 1 prints nothing


@pytest.mark.slow
def test_resumed_two_process_run_equals_an_uninterrupted_one(two_process_run, demo, tmp_path):
    run, _ = two_process_run
    logs = str(tmp_path)
    first = torchrun([demo, '--log-dir', logs, '--stop-after', '1'] + TRAIN)
    assert first.returncode == 0, first.stderr
    resumed = torchrun([demo, '--resume', checkpoint_of(only_run(logs))] + TRAIN)
    assert resumed.returncode == 0, resumed.stderr
    got, want = weights(checkpoint_of(only_run(logs))), weights(checkpoint_of(run))
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.slow
def test_its_checkpoint_evaluates_with_one_process_and_with_two(two_process_run, demo, capsys):
    import json
    run, _ = two_process_run
    best = checkpoint_of(run, 'model_best.pth.tar')
    code, out, err = run_main([demo, '--resume', best, '-e', '--device', 'cpu', '-j', '0',
                               '--log-dir', os.path.dirname(run), '--no-compile'], capsys)
    assert code == 0, err
    with open(os.path.join(run, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['evaluation']['top1'] == pytest.approx(summary['best_acc1'], abs=1e-6)
    done = torchrun([demo, '--resume', best, '-a', '-j', '0', '--device', 'cpu',
                     '--attack-steps', '2', '--log-dir', os.path.dirname(run)])
    assert done.returncode == 0, done.stderr
    with open(os.path.join(run, 'summary.json')) as f:
        attack = json.load(f)['attack']
    code, out, err = run_main([demo, '--resume', best, '-a', '--device', 'cpu', '-j', '0',
                               '--attack-steps', '2', '--log-dir', os.path.dirname(run)], capsys)
    assert code == 0, err
    with open(os.path.join(run, 'summary.json')) as f:
        alone = json.load(f)['attack']
    for key in ('clean_top1', 'adv_top1', 'adv_top1_noflip', 'success_rate'):
        assert attack[key] == pytest.approx(alone[key], abs=1e-6), key


@pytest.mark.slow
def test_a_bad_launch_stops_every_process_with_one_line(demo, tmp_path):
    """A flag that check_launch refuses (the same line in every process, before any
    process group exists); the other refusals take the same path
    (test_launch_checks_refuse_what_the_cpu_cannot_run), and -b 7 is refused under
    torchrun in test_rank_0_says_an_early_refusal_even_when_it_starts_last."""
    words = '--dist-backend nccl needs CUDA GPUs'
    argv = [demo, '--log-dir', str(tmp_path)] + FAST + ['--epochs', '2', '--dist-backend',
                                                        'nccl']
    start = time.time()
    done = torchrun(argv)
    assert done.returncode != 0 and time.time() - start < 120
    ours = [line for line in done.stderr.splitlines() if line.startswith('main.py: error:')]
    assert len(ours) == 1 and words in ours[0], done.stderr
    # torchrun then reports the failed processes its own way; no traceback of ours
    assert 'main.py", line' not in done.stderr, done.stderr
    assert not os.listdir(tmp_path)  # no run folder


def rank_of(pid):
    """The RANK torchrun gave a worker process, from its environment."""
    with open(f'/proc/{pid}/environ', 'rb') as f:
        env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
    return int(env[b'RANK'])


@pytest.mark.slow
def test_rank_0_says_an_early_refusal_even_when_it_starts_last(tmp_path):
    """-b 7 over 2 processes is refused by every process before any loads anything (here
    the data folder does not even exist), and by rank 0 in one line even when rank 1 gets
    there seconds earlier: torchrun stops every process once one exits with an error, so
    rank 1 waits for rank 0 to say it. A sitecustomize.py holds rank 0 back 4 s at start."""
    slow = tmp_path / 'slow_rank0'
    slow.mkdir()
    (slow / 'sitecustomize.py').write_text(
        "import os, time\n"
        "if os.environ.get('RANK') == '0' and 'LOCAL_RANK' in os.environ:\n"
        "    time.sleep(4)\n")
    logs = tmp_path / 'logs'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               '--nproc_per_node=2', os.path.join(CODE, 'main.py'), str(tmp_path / 'no_data'),
               '--log-dir', str(logs)] + FAST + ['--epochs', '2', '-b', '7']
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1',
                                   PYTHONPATH=str(slow)))
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith('main.py: error:')]
    assert len(ours) == 1 and 'divide evenly over the 2 processes (try 6)' in ours[0], \
        done.stderr
    assert 'main.py", line' not in done.stderr and not logs.exists()


@pytest.mark.slow
def test_a_process_that_dies_stops_the_others(demo, tmp_path):
    """SIGKILL rank 1 in its second epoch: rank 0's next all-reduce fails, rank 0 says so
    in one line (not gloo's traceback) and leaves status 'failed', the launch ends within
    seconds, and the checkpoint of the first epoch stays loadable. torchrun polls its
    workers every 15 s here (0.1 s by default): otherwise it may SIGTERM rank 0 before
    the all-reduce fails, and the run ends 'interrupted' instead, another path."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               '--monitor-interval=15',
               '--nproc_per_node=2', os.path.join(CODE, 'main.py'), demo,
               '--log-dir', str(tmp_path)] + FAST + ['--epochs', '50', '-b', '2', '--no-compile']
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        for line in launcher.stdout:
            if line.startswith('Epoch: [2]'):
                break
        workers = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(launcher.pid)],
                                 capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(next(int(pid) for pid in workers if rank_of(pid) == 1), signal.SIGKILL)
        killed = time.time()
        output = launcher.stdout.read()
        assert launcher.wait(timeout=120) != 0
        assert time.time() - killed < 60
    finally:
        launcher.kill()
    ours = [line for line in output.splitlines() if line.startswith('main.py: error:')]
    assert len(ours) == 1 and 'another process of the torchrun launch is gone' in ours[0], \
        output
    assert 'main.py", line' not in output and '[rank0]' not in output, output  # no traceback
    import json
    run = only_run(str(tmp_path))
    with open(os.path.join(run, 'summary.json')) as f:
        assert json.load(f)['status'] == 'failed'
    ckpt = torch.load(checkpoint_of(run), weights_only=True)
    assert ckpt['epoch'] >= 1 and set(ckpt['state_dict']) == set(weights_like_simplenet())


def weights_like_simplenet():
    return student_code.SimpleNet(num_classes=4).state_dict()


@pytest.mark.slow
def test_two_processes_train_the_fast_recipe_and_its_average_like_one(demo, tmp_path, capsys):
    """--recipe fast (64 px batches, light augmentation on the cached path, label
    smoothing) with --ema: under torchrun the weights and their moving average are one
    process's, up to float rounding, and -e of the best model says it is the average."""
    flags = TRAIN + ['--recipe', 'fast', '--ema', '0.5', '--data-cache']
    done = torchrun([demo, '--log-dir', str(tmp_path / 'two')] + flags)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'recipe fast (flag)' in done.stdout and 'image-size 64 (rule: --recipe fast)' in \
        done.stdout
    code, out, err = run_main([demo, '--log-dir', str(tmp_path / 'one')] + flags, capsys)
    assert code == 0, err
    one, two = (torch.load(checkpoint_of(only_run(str(tmp_path / name))), map_location='cpu',
                           weights_only=True) for name in ('one', 'two'))
    for key in ('state_dict', 'ema_state_dict'):
        for name, tensor in one[key].items():
            torch.testing.assert_close(two[key][name], tensor, rtol=0, atol=1e-4)
    done = torchrun([demo, '--resume', checkpoint_of(only_run(str(tmp_path / 'two')),
                                                     'model_best.pth.tar'),
                     '-e', '-j', '0', '--device', 'cpu', '--log-dir', str(tmp_path / 'eval')])
    assert done.returncode == 0 and 'the moving average of --ema 0.5' in done.stdout, \
        done.stderr


@pytest.mark.slow
def test_fast_paths_adversarial_training_and_saliency_under_torchrun(two_process_run, demo,
                                                                     tmp_path):
    """bf16 autocast + channels-last + the data cache (the CPU defaults add the last two)
    with adversarial training, then -e -v (saliency maps) of its checkpoint."""
    logs = str(tmp_path)
    done = torchrun([demo, '--log-dir', logs] + FAST +
                    ['--epochs', '2', '--no-compile', '--amp', '--adv-train', '--adv-steps', '2'])
    assert done.returncode == 0, done.stderr
    assert 'amp bfloat16' in done.stdout and 'data-cache on' in done.stdout
    run = only_run(logs)
    done = torchrun([demo, '--resume', checkpoint_of(run, 'model_best.pth.tar'), '-e', '-v',
                     '-j', '0', '--device', 'cpu', '--log-dir', logs])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count('saliency maps written') == 1


def test_launch_checks_refuse_what_the_cpu_cannot_run(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(distributed.UsageError, match='--dist-backend nccl needs CUDA GPUs'):
        distributed.check_launch('auto', 'nccl', False)
    with pytest.raises(distributed.UsageError, match='--sync-bn needs CUDA'):
        distributed.check_launch('auto', 'auto', True)
    with pytest.raises(distributed.UsageError, match='does not run on Apple MPS'):
        distributed.check_launch('mps', 'auto', False)
    assert distributed.check_launch('auto', 'auto', False) == ('gloo', False)


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(distributed.UsageError, match='4 processes on this machine but it '
                                                     'has 2 GPU'):
        distributed.check_launch('auto', 'auto', False)
    assert distributed.check_launch('cpu', 'auto', False) == ('gloo', False)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    assert distributed.check_launch('auto', 'auto', False) == ('nccl', True)


@pytest.mark.slow
def test_a_batchnorm_runs_figure_is_its_checkpoints_figure(tmp_path, capsys):
    """Each process normalises its half of every batch, so their BatchNorm statistics
    differ after training; they are averaged before each validation, and the model
    validated is the model saved: -e of model_best on one process prints the run's best
    accuracy to the image (real digit scans, ResNet10). A few steps suffice: the
    statistics differ after one. (-a, in eval mode, changes no statistics: that it
    reports under torchrun what it does on one process is
    test_its_checkpoint_evaluates_with_one_process_and_with_two.)"""
    import json
    from make_real_data import make_real_dataset
    real = str(tmp_path / 'real')
    n_val = make_real_dataset(real, max_train=200, val_fraction=0.1)['val']
    logs = str(tmp_path / 'logs')
    flags = ['--arch', 'resnet10', '--epochs', '1', '--warmup', '0', '-b', '32', '--lr', '0.05',
             '--num-classes', '10', '--seed', '1', '-j', '0', '-p', '100', '--device', 'cpu',
             '--no-compile', '--no-amp']
    done = torchrun([real, '--log-dir', logs] + flags)
    assert done.returncode == 0, done.stdout + done.stderr
    run = only_run(logs)
    best = checkpoint_of(run, 'model_best.pth.tar')
    code, out, err = run_main([real, '--resume', best, '-e', '-j', '0', '--log-dir', logs],
                              capsys)
    assert code == 0, err
    with open(os.path.join(run, 'summary.json')) as f:
        summary = json.load(f)
    one_image = 100 / n_val
    assert abs(summary['evaluation']['top1'] - summary['best_acc1']) < one_image / 2
    # the loss tells the models apart where no prediction flips: equal up to the order
    # of float32 sums
    best_epoch = summary['epochs'][summary['best_epoch'] - 1]
    assert summary['evaluation']['loss'] == pytest.approx(best_epoch['val_loss'], rel=1e-5)
