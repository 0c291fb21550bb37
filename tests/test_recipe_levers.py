"""The recipe's levers beyond the handout: label smoothing and a moving average of the
weights (--ema). Each is a row of settings.py: kept by a resume, exact across one, and
said by -e/-a."""
import json
import os

import pytest
import torch

from conftest import FAST, checkpoint_of, expect_error, only_run, run_main

pytestmark = pytest.mark.usefixtures('one_thread')


def train(demo, logs, capsys, *flags, epochs=2, stop_after=None):
    argv = [demo, '--log-dir', str(logs), '--epochs', str(epochs)] + FAST + list(flags)
    if stop_after:
        argv += ['--stop-after', str(stop_after)]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    return only_run(str(logs)), out


def test_label_smoothing_reaches_the_training_loss_only(demo, tmp_path, capsys, monkeypatch):
    made = []
    real = torch.nn.CrossEntropyLoss

    def spy(*args, **kwargs):
        made.append(kwargs.get('label_smoothing', 0.0))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.nn, 'CrossEntropyLoss', spy)
    run, out = train(demo, tmp_path, capsys, '--label-smoothing', '0.1', '--warmup', '0',
                     epochs=1)
    assert 'label-smoothing 0.1 (flag)' in out
    assert made[0] == 0.1 and set(made[1:]) == {0.0}   # training; then validation's, plain
    with open(os.path.join(run, 'summary.json')) as f:
        assert json.load(f)['args']['label_smoothing'] == 0.1


@pytest.mark.parametrize('flag', ['--label-smoothing', '--ema'])
def test_a_lever_outside_its_range_is_one_line(demo, tmp_path, capsys, flag):
    expect_error([demo, '--log-dir', str(tmp_path), flag, '1.0'] + FAST, capsys,
                 f'{flag} must be in [0, 1), got 1.0')


def weights_of(path, key):
    return torch.load(path, weights_only=True)[key]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_the_moving_average_resumes_exactly_and_is_what_is_validated(demo, tmp_path, capsys):
    """--ema 0.5: a run stopped after epoch 1 and resumed ends with the weights and the
    moving average of an uninterrupted run; model_best.pth.tar holds the average (not the
    raw weights), and -e of it gives the top-1 the run recorded for its best epoch."""
    flags = ('--ema', '0.5', '--no-amp')
    whole, out = train(demo, tmp_path / 'whole', capsys, *flags)
    assert 'ema 0.5 (flag)' in out
    parts, _ = train(demo, tmp_path / 'parts', capsys, *flags, stop_after=1)
    code, out, err = run_main([demo, '--resume', checkpoint_of(parts), '-j', '0'], capsys)
    assert code == 0 and 'ema 0.5 (checkpoint)' in out, err
    for key in ('state_dict', 'ema_state_dict'):
        assert_same(weights_of(checkpoint_of(whole), key), weights_of(checkpoint_of(parts), key))
    raw = weights_of(checkpoint_of(whole), 'state_dict')
    ema = weights_of(checkpoint_of(whole), 'ema_state_dict')
    best = weights_of(checkpoint_of(whole, 'model_best.pth.tar'), 'state_dict')
    assert any(not torch.equal(raw[k], ema['module.' + k]) for k in raw if raw[k].is_floating_point())
    summary = json.load(open(os.path.join(whole, 'summary.json')))
    if summary['best_epoch'] == 2:
        assert_same(best, {k: ema['module.' + k] for k in raw})
    code, out, err = run_main([demo, '--resume', checkpoint_of(whole, 'model_best.pth.tar'),
                               '-e', '-j', '0', '--log-dir', str(tmp_path / 'eval')], capsys)
    assert code == 0 and 'the moving average of --ema 0.5' in out, err
    evaluated = json.load(open(os.path.join(only_run(str(tmp_path / 'eval')), 'summary.json')))
    assert evaluated['evaluation']['top1'] == pytest.approx(summary['best_acc1'])


def test_progressive_resizing_grows_to_the_full_size_by_the_last_epoch():
    from types import SimpleNamespace
    from toolkit.loaders import train_size
    plan = SimpleNamespace(min_train_size=48, epochs=4, image_size=0)
    assert [train_size(plan, epoch, 128) for epoch in range(4)] == [48, 72, 104, 128]
    plan = SimpleNamespace(min_train_size=32, epochs=3, image_size=64)
    assert [train_size(plan, epoch, 128) for epoch in range(3)] == [32, 48, 64]
    assert train_size(SimpleNamespace(min_train_size=0, epochs=4, image_size=0), 0, 128) is None
    assert train_size(SimpleNamespace(min_train_size=48, epochs=1, image_size=0), 0, 128) == 128


