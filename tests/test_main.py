"""The driver end to end: training, checkpoints, resume, evaluation, logs, bad input."""
import json
import math
import multiprocessing
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import CODE, REPO, FAST, run_main, checkpoint_of, only_run, expect_error
from toolkit import run_folder
import utils


# --------------------------------------------------------------------------- schedule
def test_warmup_cosine_known_values():
    f = utils.warmup_cosine_factor
    assert f(0, 10, 110) == pytest.approx(0.1)
    assert f(9, 10, 110) == pytest.approx(1.0)
    assert f(10, 10, 110) == pytest.approx(1.0)
    assert f(60, 10, 110) == pytest.approx(0.5)
    assert f(109, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert f(109, 10, 110) < 1e-3
    assert f(110, 10, 110) == pytest.approx(0.0)
    assert f(0, 0, 100) == pytest.approx(1.0)  # no warmup


def test_lr_scheduler_is_torch_and_exact_after_state_dict_round_trip():
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, utils.build_lr_scheduler(opt, warmup_epochs=2, epochs=10, iters_per_epoch=5)
    opt, sched = make()
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 / 10)
    assert max(lrs) == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(0.1) and lrs[-1] < 0.002
    assert opt.param_groups[0]['lr'] == pytest.approx(0.0, abs=1e-12)
    # resume at iteration 23 from the state dicts: the rest of the curve is identical
    opt1, sched1 = make()
    for _ in range(23):
        opt1.step()
        sched1.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt1.state_dict())
    sched2.load_state_dict(sched1.state_dict())
    for it in range(23, 50):
        assert opt2.param_groups[0]['lr'] == pytest.approx(lrs[it], rel=1e-12)
        opt2.step()
        sched2.step()


# --------------------------------------------------------------------------- files
def test_run_dirs_are_never_reused(tmp_path):
    a = run_folder.make_run_dir(str(tmp_path), 'x')
    b = run_folder.make_run_dir(str(tmp_path), 'x')
    assert a != b and os.path.isdir(a) and os.path.isdir(b)
    assert os.path.basename(a).startswith('exp_') and a.endswith('_x')


def test_atomic_json_keeps_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / 'summary.json')
    run_folder.write_json_atomic(path, {'a': 1})
    with pytest.raises(TypeError):
        run_folder.write_json_atomic(path, {'a': object()})  # not serializable: fails mid-way
    assert json.load(open(path)) == {'a': 1}
    assert os.listdir(tmp_path) == ['summary.json']  # no temporary file left behind


