"""The settings table and the run plan: every setting declared once (settings.SETTINGS),
resolved once (run_plan.resolve) into a frozen record, from read-only flags."""
import dataclasses
import json
import os

import pytest
import torch

import main as driver
from toolkit import run_plan, settings
from conftest import FAST, checkpoint_of, expect_error, only_run, run_main


def a_plan(**values):
    fields = {f.name: None for f in dataclasses.fields(settings.RunPlan)}
    fields.update(values, sources={})
    return settings.RunPlan(**fields)


def test_a_frozen_plan_refuses_every_change_and_hands_out_copies():
    plan = a_plan(lr=0.1, arch='resnet10')
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.lr = 0.2
    with pytest.raises(dataclasses.FrozenInstanceError):
        del plan.arch
    with pytest.raises(TypeError):               # no live __dict__ to write into
        vars(plan)
    copy = plan.as_dict()
    copy['lr'] = 0.3
    assert plan.lr == 0.1 and plan.as_dict()['lr'] == 0.1


def test_the_parsed_flags_are_read_only():
    flags, given = settings.parse(driver.parser, ['DIR', '-b', '8'])
    assert flags.batch_size == 8 and given == {'data_folder', 'batch_size'}
    with pytest.raises(AttributeError, match='read-only'):
        flags.lr = 0.5


def test_every_row_is_in_the_parser_the_plan_and_the_checkpoint_check():
    dests = {action.dest for action in driver.parser._actions} - {'help'}
    rows = {s.dest for s in settings.SETTINGS}
    assert dests == rows
    assert rows <= {f.name for f in dataclasses.fields(settings.RunPlan)}
    for s in settings.SETTINGS:                   # a stored value of a wrong kind is refused
        if s.dest != 'data_folder':
            with pytest.raises(Exception, match=f"args\\['{s.dest}'\\]"):
                settings.check_stored({s.dest: object()}, 'x.pth')