def test_the_loader_resizes_its_batches_to_the_epochs_size():
    from toolkit.loaders import OnDevice
    batches = [(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))]
    loader = OnDevice(batches, torch.device('cpu'), None, torch.contiguous_format)
    loader.size_for = lambda full: full // 2
    (input, target), = list(loader)
    expected = torch.nn.functional.interpolate(batches[0][0], size=(8, 8), mode='bilinear',
                                               antialias=True, align_corners=False)
    assert input.shape == (2, 3, 8, 8) and torch.equal(input, expected)
    loader.size_for = None
    assert list(loader)[0][0].shape == (2, 3, 16, 16)


def test_a_uint8_batch_is_resized_before_it_is_normalized_with_the_same_result():
    """The workers' uint8 batch, resized and normalized: as normalizing at the full size
    and resizing after (the cheaper order differs in the last bits only)."""
    from toolkit.loaders import OnDevice
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = OnDevice([(images, torch.tensor([0, 1]))], torch.device('cpu'), (mean, std),
                      torch.contiguous_format)
    loader.size_for = lambda full: full // 2
    (input, _), = list(loader)
    normalized = (images.float() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    expected = torch.nn.functional.interpolate(normalized, size=(8, 8), mode='bilinear',
                                               antialias=True, align_corners=False)
    assert input.shape == (2, 3, 8, 8)
    torch.testing.assert_close(input, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_progressively_resized_run_resumes_exactly(demo, tmp_path, capsys, monkeypatch):
    """--min-train-size 64 over 3 epochs (64, 96, then the full 128 px): the model sees
    those sizes, and a run stopped after epoch 1 and resumed ends as an uninterrupted one."""
    import main as driver
    sizes = []
    real = driver.train_one_epoch

    def spy(train_loader, *rest, **kw):
        sizes.append(next(iter(train_loader))[0].shape[-1])
        return real(train_loader, *rest, **kw)
    monkeypatch.setattr(driver, 'train_one_epoch', spy)
    flags = ('--min-train-size', '64', '--warmup', '0', '--no-amp')
    whole, out = train(demo, tmp_path / 'whole', capsys, *flags, epochs=3)
    assert sizes == [64, 96, 128] and 'min-train-size 64 (flag)' in out
    parts, _ = train(demo, tmp_path / 'parts', capsys, *flags, epochs=3, stop_after=1)
    code, out, err = run_main([demo, '--resume', checkpoint_of(parts), '-j', '0'], capsys)
    assert code == 0, err
    assert_same(weights_of(checkpoint_of(whole), 'state_dict'),
                weights_of(checkpoint_of(parts), 'state_dict'))


@pytest.mark.slow
def test_image_size_trains_validates_and_evaluates_at_that_size(demo, tmp_path, capsys,
                                                                monkeypatch):
    """--image-size 64: training and validation batches are 64 x 64, and -e of the run's
    model takes the size from its checkpoint."""
    import main as driver
    seen = []
    real = driver.validate

    def spy(val_loader, *rest, **kw):
        seen.append(next(iter(val_loader))[0].shape[-2:])
        return real(val_loader, *rest, **kw)
    monkeypatch.setattr(driver, 'validate', spy)
    run, out = train(demo, tmp_path / 'logs', capsys, '--image-size', '64', '--warmup', '0',
                     epochs=1)
    assert 'image-size 64 (flag)' in out
    code, out, err = run_main([demo, '--resume', checkpoint_of(run, 'model_best.pth.tar'),
                               '-e', '-j', '0', '--log-dir', str(tmp_path / 'eval')], capsys)
    assert code == 0 and 'image-size 64 (checkpoint)' in out, err
    assert seen == [(64, 64), (64, 64)]


def test_augment_scales_the_augmentation_of_get_train_transforms():
    import custom_transforms as T
    from toolkit.loaders import train_transforms
    shipped = {type(t): t for t in train_transforms(1.0).transforms}
    half = {type(t): t for t in train_transforms(0.5).transforms}
    assert half[T.RandomRotate].degree_range == shipped[T.RandomRotate].degree_range / 2
    assert half[T.RandomColor].color_range == shipped[T.RandomColor].color_range / 2
    low = shipped[T.RandomSizedCrop].area_range[0]
    assert half[T.RandomSizedCrop].area_range[0] == pytest.approx(1 - (1 - low) / 2)
    none = {type(t): t for t in train_transforms(0.0).transforms}
    assert none[T.RandomRotate].degree_range == 0 and none[T.RandomColor].color_range == 0
    assert none[T.RandomSizedCrop].area_range[0] == none[T.RandomSizedCrop].area_range[1]


@pytest.mark.slow
@pytest.mark.parametrize('path', ['--data-cache', '--no-data-cache'])
def test_augment_zero_trains_on_unrotated_uncoloured_whole_crops(demo, tmp_path, capsys,
                                                                 monkeypatch, path):
    """--augment 0 on either input path: the transforms the run uses have no rotation,
    no colour change and crop the whole (rescaled) image, and the fused path still serves."""
    from toolkit import fast_data, loaders
    used = []
    real = loaders.train_transforms

    def spy(strength):
        used.append(real(strength))
        return used[-1]
    monkeypatch.setattr(loaders, 'train_transforms', spy)
    run, out = train(demo, tmp_path, capsys, '--augment', '0', '--warmup', '0', path,
                     epochs=1)
    assert 'augment 0 (flag)' in out and used
    assert 'per-image path' not in out or path == '--no-data-cache', out
    for t in used[-1].transforms:
        assert getattr(t, 'degree_range', 0) == 0 and getattr(t, 'color_range', 0) == 0
    if path == '--data-cache':
        assert fast_data.fused_path_supported(used[-1])[0]


def fast_plan(data, *flags):
    from toolkit.run_plan import plan_from_argv
    return plan_from_argv([data, '--epochs', '4'] + list(flags),
                          torch.device('cpu'))[0]


def test_the_fast_recipe_fills_in_what_the_flags_leave_open(real_data, demo, capsys):
    """--recipe fast: its values (warm-up 1, label smoothing 0.1, image size 64, batch
    128, ...), each said to come from it, and the lr rule follows its batch; a flag given
    keeps its value; without --recipe the handout's values stand. A recipe's value that
    the data or the flags cannot take is refused with its source named."""
    plan = fast_plan(real_data, '--recipe', 'fast')
    from toolkit.settings import RECIPES
    assert (plan.warmup, plan.label_smoothing, plan.image_size, plan.batch_size) == \
        (1, 0.1, 64, 128)
    for dest, value in RECIPES['fast'].items():
        assert getattr(plan, dest) == value and plan.sources[dest] == 'rule: --recipe fast'
    assert plan.lr == pytest.approx(0.05) and plan.sources['lr'] == 'rule: 0.1 x 128 / 256'
    plan = fast_plan(demo, '--recipe', 'fast', '--augment', '0.8', '--warmup', '2', '-b', '8')
    assert (plan.augment, plan.warmup, plan.sources['augment']) == (0.8, 2, 'flag')
    assert (plan.batch_size, plan.sources['batch_size']) == (8, 'flag')
    assert plan.lr == pytest.approx(0.1 * 8 / 256)
    plan = fast_plan(real_data, '--epochs', '8')     # (the handout's warm-up is 5 epochs)
    assert (plan.recipe, plan.warmup, plan.augment, plan.label_smoothing, plan.image_size,
            plan.batch_size) == ('handout', 5, 1.0, 0.0, 0, 256)
    expect_error([demo, '--recipe', 'fast', '--epochs', '4'], capsys,     # 24 images
                 '--batch-size 128 (rule: --recipe fast) is larger than the training set')
    expect_error([real_data, '--recipe', 'fast', '--epochs', '1'], capsys,
                 '--warmup 1 (rule: --recipe fast) must be smaller than --epochs 1')


@pytest.mark.slow
def test_a_fast_recipe_run_resumes_exactly_and_keeps_its_recipe(demo, tmp_path, capsys):
    """A --recipe fast run stopped after epoch 1 and resumed ends with the weights of an
    uninterrupted one, its values from the checkpoint; another --recipe is refused."""
    flags = ('--recipe', 'fast', '--no-amp')
    whole, out = train(demo, tmp_path / 'whole', capsys, *flags)
    assert 'recipe fast (flag)' in out and 'image-size 64 (rule: --recipe fast)' in out
    parts, _ = train(demo, tmp_path / 'parts', capsys, *flags, stop_after=1)
    code, out, err = run_main([demo, '--resume', checkpoint_of(parts), '-j', '0'], capsys)
    assert code == 0 and 'recipe fast (checkpoint)' in out and \
        'image-size 64 (checkpoint)' in out, err
    assert_same(weights_of(checkpoint_of(whole), 'state_dict'),
                weights_of(checkpoint_of(parts), 'state_dict'))
    expect_error([demo, '--resume', checkpoint_of(parts), '--recipe', 'handout', '-j', '0'],
                 capsys, '--recipe handout differs from the run\'s fast')