def test_select_device_without_gpu():
    assert utils.select_device('cpu').type == 'cpu'
    assert utils.select_device('auto', gpu=-1).type == 'cpu'
    if not torch.cuda.is_available():
        assert utils.select_device('auto').type in ('cpu', 'mps')
        with pytest.raises(ValueError, match='CUDA is not available'):
            utils.select_device('cuda:0')
    with pytest.raises(ValueError, match='unknown --device'):
        utils.select_device('tpu7')


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_train_resume_evaluate(demo, tmp_path):
    """The real command line, as a subprocess run from code/: train, resume, evaluate."""
    logs = str(tmp_path / 'logs')
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    base = [sys.executable, 'main.py', demo, '--log-dir', logs] + FAST
    out = subprocess.run(base + ['--epochs', '2'], cwd=CODE, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'Epoch: [1][0/' in out.stdout and 'Test: [0/' in out.stdout
    assert '******Acc@1' in out.stdout and 'images/s' in out.stdout and 'ETA' in out.stdout
    run = only_run(logs)
    ckpt = torch.load(checkpoint_of(run), weights_only=True)
    assert {'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer', 'scheduler',
            'args', 'best_epoch', 'best_state_dict', 'history'} <= set(ckpt)
    best = torch.load(checkpoint_of(run, 'model_best.pth.tar'), weights_only=True)
    # the best model is for -e/-a: weights and what built them, no optimizer state
    assert {'epoch', 'arch', 'state_dict', 'best_acc1', 'args'} <= set(best)
    assert best['kind'] == 'best' and best['epoch'] == ckpt['best_epoch']
    assert ckpt['arch'] == best['arch'] == 'simplenet'
    summary = json.load(open(os.path.join(run, 'summary.json')))
    assert summary['status'] == 'finished' and [e['epoch'] for e in summary['epochs']] == [1, 2]

    # resume the same run folder to 3 epochs
    out = subprocess.run(base + ['--epochs', '3', '--resume', checkpoint_of(run)], cwd=CODE,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert only_run(logs) == run
    summary = json.load(open(os.path.join(run, 'summary.json')))
    assert [e['epoch'] for e in summary['epochs']] == [1, 2, 3]
    assert torch.load(checkpoint_of(run), weights_only=True)['epoch'] == 3

    # evaluate: a new run folder, the handout's closing line, the result in both summaries
    out = subprocess.run([sys.executable, os.path.join(CODE, 'main.py'), demo, '--log-dir', logs,
                          '-e', '--resume', checkpoint_of(run, 'model_best.pth.tar'),
                          '-j', '0', '--device', 'cpu'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    last = [line for line in out.stdout.splitlines() if line.startswith('******')][-1]
    top1 = float(last.split()[1])
    assert len(os.listdir(logs)) == 2
    summary = json.load(open(os.path.join(run, 'summary.json')))
    assert summary['evaluation']['top1'] == pytest.approx(top1, abs=1e-3)


@pytest.mark.slow
def test_tensorboard_tags(trained_run):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    run = trained_run
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(run)
    mux.Reload()
    tags = {name: set(mux.GetAccumulator(name).Tags()['scalars']) for name in mux.Runs()}
    assert {'data/training_loss', 'data/learning_rate', 'data/val_loss',
            'perf/images_per_sec', 'perf/peak_memory_mb'} <= tags['.']
    for sub in ('data_top1_accuracy_train', 'data_top1_accuracy_val',
                'data_top5_accuracy_train', 'data_top5_accuracy_val'):
        assert any(name.endswith(sub) for name in tags), tags
    val = [n for n in tags if n.endswith('data_top1_accuracy_val')][0]
    steps = [e.step for e in mux.Scalars(val, 'data/top1_accuracy')]
    summary = json.load(open(os.path.join(run, 'summary.json')))
    assert steps == [1, 2]
    assert [e.value for e in mux.Scalars(val, 'data/top1_accuracy')] == pytest.approx(
        [e['val_top1'] for e in summary['epochs']], abs=1e-4)


@pytest.mark.slow
def test_interrupted_then_resumed_run_equals_uninterrupted(demo, tmp_path, capsys):
    args = [demo, '--epochs', '3', '-j', '1'] + [a for a in FAST if a not in ('-j', '0')]
    code, _, err = run_main(args + ['--log-dir', str(tmp_path / 'a')], capsys)
    assert code == 0, err
    code, out, err = run_main(args + ['--log-dir', str(tmp_path / 'b'), '--stop-after', '2'],
                              capsys)
    assert code == 0, err
    run_b = only_run(str(tmp_path / 'b'))
    assert torch.load(checkpoint_of(run_b), weights_only=True)['epoch'] == 2
    code, _, err = run_main(args + ['--log-dir', str(tmp_path / 'b'), '--resume',
                                    checkpoint_of(run_b)], capsys)
    assert code == 0, err
    a = torch.load(checkpoint_of(only_run(str(tmp_path / 'a'))), weights_only=True)
    b = torch.load(checkpoint_of(run_b), weights_only=True)
    assert a['epoch'] == b['epoch'] == 3
    for key in a['state_dict']:
        assert torch.equal(a['state_dict'][key], b['state_dict'][key]), key
    assert a['scheduler']['last_epoch'] == b['scheduler']['last_epoch']


@pytest.mark.slow
def test_cpu_run_makes_no_cuda_call(demo, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError('CUDA was called on a CPU run')
    monkeypatch.setattr(torch.cuda, '_lazy_init', boom)
    monkeypatch.setattr(torch.cuda, 'synchronize', boom)
    argv = [demo, '--log-dir', str(tmp_path), '--epochs', '2', '--gpu', '-1'] + \
        [a for a in FAST if a not in ('--device', 'cpu')]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert 'device cpu' in out


@pytest.mark.slow
def test_resnet18_fine_tune_offline_with_local_weights(demo, tmp_path, capsys):
    import torchvision
    weights = str(tmp_path / 'resnet18_random.pth')
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    argv = [demo, '--log-dir', str(tmp_path / 'logs'), '--epochs', '2', '--use-resnet18',
            '--pretrained-weights', weights] + FAST[2:]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    ckpt = torch.load(checkpoint_of(only_run(str(tmp_path / 'logs'))), weights_only=True)
    assert ckpt['arch'] == 'resnet18' and ckpt['state_dict']['fc.weight'].shape == (4, 512)


def test_resnet18_without_network_says_where_to_put_weights(demo, tmp_path, capsys,
                                                            monkeypatch):
    import urllib.request
    # urlopen caches an opener built from the proxy variables below: restore it afterwards
    monkeypatch.setattr(urllib.request, '_opener', None)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    for var in ('https_proxy', 'HTTPS_PROXY', 'http_proxy', 'HTTP_PROXY'):
        monkeypatch.setenv(var, 'http://127.0.0.1:9')  # a closed port: no download possible
    monkeypatch.setenv('no_proxy', '')
    code, out, err = run_main([demo, '--log-dir', str(tmp_path), '--epochs', '2',
                               '--use-resnet18'] + FAST[2:], capsys)
    assert code == 1
    assert '--pretrained-weights' in err and 'resnet18-' in err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err


# --------------------------------------------------------------------------- bad input
def write_set(root, train_lines, val_lines=('val/0.jpg 0',), images=('train/0.jpg',
              'train/1.jpg', 'val/0.jpg')):
    for rel in images:
        path = os.path.join(root, 'images', rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, np.full((40, 40, 3), 128, np.uint8))
    if train_lines is not None:
        with open(os.path.join(root, 'train.txt'), 'w') as f:
            f.write('\n'.join(train_lines) + '\n')
    with open(os.path.join(root, 'val.txt'), 'w') as f:
        f.write('\n'.join(val_lines) + '\n')
    return str(root)


def test_bad_data_inputs(tmp_path, capsys):
    def argv(folder, batch='1', workers='0'):
        return [str(folder), '--log-dir', str(tmp_path / 'logs'), '--epochs', '2', '--warmup',
                '1', '-b', batch, '-j', workers, '--device', 'cpu', '--arch', 'simplenet']
    expect_error(argv(tmp_path / 'nowhere'), capsys, 'nowhere', 'does not exist')
    expect_error(argv(write_set(tmp_path / 'no_train', None)), capsys, 'train.txt')
    d = write_set(tmp_path / 'malformed', ['train/0.jpg 0', 'train/1.jpg'])
    expect_error(argv(d), capsys, 'line 2')
    d = write_set(tmp_path / 'label', ['train/0.jpg 0', 'train/1.jpg 100'])
    expect_error(argv(d) + ['--num-classes', '100'], capsys, '100', 'train.txt')
    d = write_set(tmp_path / 'negative', ['train/0.jpg 0', 'train/1.jpg -1'])
    expect_error(argv(d), capsys, '-1', 'line 2')
    d = write_set(tmp_path / 'missing', ['train/0.jpg 0', 'train/9.jpg 1'])
    expect_error(argv(d), capsys, '9.jpg')
    d = write_set(tmp_path / 'corrupt', ['train/0.jpg 0', 'train/1.jpg 1'])
    with open(os.path.join(d, 'images', 'train', '1.jpg'), 'wb') as f:
        f.write(b'this is not a jpeg')
    children = set(multiprocessing.active_children())   # any an earlier test left
    for workers in ('0', '1'):  # in the main process and inside a DataLoader worker
        expect_error(argv(d, workers=workers), capsys, '1.jpg')
    # the failed loader's worker is gone when main() returns, not at a later garbage
    # collection (which waits 5 s for it)
    assert set(multiprocessing.active_children()) <= children
    d = write_set(tmp_path / 'small', ['train/0.jpg 0', 'train/1.jpg 1'])
    expect_error(argv(d, batch='3'), capsys, '--batch-size 3', 'larger than the training set')
    # nothing failed half-way through a run: no run folder holds a checkpoint
    for run in os.listdir(tmp_path / 'logs') if os.path.exists(tmp_path / 'logs') else []:
        assert not os.path.exists(os.path.join(tmp_path, 'logs', run, 'models'))


def test_bad_flag_combinations(demo, tmp_path, capsys):
    logs = ['--log-dir', str(tmp_path)]
    expect_error([demo, '-e', '-a', '--resume', 'x'] + logs, capsys, 'exclusive')
    expect_error([demo, '-e'] + logs, capsys, '--resume')
    expect_error([demo, '-a'] + logs, capsys, '--resume')
    expect_error([demo, '--resume', str(tmp_path / 'nope.pth.tar')] + logs, capsys,
                 'nope.pth.tar')
    expect_error([demo, '--epochs', '5', '--warmup', '5'] + logs, capsys, '--warmup')
    expect_error([demo, '--adv-train', '--adv-ratio', '1.5'] + logs, capsys, '--adv-ratio')
    expect_error([demo, '-a', '--resume', 'x', '--attack-eps', '-1'] + logs, capsys,
                 '--attack-eps')
    expect_error([demo, '--device', 'cuda:0' if not torch.cuda.is_available() else 'tpu'] + logs,
                 capsys, '--device')


@pytest.mark.parametrize('flags, words', [
    (['--lr', 'inf'], '--lr must be a finite number'),
    (['--momentum', 'nan'], '--momentum must be a finite number'),
    (['--momentum', '1.0'], '--momentum must be in [0, 1)'),
    (['--momentum', '-0.1'], '--momentum must be in [0, 1)'),
    (['--wd', 'inf'], '--wd must be a finite number'),
    (['--clip-grad', 'inf'], '--clip-grad must be a finite number'),
    (['--adv-eps', 'nan'], '--adv-eps must be a finite number'),
    (['--adv-train', '--adv-ratio', 'nan'], '--adv-ratio must be a finite number'),
    (['-a', '--resume', 'x', '--attack-eps', 'inf'], '--attack-eps must be a finite number'),
    (['-a', '--resume', 'x', '--attack-step-size', 'nan'],
     '--attack-step-size must be a finite number'),
])
def test_non_finite_floats_and_a_bad_momentum_are_refused_before_any_folder(
        demo, tmp_path, capsys, flags, words):
    """argparse's float() takes 'nan' and 'inf'; a run on them failed late, with a
    traceback (SGD's own check of the momentum) or a run folder of a diverged run."""
    logs = tmp_path / 'logs'
    expect_error([demo, '--log-dir', str(logs), '--epochs', '2'] + FAST + flags, capsys, words)
    assert not logs.exists() or not os.listdir(logs)


@pytest.mark.parametrize('flags, words', [
    (['--seed', '99999999999999999999'], '--seed must be in [0, 2**32)'),
    (['--seed', '-1'], '--seed must be in [0, 2**32)'),
    (['--name', '../../x'], "--name '../../x' must be one folder name"),
    (['--name', 'a/b'], "--name 'a/b' must be one folder name"),
    (['--name', '..'], "--name '..' must be one folder name"),
    (['--start-epoch', '5'], '--start-epoch 5 leaves no epoch to train'),
    (['--start-epoch', '3'], '--start-epoch 3 leaves no epoch to train'),
])
def test_a_seed_name_or_start_epoch_that_cannot_work_is_refused_before_any_folder(
        demo, tmp_path, capsys, flags, words):
    """A huge seed overflowed torch.manual_seed with a traceback; a name with '/' put the
    run folder outside --log-dir or nested in it; a start epoch at or past --epochs
    trained nothing and said 'finished'."""
    logs = tmp_path / 'logs'
    expect_error([demo, '--log-dir', str(logs), '--epochs', '3'] + FAST + flags, capsys, words)
    assert not logs.exists() and not (tmp_path / 'x').exists()


def test_gpu_on_a_machine_without_cuda_is_refused_like_device_cuda(demo, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    logs = tmp_path / 'logs'
    on_auto = [a for a in FAST if a not in ('--device', 'cpu')] + ['--device', 'auto']
    expect_error([demo, '--log-dir', str(logs), '--epochs', '3', '--gpu', '3'] + on_auto,
                 capsys, '--gpu 3', 'CUDA is not available')
    assert not logs.exists()


@pytest.mark.slow
def test_bad_checkpoints(demo, trained_run, tmp_path, capsys):
    logs = str(tmp_path / 'logs')
    ckpt = checkpoint_of(trained_run)
    # a checkpoint of another architecture: say which one it holds
    expect_error([demo, '--log-dir', logs, '-e', '--resume', ckpt, '--use-resnet18'], capsys,
                 "'simplenet'", "'resnet18'")
    # a truncated file
    truncated = str(tmp_path / 'truncated.pth.tar')
    with open(ckpt, 'rb') as src, open(truncated, 'wb') as dst:
        dst.write(src.read()[:1000])
    expect_error([demo, '--log-dir', logs, '-e', '--resume', truncated], capsys,
                 'truncated.pth.tar')
    # the run folder of the first run was left intact by all of this
    assert torch.load(ckpt, weights_only=True)['epoch'] == 2


def handout_files(run, folder):
    """The checkpoint of a run as the handout's main.py saves one (epoch, model_arch,
    state_dict, a tensor best_acc1, optimizer), and its bare weights."""
    ckpt = torch.load(checkpoint_of(run), weights_only=True)
    handout, bare = os.path.join(folder, 'handout.pth.tar'), os.path.join(folder, 'bare.pth')
    torch.save({'epoch': ckpt['epoch'], 'model_arch': 'simplenet',
                'state_dict': ckpt['state_dict'], 'best_acc1': torch.tensor(ckpt['best_acc1']),
                'optimizer': ckpt['optimizer']}, handout)
    torch.save(ckpt['state_dict'], bare)
    return handout, bare


def evaluated_top1(argv, capsys, logs):
    code, out, err = run_main(argv + ['--log-dir', logs, '-j', '0'], capsys)
    assert code == 0, err
    runs = sorted(os.listdir(logs))
    with open(os.path.join(logs, runs[-1], 'summary.json')) as f:
        return json.load(f)['evaluation']['top1']


def test_a_handout_checkpoint_and_bare_weights_are_evaluated_attacked_and_resumed(
        demo, trained_run, tmp_path, capsys):
    handout, bare = handout_files(trained_run, str(tmp_path))
    logs = str(tmp_path / 'logs')
    # -e: the same figure as the toolkit's own checkpoint of those weights
    ours = evaluated_top1([demo, '-e', '--resume', checkpoint_of(trained_run)], capsys, logs)
    assert evaluated_top1([demo, '-e', '--resume', handout], capsys, logs) == ours
    assert evaluated_top1([demo, '-e', '--resume', bare, '--arch', 'simplenet'], capsys,
                          logs) == ours
    code, out, err = run_main([demo, '-a', '--resume', handout, '--attack-steps', '1', '-j',
                               '0', '--log-dir', logs], capsys)
    assert code == 0 and 'attack success rate' in out, err
    # --resume: what is missing said in one line; a new run from the weights and epoch
    for path, extra, missing, epochs in ((handout, [], 'has no args, scheduler', [3]),
                                         (bare, ['--arch', 'simplenet'],
                                          'has no epoch, args, optimizer, scheduler', [1, 2, 3])):
        train_logs = str(tmp_path / ('logs_' + os.path.basename(path)))
        code, out, err = run_main([demo, '--resume', path, '--log-dir', train_logs,
                                   '--epochs', '3'] + FAST + extra, capsys)
        assert code == 0, err
        (note,) = [line for line in out.splitlines() if 'exact resumption needs' in line]
        assert missing in note and 'a new run starts from its weights' in note
        summary = json.load(open(os.path.join(only_run(train_logs), 'summary.json')))
        assert [e['epoch'] for e in summary['epochs']] == epochs
        assert summary['args']['arch'] == 'simplenet'
    # a handout checkpoint at or past --epochs has nothing to train
    expect_error([demo, '--resume', handout, '--log-dir', logs, '--epochs', '2'] + FAST,
                 capsys, "'" + handout + "' is at epoch 2", 'no epoch to train')


def test_bare_weights_of_another_model_ask_for_arch(demo, trained_run, tmp_path, capsys):
    """Bare weights name no model: -e, -a and --resume try the default CNN, and the
    refusal says how to name the model (the run was a SimpleNet)."""
    _, bare = handout_files(trained_run, str(tmp_path))
    for mode in (['-e'], ['-a'], ['--epochs', '3', '--warmup', '1', '-b', '8', '--device', 'cpu']):
        expect_error([demo, '--resume', bare, '-j', '0', '--log-dir', str(tmp_path / 'l')]
                     + mode, capsys, 'does not fit the model (resnet10)',
                     'say which it is with --arch')
        # named by --arch: the refusal does not ask for what was given
        code, out, err = run_main([demo, '--resume', bare, '-j', '0', '--arch', 'resnet10',
                                   '--log-dir', str(tmp_path / 'l')] + mode, capsys)
        assert code == 1 and 'does not fit the model (resnet10)' in err, err
        assert 'say which it is' not in err, err


@pytest.mark.parametrize('damage, words', [
    (dict(args=['epochs', 3]), "its 'args' is a list"),
    (dict(args='epochs=3'), "its 'args' is a str"),
    (dict(args={'epochs': 'ten'}), "its args['epochs'] is 'ten', not a whole number"),
    (dict(args={'lr': None, 'amp': 'yes'}), "its args['amp'] is 'yes', not true or false"),
    (dict(epoch=-2), "its 'epoch' is -2"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_entry(demo, trained_run, tmp_path,
                                                           capsys, damage, words):
    ckpt = torch.load(checkpoint_of(trained_run), weights_only=True)
    if isinstance(damage.get('args'), dict):
        damage = dict(args=dict(ckpt['args'], **damage['args']))
    path = str(tmp_path / 'damaged.pth.tar')
    torch.save(dict(ckpt, **damage), path)
    for mode in (['-e'], ['-a'], ['--epochs', '4']):
        expect_error([demo, '--resume', path, '-j', '0', '--log-dir', str(tmp_path / 'logs')]
                     + mode, capsys, 'damaged.pth.tar', 'is damaged', words)


@pytest.mark.slow
def test_vit_trains_from_cli_with_adamw_groups(demo, tmp_path, capsys, monkeypatch):
    built = {}
    real_adamw = torch.optim.AdamW

    def spy(groups, **kwargs):
        built['groups'] = groups
        return real_adamw(groups, **kwargs)
    monkeypatch.setattr(torch.optim, 'AdamW', spy)
    argv = [demo, '--log-dir', str(tmp_path), '--epochs', '2', '--use-vit', '--wd', '0.05',
            '--lr', '0.001'] + FAST[2:]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    decay, no_decay = built['groups']
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0
    assert all(p.ndim > 1 for p in decay['params'])
    assert any(p.ndim == 4 and p.shape[0] == 1 for p in no_decay['params'])  # pos_embed
    ckpt = torch.load(checkpoint_of(only_run(str(tmp_path))), weights_only=True)
    assert ckpt['arch'] == 'simplevit'
    # -e takes the architecture from the checkpoint: no --use-vit needed
    code, out, err = run_main([demo, '--log-dir', str(tmp_path / 'eval'), '-e', '--resume',
                               checkpoint_of(only_run(str(tmp_path))), '-j', '0'], capsys)
    assert code == 0, err
    assert '(simplevit)' in out


@pytest.mark.slow
def test_resume_from_a_checkpoint_outside_a_run_folder(demo, trained_run, tmp_path, capsys):
    import shutil
    copied = str(tmp_path / 'copied.pth.tar')
    shutil.copy(checkpoint_of(trained_run), copied)
    logs = str(tmp_path / 'logs')
    code, out, err = run_main([demo, '--log-dir', logs, '--epochs', '3', '--resume', copied]
                              + FAST, capsys)
    assert code == 0, err
    run = only_run(logs)  # a new run folder: the copied file has none
    summary = json.load(open(os.path.join(run, 'summary.json')))
    assert [e['epoch'] for e in summary['epochs']] == [3]
    assert summary['epochs'][0]['lr'] == pytest.approx(0.0, abs=1e-9)  # end of the cosine


@pytest.mark.slow
def test_start_epoch_fast_forwards_the_lr(demo, tmp_path, capsys):
    code, out, err = run_main([demo, '--log-dir', str(tmp_path), '--epochs', '3',
                               '--start-epoch', '2'] + FAST, capsys)
    assert code == 0, err
    summary = json.load(open(os.path.join(only_run(str(tmp_path)), 'summary.json')))
    assert [e['epoch'] for e in summary['epochs']] == [3]
    assert 'Epoch: [3][0/' in out


@pytest.mark.slow
def test_vit_learns_the_demo_set_well_above_chance(tmp_path_factory, capsys):
    """The ViT recipe from the CLI (AdamW, clipping, warmup + cosine) on a demo set."""
    from make_demo_data import make_demo_dataset
    data = str(tmp_path_factory.mktemp('demo_vit'))
    make_demo_dataset(data, num_classes=4, train_per_class=40, val_per_class=10, size=64,
                      seed=1)
    logs = str(tmp_path_factory.mktemp('vit_logs'))
    argv = [data, '--log-dir', logs, '--use-vit', '--epochs', '3', '--warmup', '1', '-b', '16',
            '--lr', '0.001', '--wd', '0.05', '-j', '0', '--device', 'cpu', '--seed', '0',
            '--num-classes', '4', '-p', '100']
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    summary = json.load(open(os.path.join(only_run(logs), 'summary.json')))
    assert summary['best_acc1'] >= 50.0, summary['epochs']  # chance: 25%


@pytest.mark.slow
@pytest.mark.parametrize('batch, lr', [(8, 0.003125), (256, 0.1)])
def test_the_lr_follows_the_batch_unless_given(demo, tmp_path, capsys, batch, lr):
    """The handout's lr 0.1 is for its batch of 256: without --lr it is scaled linearly to
    -b, said at start and stored in the run; a resume keeps it; --lr is used as given."""
    from toolkit import run_plan
    no_lr = [a for i, a in enumerate(FAST) if a != '--lr' and FAST[i - 1] != '--lr']
    assert run_plan.scaled_lr(batch) == pytest.approx(lr)
    if batch > 24:   # the demo set has 24 training images: check the rule only
        return
    logs = tmp_path / 'scaled'
    code, out, err = run_main([demo, '--log-dir', str(logs), '--epochs', '2',
                               '--stop-after', '1'] + no_lr, capsys)
    assert code == 0, err
    assert f"lr {lr:g} (rule: 0.1 x {batch} / 256)" in out
    run = only_run(str(logs))
    assert json.load(open(os.path.join(run, 'summary.json')))['args']['lr'] == lr
    code, out, err = run_main([demo, '--resume', checkpoint_of(run)] + no_lr, capsys)
    assert code == 0, err
    assert torch.load(checkpoint_of(run), weights_only=True)['args']['lr'] == lr
    code, out, err = run_main([demo, '--log-dir', str(tmp_path / 'given')] + no_lr +
                              ['--epochs', '1', '--warmup', '0', '--lr', '0.1'], capsys)
    assert code == 0 and '(rule: 0.1 x' not in out, err
