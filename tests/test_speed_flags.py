"""The speed flags in the driver: --amp, --channels-last, --compile, --data-cache (auto per device),
the uint8 hand-over, and that every path trains, resumes exactly and is evaluated."""
import json
import os

import pytest
import torch

from conftest import FAST, run_main, checkpoint_of, only_run, expect_error
import custom_transforms as T
from toolkit import fast_data
from toolkit import loaders
import main as driver
from toolkit import speed

pytestmark = pytest.mark.usefixtures('one_thread')

FP32 = ['--no-amp', '--no-channels-last', '--no-data-cache', '--no-compile']


def train(demo, logs, capsys, *extra, epochs=2):
    warmup = ['--warmup', '0'] if epochs == 1 else []  # FAST's warmup needs 2 epochs
    code, out, err = run_main([demo, '--log-dir', str(logs), '--epochs', str(epochs)] + FAST
                              + warmup + list(extra), capsys)
    assert code == 0, err
    return only_run(str(logs)), out


def weights(run, name='checkpoint.pth.tar'):
    return torch.load(checkpoint_of(run, name), weights_only=True)['state_dict']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def summary_args(run):
    with open(os.path.join(run, 'summary.json')) as f:
        return json.load(f)['args']


# ------------------------------------------------------------------ fp32 is unchanged
def test_uint8_handover_is_bit_for_bit_the_float_batches(demo):
    """OnDevice normalizes the workers' uint8 as ToTensor + Normalize did in the worker."""
    import random
    from custom_dataloader import MiniPlacesLoader
    from student_code import get_train_transforms
    floats = MiniPlacesLoader(demo, 'train', get_train_transforms(), num_classes=None)
    uint8s = MiniPlacesLoader(demo, 'train', get_train_transforms(), num_classes=None)
    transforms, normalization = loaders.uint8_handover(uint8s)
    uint8s.transforms = transforms
    batches = []
    for dataset, norm in ((floats, None), (uint8s, normalization)):
        random.seed(5)  # the same augmentation draws for both
        loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset))
        (batch, _), = list(loaders.OnDevice(loader, torch.device('cpu'), norm,
                                           torch.contiguous_format))
        batches.append(batch)
    assert next(iter(torch.utils.data.DataLoader(uint8s)))[0].dtype == torch.uint8
    assert batches[0].dtype == batches[1].dtype == torch.float32
    assert torch.equal(batches[0], batches[1])


def test_fp32_training_equals_the_float_handover_of_before(demo, tmp_path, capsys, monkeypatch):
    """--no-amp --no-channels-last --no-data-cache: the same weights as the per-image path
    handing over float32 (the code before the uint8 hand-over), bit for bit."""
    run_new, out = train(demo, tmp_path / 'new', capsys, *FP32, epochs=1)
    assert '=> speed: amp off | channels-last off | compile off | data-cache off' in out
    monkeypatch.setattr(loaders, 'uint8_transforms', lambda transforms: None)
    run_old, _ = train(demo, tmp_path / 'old', capsys, *FP32, epochs=1)
    assert_same_weights(weights(run_new), weights(run_old))


# ------------------------------------------------------------------ the settings train
def test_auto_settings_are_resolved_printed_and_stored(demo, tmp_path, capsys):
    run, out = train(demo, tmp_path, capsys, epochs=1)
    line = next(l for l in out.splitlines() if l.startswith('=> speed:'))
    args = summary_args(run)
    auto = speed.auto_speed_settings(torch.device('cpu'), args['arch'])
    for key, (value, why) in auto.items():
        assert args[key] is value, key
        assert why in line, (key, line)
    ckpt = torch.load(checkpoint_of(run), weights_only=True)
    assert all(ckpt['args'][k] == args[k] for k in auto)


