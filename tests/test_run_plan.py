"""The run plan: resolved once (flags, checkpoint, data, device), then read-only."""
import argparse
import json
import os

import pytest
import torch

import main as driver
from toolkit import run_plan
from conftest import FAST, checkpoint_of, only_run, run_main


def test_a_frozen_plan_refuses_every_change_and_keeps_its_fields():
    args = argparse.Namespace(lr=0.1, arch='resnet10')
    plan = run_plan.freeze(args)
    with pytest.raises(AttributeError, match="'lr' cannot be changed"):
        plan.lr = 0.2
    with pytest.raises(AttributeError, match="'arch' cannot be changed"):
        del plan.arch
    assert vars(plan) == {'lr': 0.1, 'arch': 'resnet10'} and plan.lr == 0.1
    args.lr = 0.3                                  # the plan is a copy
    assert plan.lr == 0.1


@pytest.mark.slow
def test_training_resuming_and_evaluating_read_a_frozen_plan(demo, tmp_path, capsys,
                                                             monkeypatch):
    """Every run below builds its loaders, model, run folder and epochs from the frozen
    plan: a write after it would raise. The plan holds what the checkpoint stores."""
    plans = []
    real_freeze = run_plan.freeze

    def spy(args):
        plans.append(real_freeze(args))
        return plans[-1]
    monkeypatch.setattr(driver, 'freeze', spy)
    logs = tmp_path / 'logs'
    code, _, err = run_main([demo, '--log-dir', str(logs), '--epochs', '2', '--stop-after',
                             '1'] + FAST, capsys)
    assert code == 0, err
    run = only_run(str(logs))
    for extra in ([], ['-e'], ['-a', '--attack-steps', '1']):
        code, _, err = run_main([demo, '--resume', checkpoint_of(run), '-j', '0', '--log-dir',
                                 str(tmp_path / 'more')] + extra, capsys)
        assert code == 0, err
    assert len(plans) == 4 and all(isinstance(p, run_plan.RunPlan) for p in plans)
    saved = torch.load(checkpoint_of(run), weights_only=True)['args']
    assert saved == vars(plans[1])                 # the resumed run's plan, as stored
    with open(os.path.join(run, 'summary.json')) as f:
        assert json.load(f)['args']['lr'] == plans[0].lr == plans[1].lr


def test_a_runs_summary_and_epochs_hold_exactly_the_documented_keys(trained_run):
    """run_record's SUMMARY_KEYS and EPOCH_KEYS are the schema report.py and the tests
    read: a summary.json of a trained run holds those keys and no others."""
    from toolkit import run_record as rr
    with open(os.path.join(trained_run, 'summary.json')) as f:
        summary = json.load(f)
    assert set(summary) - set(rr.RESULT_KEYS) == set(rr.SUMMARY_KEYS) - set(rr.RESULT_KEYS)
    assert all(set(epoch) == set(rr.EPOCH_KEYS) for epoch in summary['epochs'])