@pytest.mark.parametrize('argv, words', [
    (['--seed', '1e20'], "argument --seed: invalid int value: '1e20'"),
    (['--name'], 'argument --name: expected one argument'),
    (['--epochs', 'many'], "argument --epochs: invalid int value"),
])
def test_a_bad_number_or_a_missing_value_is_one_line_naming_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        driver.main(['DIR'] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and words in err[0], err


def test_gpu_with_another_device_is_refused(demo, tmp_path, capsys):
    expect_error([demo, '--gpu', '3', '--device', 'cpu', '--log-dir', str(tmp_path)], capsys,
                 '--gpu 3 picks a CUDA device, but --device cpu')


EXTRA = settings.Setting('probe_setting', ('--probe-setting',), 'a setting added as one row',
                         int, 7, low=1, resume=settings.KEEP, evaluation=True)


@pytest.fixture
def one_more_row(monkeypatch):
    """The table with one row more, and everything made from it made again."""
    rows = settings.SETTINGS + (EXTRA,)
    monkeypatch.setattr(settings, 'SETTINGS', rows)
    monkeypatch.setattr(settings, 'BY_DEST', {s.dest: s for s in rows})
    monkeypatch.setattr(settings, 'RunPlan', settings.plan_type(rows))
    monkeypatch.setattr(driver, 'parser', settings.build_parser('main.py'))


@pytest.mark.slow
def test_a_setting_added_as_one_row_works_end_to_end(one_more_row, demo, tmp_path, capsys):
    """In --help, checked as a flag, in the plan, the summary and the checkpoint, kept by
    a resume (another value refused) and recorded by -e."""
    assert '--probe-setting' in driver.parser.format_help()
    logs = str(tmp_path / 'logs')
    expect_error([demo, '--probe-setting', '0'] + FAST, capsys, '--probe-setting must be >= 1')
    code, out, err = run_main([demo, '--log-dir', logs, '--epochs', '2', '--stop-after', '1',
                               '--probe-setting', '3'] + FAST, capsys)
    assert code == 0, err
    assert 'probe-setting 3 (flag)' in out
    run = only_run(logs)
    with open(os.path.join(run, 'summary.json')) as f:
        assert json.load(f)['args']['probe_setting'] == 3
    assert torch.load(checkpoint_of(run), weights_only=True)['args']['probe_setting'] == 3
    expect_error([demo, '--resume', checkpoint_of(run), '--probe-setting', '4'], capsys,
                 "--probe-setting 4 differs from the run's 3")
    code, out, err = run_main([demo, '--resume', checkpoint_of(run), '-j', '0'], capsys)
    assert code == 0 and 'probe-setting 3 (checkpoint)' in out, err
    code, out, err = run_main([demo, '--resume', checkpoint_of(run), '-e', '-j', '0',
                               '--log-dir', str(tmp_path / 'eval')], capsys)
    with open(os.path.join(only_run(str(tmp_path / 'eval')), 'summary.json')) as f:
        assert code == 0 and json.load(f)['args']['probe_setting'] == 3, err


@pytest.mark.slow
def test_training_resuming_and_evaluating_run_on_read_only_flags(demo, tmp_path, capsys,
                                                                 monkeypatch):
    """Every mode resolves its plan without writing into the parsed flags (a write would
    raise): train, resume, -e and -a; the checkpoint and summary hold copies of the plan."""
    plans = []
    real_resolve = run_plan.resolve

    def spy(flags, *rest):
        assert isinstance(flags, settings.Flags)
        plans.append(real_resolve(flags, *rest))
        return plans[-1]
    monkeypatch.setattr(driver, 'resolve', spy)
    logs = tmp_path / 'logs'
    code, _, err = run_main([demo, '--log-dir', str(logs), '--epochs', '2', '--stop-after',
                             '1'] + FAST, capsys)
    assert code == 0, err
    run = only_run(str(logs))
    for extra in ([], ['-e'], ['-a', '--attack-steps', '1']):
        code, _, err = run_main([demo, '--resume', checkpoint_of(run), '-j', '0', '--log-dir',
                                 str(tmp_path / 'more')] + extra, capsys)
        assert code == 0, err
    assert len(plans) == 4 and all(isinstance(p, settings.RunPlan) for p in plans)
    saved = torch.load(checkpoint_of(run), weights_only=True)['args']
    assert saved == plans[1].as_dict()             # the resumed run's plan, as stored
    with open(os.path.join(run, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['args']['lr'] == plans[0].lr == plans[1].lr
    assert summary['sources']['lr'] == 'checkpoint'


def test_the_start_line_says_what_differs_from_the_handout_and_why(demo, tmp_path, capsys):
    code, out, err = run_main([demo, '--log-dir', str(tmp_path), '--epochs', '1', '--warmup',
                               '0', '-b', '8', '-j', '0', '--seed', '3', '--arch',
                               'simplenet', '--no-data-cache'], capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith('=> settings:')]
    for part in ('batch-size 8 (flag)', 'lr 0.003125 (rule: 0.1 x 8 / 256)',
                 'clip-grad 0 (rule: CNNs train unclipped', 'num-classes 4 (data'):
        assert part in line, (part, line)
    assert 'momentum' not in line                   # the handout's value


def test_an_evaluation_summary_records_what_evaluation_used(trained_run, tmp_path, capsys):
    """Not training's defaults (epochs 90, batch 256, lr 0.1) it never used."""
    data = json.load(open(os.path.join(trained_run, 'summary.json')))['args']['data_folder']
    code, _, err = run_main([data, '--resume', checkpoint_of(trained_run, 'model_best.pth.tar'),
                             '-e', '-j', '0', '--log-dir', str(tmp_path)], capsys)
    assert code == 0, err
    with open(os.path.join(only_run(str(tmp_path)), 'summary.json')) as f:
        used = json.load(f)['args']
    assert not {'epochs', 'batch_size', 'lr', 'warmup', 'momentum'} & set(used)
    assert used['arch'] == 'simplenet' and used['num_classes'] == 4
    assert used['val_batch_size'] == 100 and used['resume'].endswith('model_best.pth.tar')


def bare_weights(tmp_path, num_classes=4):
    from student_code import cnn_models
    path = str(tmp_path / 'bare.pth')
    torch.save(cnn_models['simplenet'](num_classes=num_classes).state_dict(), path)
    return path


def stored_classes(trained_run, tmp_path, name, count):
    """A copy of the trained run's checkpoint `name` whose stored class count is `count`."""
    raw = torch.load(checkpoint_of(trained_run, name), weights_only=True)
    raw['args']['num_classes'] = count
    path = str(tmp_path / name)
    torch.save(raw, path)
    return path


HUGE = 10 ** 9


def test_a_huge_class_count_is_one_line_on_every_path(trained_run, tmp_path, capsys):
    """--num-classes 10**9 with a bare or handout checkpoint, or a checkpoint that stores
    10**9 classes, with --resume, -e and -a: refused before anything of that size is
    allocated (2 TB of classifier), naming where the count came from."""
    data = json.load(open(os.path.join(trained_run, 'summary.json')))['args']['data_folder']
    bare = bare_weights(tmp_path)
    handout = str(tmp_path / 'handout.pth')
    torch.save({'epoch': 1, 'model_arch': 'simplenet', 'best_acc1': torch.tensor(1.0),
                'state_dict': torch.load(bare, weights_only=True)}, handout)
    logs = ['--log-dir', str(tmp_path / 'logs'), '-j', '0']
    for path in (bare, handout):
        expect_error([data, '--resume', path, '--num-classes', str(HUGE), '--arch',
                      'simplenet'] + logs, capsys, f'--num-classes {HUGE} is more than the '
                     'data can support')
    best = stored_classes(trained_run, tmp_path, 'model_best.pth.tar', HUGE)
    last = stored_classes(trained_run, tmp_path / '..', 'checkpoint.pth.tar', HUGE)
    for argv in (['--resume', best, '-e'], ['--resume', best, '-a'], ['--resume', last]):
        expect_error([data] + argv + logs, capsys, f'the checkpoint gives {HUGE} classes',
                     'more than the data can support')


def test_bare_weights_count_their_classes_by_the_classifier(tmp_path):
    from student_code import cnn_models
    state = cnn_models['simplenet'](num_classes=4).state_dict()
    state['extra_buffer'] = torch.zeros(3)          # a trailing 1-d tensor is no classifier
    assert run_plan.classifier_size(state) == 4


def test_a_runs_summary_and_epochs_hold_exactly_the_documented_keys(trained_run):
    """run_record's SUMMARY_KEYS and EPOCH_KEYS are the schema report.py and the tests
    read: a summary.json of a trained run holds those keys and no others."""
    from toolkit import run_record as rr
    with open(os.path.join(trained_run, 'summary.json')) as f:
        summary = json.load(f)
    assert set(summary) - set(rr.RESULT_KEYS) == set(rr.SUMMARY_KEYS) - set(rr.RESULT_KEYS)
    assert all(set(epoch) == set(rr.EPOCH_KEYS) for epoch in summary['epochs'])


def test_evaluating_a_run_folder_records_its_best_model_in_the_run(trained_run, tmp_path,
                                                                   capsys):
    """-e given the run folder evaluates its model_best.pth.tar, records that file (not the
    folder) as the checkpoint, and adds the result to the training run's summary."""
    data = json.load(open(os.path.join(trained_run, 'summary.json')))['args']['data_folder']
    code, _, err = run_main([data, '--resume', trained_run, '-e', '-j', '0', '--log-dir',
                             str(tmp_path)], capsys)
    assert code == 0, err
    best = checkpoint_of(trained_run, 'model_best.pth.tar')
    with open(os.path.join(only_run(str(tmp_path)), 'summary.json')) as f:
        assert json.load(f)['evaluation']['checkpoint'] == os.path.abspath(best)
    with open(os.path.join(trained_run, 'summary.json')) as f:
        assert json.load(f)['evaluation']['checkpoint'] == os.path.abspath(best)


def test_the_speed_line_of_an_evaluation_offers_nothing_it_refuses(trained_run, tmp_path,
                                                                   capsys):
    """-e refuses --compile: its start line says why compiling is off, not 'ask with
    --compile'."""
    data = json.load(open(os.path.join(trained_run, 'summary.json')))['args']['data_folder']
    code, out, err = run_main([data, '--resume', checkpoint_of(trained_run, 'model_best.pth.tar'),
                               '-e', '-j', '0', '--log-dir', str(tmp_path)], capsys)
    (line,) = [line for line in out.splitlines() if line.startswith('=> speed:')]
    assert code == 0 and 'compile off (auto: -e and -a run the model eagerly)' in line, line
    assert '--compile' not in line


def test_the_notes_on_a_damaged_optimizer_state_agree(trained_run, tmp_path, capsys):
    """The handout's checkpoint with an optimizer state that fits no model: the first note
    does not promise the optimizer state that the next one says is dropped."""
    raw = torch.load(checkpoint_of(trained_run), weights_only=True)
    path = str(tmp_path / 'handout.pth.tar')
    torch.save({'epoch': 1, 'model_arch': 'simplenet', 'state_dict': raw['state_dict'],
                'best_acc1': torch.tensor(1.0),
                'optimizer': {'state': {}, 'param_groups': [{'params': [0]}]}}, path)
    data = json.load(open(os.path.join(trained_run, 'summary.json')))['args']['data_folder']
    code, out, err = run_main([data, '--resume', path, '--log-dir', str(tmp_path / 'logs'),
                               '--epochs', '2', '--stop-after', '1'] + FAST[2:], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith('note:')]
    assert any('optimizer starts afresh' in note for note in notes), notes
    assert not any('starts from its weights and optimizer state' in note for note in notes)
    assert any('where it fits the model' in note for note in notes), notes


def test_the_printed_commands_paste_with_a_space_in_the_path(demo, tmp_path, capsys):
    import shlex
    logs = str(tmp_path / 'my logs')
    code, out, err = run_main([demo, '--log-dir', logs, '--epochs', '2', '--stop-after', '1']
                              + FAST, capsys)
    assert code == 0, err
    run = only_run(logs)
    (resume,) = [line for line in out.splitlines() if '--resume=' in line]
    assert shlex.split(resume.split('continue with ', 1)[1]) == [
        '--resume=' + checkpoint_of(run)]
    (board,) = [line for line in out.splitlines() if 'tensorboard --logdir' in line]
    assert shlex.split(board.split(': ', 1)[1]) == ['tensorboard', '--logdir', run]