@pytest.mark.slow
def test_amp_bf16_resumes_exactly_on_the_cpu(demo, tmp_path, capsys):
    flags = ['--amp', '--no-channels-last', '--data-cache']
    whole, out = train(demo, tmp_path / 'whole', capsys, *flags, epochs=3)
    assert 'amp bfloat16' in out
    args = summary_args(whole)
    assert args['amp'] is True and args['amp_dtype'] == 'bfloat16'
    part, _ = train(demo, tmp_path / 'part', capsys, *flags, '--stop-after', '2', epochs=3)
    code, _, err = run_main([demo, '--resume', checkpoint_of(part), '-j', '0'], capsys)
    assert code == 0, err
    assert_same_weights(weights(whole), weights(part))
    assert all(torch.isfinite(v).all() for v in weights(whole).values()
               if v.is_floating_point())


@pytest.mark.slow
def test_cached_path_resumes_exactly_with_workers(demo, tmp_path, capsys):
    base = [a for a in FAST if a not in ('-j', '0')]

    def run(logs, *extra):
        code, _, err = run_main([demo, '--log-dir', str(logs), '--epochs', '3', '-j', '1'] + base
                                + ['--data-cache', '--no-amp'] + list(extra), capsys)
        assert code == 0, err
        return only_run(str(logs))
    whole = run(tmp_path / 'whole')
    part = run(tmp_path / 'part', '--stop-after', '1')
    code, _, err = run_main([demo, '--resume', checkpoint_of(part), '-j', '1'], capsys)
    assert code == 0, err
    assert summary_args(part)['data_cache'] is True
    assert_same_weights(weights(whole), weights(part))


def test_amp_channels_last_custom_conv_then_evaluate_and_attack(demo, tmp_path, capsys):
    """A model trained with bf16 + channels-last (CustomConv2d): -e -v (saliency) and -a
    load it; the checkpoint's speed settings are the evaluation's."""
    run, _ = train(demo, tmp_path / 'logs', capsys, '--amp', '--channels-last',
                   '--use-custom-conv', epochs=1)
    best = checkpoint_of(run, 'model_best.pth.tar')
    for mode in ('-e', '-a'):
        code, out, err = run_main([demo, '--log-dir', str(tmp_path / mode), mode, '-v',
                                   '--resume', best, '-j', '0', '--attack-steps', '2'], capsys)
        assert code == 0, (mode, err)
        assert 'amp bfloat16 | channels-last on' in out, out
        assert '******Acc@1' in out
    code, out, err = run_main([demo, '--log-dir', str(tmp_path / 'e32'), '-e', '--resume', best,
                               '-j', '0', '--no-amp', '--no-channels-last'], capsys)
    assert code == 0 and 'amp off | channels-last off' in out, err


def test_adversarial_training_under_amp(demo, tmp_path, capsys):
    run, _ = train(demo, tmp_path, capsys, '--amp', '--adv-train', '--adv-steps', '2', epochs=1)
    assert summary_args(run)['adv_train'] is True


def test_compile_falls_back_to_eager_with_a_note(demo, tmp_path, capsys, monkeypatch):
    def broken_compile(model, **kwargs):
        def forward(input):
            raise RuntimeError('no backend here\nsecond line')
        return forward
    monkeypatch.setattr(torch, 'compile', broken_compile)
    run, out = train(demo, tmp_path / 'a', capsys, '--compile', epochs=1)
    notes = [l for l in out.splitlines() if l.startswith('note: --compile failed')]
    assert len(notes) == 1 and 'training runs eagerly' in notes[0], out
    assert not any('_orig_mod' in k for k in weights(run))  # loads in eager mode
    monkeypatch.setattr(speed, 'compile_blocker', lambda device: 'no C++ compiler (g++)')
    run, out = train(demo, tmp_path / 'b', capsys, '--compile', epochs=1)
    assert 'note: --compile: no C++ compiler (g++); training runs eagerly' in out


def test_transforms_the_cache_cannot_fuse_are_named_at_start(demo, tmp_path, capsys,
                                                            monkeypatch):
    class Sharpen(object):  # a student's own step: not one the fused warp knows
        def __call__(self, img):
            return img

    def train_transforms():
        return T.Compose([Sharpen(), T.CenterCrop(32), T.ToTensor()])
    monkeypatch.setattr(loaders, 'get_train_transforms', train_transforms)
    run, out = train(demo, tmp_path, capsys, '--data-cache', epochs=1)
    assert 'note: --data-cache was asked for, but get_train_transforms(): transform 1 ' \
        '(<' in out and 'Sharpen object' in out and 'this run uses the per-image path' in out
    assert summary_args(run)['data_cache'] is False


