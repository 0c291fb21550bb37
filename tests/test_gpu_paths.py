"""The GPU and MPS paths, seen from the CPU: the device index, the copies to the device,
attacks under fp16 autocast, the waits for the GPU in a training step and the peak memory
reported. CUDA and MPS are mocked; what runs, runs on the CPU."""
import argparse
import traceback
from types import SimpleNamespace

import pytest
import torch

from conftest import FAST, run_main
from toolkit import attack_eval
from toolkit import loaders
from toolkit import speed
import student_code
import utils


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, as far as select_device can tell; the devices
    made current are recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', current.append)
    return current


def test_the_gpu_index_is_checked_and_made_current(two_gpus):
    assert utils.select_device('auto', gpu=1) == torch.device('cuda', 1)
    assert utils.select_device('cuda') == torch.device('cuda', 0)
    assert utils.select_device('cuda:1') == torch.device('cuda', 1)
    assert two_gpus == [torch.device('cuda', 1), torch.device('cuda', 0), torch.device('cuda', 1)]
    for device, gpu in (('auto', 2), ('cuda:5', 0)):
        with pytest.raises(utils.UsageError, match='has 2 CUDA device.s., numbered 0 to 1'):
            utils.select_device(device, gpu=gpu)


def test_a_bad_gpu_index_is_one_line_from_main(two_gpus, demo, tmp_path, capsys):
    code, out, err = run_main([demo, '--log-dir', str(tmp_path), '--gpu', '7', '--device',
                               'auto'], capsys)
    assert code == 1 and err.count('\n') == 1 and 'numbered 0 to 1' in err, err
    assert not list(tmp_path.iterdir())


class Recorder(object):
    """Stands for a batch tensor: records how it is copied to a device."""
    dtype = torch.float32

    def __init__(self, log):
        self.log = log

    def to(self, device, non_blocking=False):
        self.log.append((device.type, non_blocking))
        return self

    def contiguous(self, memory_format=None):
        return self


@pytest.mark.parametrize('device, non_blocking', [('cuda', True), ('mps', False),
                                                  ('cpu', False)])
def test_batches_are_copied_asynchronously_only_from_cudas_pinned_memory(device, non_blocking):
    """MPS reads an asynchronous copy from pageable memory after the source may be freed
    (corrupted values); CUDA copies from the workers' pinned memory."""
    log = []
    batches = [(Recorder(log), Recorder(log))]
    list(loaders.OnDevice(batches, torch.device(device), None, torch.contiguous_format))
    assert log == [(device, non_blocking)] * 2


def test_attacks_under_fp16_amp_take_their_gradients_in_float32(demo, capsys):
    """Under fp16 autocast the input gradients of an unscaled loss underflow to 0 and PGD
    weakens; the attack's passes then run in float32, under bf16 in bf16."""
    seen = []

    class Spy(object):
        num_steps, step_size, epsilon = 1, 0.01, 0.03

        def perturb(self, model, input):
            seen.append(torch.is_autocast_enabled('cpu'))
            return input
    model = student_code.cnn_models['simplenet'](num_classes=4).eval()
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]
    for dtype in ('float16', 'bfloat16'):
        args = argparse.Namespace(amp=True, amp_dtype=dtype, print_freq=10, vis=False)
        attack_eval.attack_validate(batches, model, Spy(), args, torch.device('cpu'), None)
    assert seen == [False, True]
    with speed.gradient_autocast(argparse.Namespace(amp=False, amp_dtype=None), 'cpu'):
        assert not torch.is_autocast_enabled('cpu')


def test_a_training_step_waits_for_the_device_once(demo, tmp_path, capsys, monkeypatch):
    """loss.item() (the divergence check) is the one wait of a step: the accuracies are
    read at print time, all at once."""
    calls = []
    item = torch.Tensor.item

    def counted(self):  # the driver's calls (the DataLoader draws its seeds with .item())
        if traceback.extract_stack()[-2].filename.endswith('main.py'):
            calls.append(1)
        return item(self)
    monkeypatch.setattr(torch.Tensor, 'item', counted)
    argv = [demo, '--log-dir', str(tmp_path)] + FAST + ['--epochs', '1', '--warmup', '0',
                                                        '-p', '1000']
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    steps = 24 // 8                  # the demo set's 24 training images at -b 8
    validation = 3                   # one batch: loss, top-1, top-5
    assert len(calls) == steps + validation, len(calls)


def test_the_peak_memory_reported_leaves_out_a_cache_held_on_the_gpu():
    images = torch.zeros(5, 8, 8, 3, dtype=torch.uint8)
    on_gpu = loaders.OnDevice(SimpleNamespace(images=images), torch.device('cpu'), None,
                              torch.contiguous_format)
    per_image = loaders.OnDevice([], torch.device('cpu'), None, torch.contiguous_format)
    assert on_gpu.device_bytes == 5 * 8 * 8 * 3 and per_image.device_bytes == 0


def test_a_cache_that_does_not_fit_in_gpu_memory_stays_in_host_memory(demo, monkeypatch,
                                                                       capsys):
    """Too little free GPU memory for the decoded cache: the loader says so and takes the
    CPU's cached path (DataLoader workers), and the run goes on."""
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (1 << 30, 80 << 30))
    # OnDevice would put its normalization constants on the (absent) GPU
    monkeypatch.setattr(loaders, 'OnDevice', lambda loader, *rest: SimpleNamespace(
        loader=loader, device_bytes=0))
    from toolkit.run_plan import plan_from_argv
    plan, datasets = plan_from_argv([demo, '-j', '0', '-b', '1', '--no-channels-last',
                                     '--seed', '0'], torch.device('cpu'))
    loader = loaders.cached_loader(plan, torch.device('cuda', 0), datasets['val'],
                                   student_code.get_val_transforms(), batch_size=4)
    assert isinstance(loader.loader, torch.utils.data.DataLoader) and loader.device_bytes == 0
    out = capsys.readouterr().out
    assert 'note: the data cache needs' in out and 'the val cache stays in host memory' in out
