"""The driver's Part III modes: -a [-v], -e -v (saliency) and --adv-train."""
import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAST, run_main


def new_run(log_dir):
    (run,) = os.listdir(log_dir)
    return os.path.join(log_dir, run)


def image_tags(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={'images': 0})
    acc.Reload()
    return set(acc.Tags()['images'])


@pytest.mark.slow
def test_attack_with_images(demo, trained_run, tmp_path, capsys):
    ckpt = os.path.join(trained_run, 'models', 'model_best.pth.tar')
    logs = str(tmp_path)
    code, out, err = run_main([demo, '--resume', ckpt, '-a', '-v', '--log-dir', logs, '-j', '0',
                               '--device', 'cpu', '-p', '1', '--attack-steps', '3'], capsys)
    assert code == 0, err
    assert 'clean' in out and 'adversarial' in out and 'success rate' in out
    closing = [line for line in out.splitlines() if line.startswith('******Acc@1')][-1]
    run = new_run(logs)
    assert run.endswith('_attack')
    summary = json.load(open(os.path.join(run, 'summary.json')))
    attack = summary['attack']
    assert attack['num_steps'] == 3 and attack['epsilon'] == pytest.approx(0.1)
    assert float(closing.split()[1]) == pytest.approx(attack['adv_top1'], abs=1e-3)
    assert attack['adv_top1'] <= attack['clean_top1']
    # the handout's tags, plus the amplified perturbation
    assert {'Image/Org_Image', 'Image/Adv_Image', 'Image/Perturbation'} <= image_tags(run)
    # the training run's summary records the attack too
    trained = json.load(open(os.path.join(trained_run, 'summary.json')))
    assert trained['attack']['adv_top1'] == pytest.approx(attack['adv_top1'])


@pytest.mark.slow
def test_evaluate_with_saliency(demo, trained_run, tmp_path, capsys):
    ckpt = os.path.join(trained_run, 'models', 'checkpoint.pth.tar')
    code, out, err = run_main([demo, '--resume', ckpt, '-e', '-v', '--log-dir', str(tmp_path),
                               '-j', '0', '--device', 'cpu'], capsys)
    assert code == 0, err
    assert '******Acc@1' in out
    tags = image_tags(new_run(str(tmp_path)))
    assert {'Image/Org_Image', 'Image/Saliency', 'Image/Saliency_Overlay'} <= tags


@pytest.mark.slow
def test_adversarial_training_runs(demo, tmp_path, capsys):
    argv = [demo, '--log-dir', str(tmp_path), '--epochs', '2', '--adv-train', '--adv-steps',
            '2', '--adv-ratio', '0.5'] + FAST
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    ckpt = torch.load(os.path.join(new_run(str(tmp_path)), 'models', 'checkpoint.pth.tar'),
                      weights_only=True)
    assert ckpt['args']['adv_train'] and ckpt['epoch'] == 2


@pytest.mark.slow
def test_attack_reports_accuracy_with_and_without_the_flip(demo, trained_run, tmp_path,
                                                           capsys):
    """The no-flip figures equal an attack run by hand on the plain logits."""
    import torch.nn as nn
    import student_code as sc
    from custom_dataloader import MiniPlacesLoader
    ckpt_path = os.path.join(trained_run, 'models', 'model_best.pth.tar')
    code, out, err = run_main([demo, '--resume', ckpt_path, '-a', '--log-dir', str(tmp_path),
                               '-j', '0', '--device', 'cpu', '--attack-eps', '0.5',
                               '--attack-step-size', '0.1'], capsys)
    assert code == 0, err
    assert 'with flip (handout)' in out and 'without flip' in out
    attack = json.load(open(os.path.join(new_run(str(tmp_path)), 'summary.json')))['attack']

    ckpt = torch.load(ckpt_path, weights_only=True)
    model = sc.SimpleNet(num_classes=4)
    model.load_state_dict(ckpt['state_dict'])
    model.eval()
    val = MiniPlacesLoader(demo, 'val', sc.get_val_transforms(), num_classes=4)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor(val.label_list)
    adv = sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=10, step_size=0.1,
                       epsilon=0.5).perturb(model, x)
    with torch.no_grad():
        clean_acc = 100.0 * (model(x).argmax(1) == y).float().mean().item()
        adv_acc = 100.0 * (model(adv).argmax(1) == y).float().mean().item()
    assert attack['clean_top1_noflip'] == pytest.approx(clean_acc, abs=1e-3)
    assert attack['adv_top1_noflip'] == pytest.approx(adv_acc, abs=1e-3)
    assert {'adv_top5_noflip', 'clean_top5_noflip', 'adv_top1', 'adv_top5'} <= set(attack)