def nearly_full_disk(monkeypatch, free=7_800_000):
    """A disk with `free` bytes left, as data_cache sees it."""
    import shutil
    from toolkit import data_cache
    monkeypatch.setattr(data_cache.shutil, 'disk_usage',
                        lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - free, free))


def test_an_auto_cache_that_does_not_fit_on_the_disk_falls_back_to_the_per_image_path(
        demo, tmp_path, capsys, monkeypatch):
    import shutil
    data = str(tmp_path / 'data')
    shutil.copytree(demo, data, ignore=shutil.ignore_patterns('cache'))
    nearly_full_disk(monkeypatch)
    run, out = train(data, tmp_path / 'auto', capsys, epochs=1)  # the cache left to auto
    (note,) = [line for line in out.splitlines()
               if line.startswith('note: the data cache of')]
    assert note.endswith('this run uses the per-image path') and '7.8 MB free' in note, out
    # the start line gives the real reason, not the auto one
    (line,) = [line for line in out.splitlines() if line.startswith('=> speed:')]
    assert 'data-cache off (the data cache of val and train needs' in line, line
    assert summary_args(run)['data_cache'] is False
    assert not os.path.exists(os.path.join(data, 'cache'))


def test_the_start_line_of_a_read_only_folder_gives_the_real_reason(demo, tmp_path, capsys,
                                                                   monkeypatch):
    """(A folder this process cannot write, as data_cache sees it: root writes anyway.)"""
    import shutil
    from toolkit import data_cache
    data = str(tmp_path / 'data')
    shutil.copytree(demo, data, ignore=shutil.ignore_patterns('cache'))
    monkeypatch.setattr(data_cache, 'cache_writable', lambda folder: False)
    run, out = train(data, tmp_path / 'logs', capsys, epochs=1)
    (line,) = [line for line in out.splitlines() if line.startswith('=> speed:')]
    assert f'data-cache off ({data} is read-only and holds no cache of val)' in line, line


def test_a_cache_asked_for_that_does_not_fit_is_refused_with_figures_that_add_up(
        demo, tmp_path, capsys, monkeypatch):
    import re
    import shutil
    data = str(tmp_path / 'data')
    shutil.copytree(demo, data, ignore=shutil.ignore_patterns('cache'))
    nearly_full_disk(monkeypatch)
    logs = tmp_path / 'logs'
    line = expect_error([data, '--log-dir', str(logs), '--epochs', '2', '--data-cache']
                        + FAST, capsys, '--data-cache', '--no-data-cache')
    # 36 images of 128 x 128 x 3 bytes, plus the margin kept free, against 7.8 MB
    needs, images, margin, free = map(float, re.search(
        r'needs ([\d.]+) MB \(([\d.]+) MB of images \+ ([\d.]+) MB kept free.*has '
        r'([\d.]+) MB free', line).groups())
    assert images == round(36 * 128 * 128 * 3 / 1e6, 1) and needs == images + margin
    assert free == 7.8 and needs > free
    assert not logs.exists()


# ------------------------------------------------------------------ bad input, resume
def test_bad_speed_combinations_give_one_line(demo, tmp_path, capsys):
    run, _ = train(demo, tmp_path / 'logs', capsys, '--data-cache', '--no-amp',
                   '--stop-after', '1', epochs=3)
    expect_error([demo, '-e', '--compile', '--resume', checkpoint_of(run)], capsys,
                 '--compile is for training')
    expect_error([demo, '--resume', checkpoint_of(run), '--no-data-cache'], capsys,
                 '--no-data-cache', 'trained with --data-cache', 'resume keeps')
    expect_error([demo, '--resume', checkpoint_of(run), '--amp'], capsys,
                 '--amp', 'trained with --no-amp')


def test_a_checkpoint_from_before_the_flags_resumes_in_fp32_per_image(demo, tmp_path, capsys):
    run, _ = train(demo, tmp_path, capsys, *FP32, '--stop-after', '1', epochs=2)
    path = checkpoint_of(run)
    ckpt = torch.load(path, weights_only=True)
    for key in ('amp', 'amp_dtype', 'channels_last', 'compile', 'data_cache'):
        del ckpt['args'][key]
    torch.save(ckpt, path)
    code, out, err = run_main([demo, '--resume', path, '-j', '0'], capsys)
    assert code == 0, err
    assert 'amp off | channels-last off | compile off (auto' in out
    assert 'data-cache off' in out


@pytest.mark.slow
def test_the_grad_scaler_path_trains_clips_and_resumes_exactly(demo, tmp_path, capsys,
                                                               monkeypatch):
    """The fp16 path of CUDA without bf16 and of MPS, on the CPU: a GradScaler, its state in
    the checkpoint, clipping of unscaled gradients, exact resume. The CPU computes fp16
    convolutions by emulation (minutes per epoch on this machine), so the forward passes
    run in bf16 here: the scaler's plumbing is what is tested."""
    monkeypatch.setattr(speed, 'amp_dtype_for', lambda device: 'float16')
    monkeypatch.setattr(driver, 'autocast', lambda args, device: torch.autocast(
        device.type, dtype=torch.bfloat16))
    flags = ['--amp', '--no-channels-last', '--clip-grad', '1.0']
    whole, out = train(demo, tmp_path / 'whole', capsys, *flags, epochs=2)
    assert 'amp float16 + GradScaler' in out
    ckpt = torch.load(checkpoint_of(whole), weights_only=True)
    assert ckpt['scaler'] and ckpt['scaler']['scale'] > 0
    part, _ = train(demo, tmp_path / 'part', capsys, *flags, '--stop-after', '1', epochs=2)
    code, _, err = run_main([demo, '--resume', checkpoint_of(part), '-j', '0'], capsys)
    assert code == 0, err
    assert_same_weights(weights(whole), weights(part))


def test_pgd_and_saliency_under_bf16_autocast_keep_float32_images():
    import student_code as sc
    torch.manual_seed(0)
    model = sc.cnn_models['simplenet'](num_classes=4).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        adv = sc.PGDAttack(torch.nn.CrossEntropyLoss(), num_steps=2).perturb(model, x)
        saliency = sc.GradAttention().explain(model, x)
    assert adv.dtype == saliency.dtype == torch.float32
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(adv, x)
    assert torch.isfinite(saliency).all() and saliency.max() == 1.0


# ------------------------------------------------------------------ GPUs seen from the CPU
@pytest.mark.parametrize('capability, dtype', [((7, 5), 'float16'), ((8, 0), 'bfloat16'),
                                               ((9, 0), 'bfloat16')])
def test_amp_dtype_follows_the_runs_own_gpu(monkeypatch, capability, dtype):
    """A T4 (7.5) gets fp16 + GradScaler though torch counts its emulated bf16 as
    supported; Ampere and later get bf16; the capability is asked of the run's GPU."""
    asked = []

    def get_device_capability(device=None):
        asked.append(device)
        return capability
    monkeypatch.setattr(torch.cuda, 'get_device_capability', get_device_capability)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert speed.amp_dtype_for(torch.device('cuda', 1)) == dtype
    assert asked == [torch.device('cuda', 1)]


def test_a_resume_stays_on_the_cpu_where_a_gpu_is(demo, tmp_path, capsys, monkeypatch):
    """The suite's runs (run_main) are on the CPU even where CUDA is present: a resume
    started without --device would otherwise move to the GPU, and its weights would no
    longer equal the CPU run's."""
    devices = []
    select = driver.select_device

    def spy(*args, **kwargs):
        devices.append(select(*args, **kwargs))
        return devices[-1]
    monkeypatch.setattr(driver, 'select_device', spy)
    part, _ = train(demo, tmp_path / 'part', capsys, *FP32, '--stop-after', '1', epochs=2)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    code, _, err = run_main([demo, '--resume', checkpoint_of(part), '-j', '0'], capsys)
    assert code == 0, err
    assert [d.type for d in devices] == ['cpu', 'cpu']


@pytest.mark.parametrize('amx, bf16, arch, amp, why', [
    (True, True, 'resnet10', True, "amp bfloat16 (auto: bf16 on this CPU's AMX tiles: 6.6x fp32"),
    (True, True, 'simplenet', False, 'amp off (auto: bf16 on AMX measured 1.9x slower than'),
    (False, True, 'resnet10', False, 'amp off (auto: bf16 without AMX tiles: slower than fp32 '
                                     'on one CPU measured, 1.4-2.1x faster on another; ask '
                                     'with --amp'),
    (False, False, 'resnet10', False, 'amp off (auto: this CPU computes bf16 in software'),
])
def test_the_cpus_auto_amp_follows_amx_and_the_model(demo, tmp_path, capsys, monkeypatch,
                                                     amx, bf16, arch, amp, why):
    """bf16 autocast on AMX tiles is 6.6x fp32 for the default CNN and 1.9x slower for
    SimpleNet; without AMX the CPUs measured disagree, so fp32 stays (docs/benchmarks.md):
    auto --amp follows the capability and the model, and the start line says why."""
    monkeypatch.setattr(speed, 'cpu_has_amx', lambda: amx)
    monkeypatch.setattr(speed, 'cpu_has_bf16', lambda: bf16)
    run, out = train(demo, tmp_path, capsys, '--no-data-cache', '--arch', arch, epochs=1)
    line = next(l for l in out.splitlines() if l.startswith('=> speed:'))
    assert summary_args(run)['amp'] is amp
    assert why in line, line


def test_every_model_has_a_measured_amx_setting_or_stays_in_fp32(monkeypatch):
    from toolkit import networks
    monkeypatch.setattr(speed, 'cpu_has_amx', lambda: True)
    cpu = torch.device('cpu')
    for arch in networks.ARCHS:
        on, why = speed.auto_speed_settings(cpu, arch)['amp']
        assert (on, why) == speed.AMX_BF16.get(arch, (False, why)), arch
    on, why = speed.auto_speed_settings(cpu, 'my_net')['amp']
    assert not on and 'not measured for my_net' in why
    assert speed.auto_speed_settings(cpu, 'simplenet')['channels_last'][0] is True


@pytest.mark.slow
@pytest.mark.parametrize('given, spin_count', [(None, "'0'"), ('ACTIVE', None)])
def test_openmp_threads_wait_passively_unless_the_user_says(given, spin_count):
    """Two runs on the same cores slow 5x with spinning OpenMP threads (docs/benchmarks.md):
    main.py asks libgomp to wait passively before torch loads it, which libgomp reports
    (OMP_DISPLAY_ENV) as a spin count of 0; a policy the user set is kept."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
    env['OMP_DISPLAY_ENV'] = 'verbose'
    if given:
        env['OMP_WAIT_POLICY'] = given
    code = os.path.join(os.path.dirname(__file__), os.pardir, 'code')
    done = subprocess.run([sys.executable, '-c', 'import main, torch; torch.ones(9).sum()'],
                          cwd=code, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    spin = next(l for l in done.stderr.splitlines() if 'GOMP_SPINCOUNT' in l)
    if spin_count:
        assert spin.split('=')[1].strip() == spin_count, spin
    else:
        assert int(spin.split('=')[1].strip().strip("'")) > 0, spin
        assert "OMP_WAIT_POLICY = 'ACTIVE'" in done.stderr


@pytest.mark.slow
def test_the_shared_cores_benchmark_times_one_and_two_processes(capsys):
    import benchmark
    benchmark.main(['shared', '--quick', '--policies', 'passive', '--model', 'simplenet',
                    '--batch-size', '2'])
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.strip().startswith('passive'))
    alone, pair = line.split('|')
    assert float(alone.split()[2]) > 0
    assert len(pair.split('(')[1].split('/')) == 2       # a slowdown for each of the two
