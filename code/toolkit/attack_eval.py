"""Part III in the driver: -a attacks a trained model with the handout's PGD and reports
clean and adversarial accuracy side by side (AttackMeters), -e -v writes saliency maps.
The attacks and explanations themselves are student_code's (PGDAttack, GradAttention)."""
import time

import torch

from toolkit import distributed
import student_code
from toolkit.speed import autocast, gradient_autocast
from utils import AverageMeter, ProgressMeter, accuracy, predict_with_flip

def build_attacker(criterion, args):
    """The handout's PGD with its defaults, overridden by --attack-* flags."""
    overrides = {'num_steps': args.attack_steps, 'step_size': args.attack_step_size,
                 'epsilon': args.attack_eps}
    return student_code.default_attack(criterion, **{k: v for k, v in overrides.items()
                                                     if v is not None})


class AttackMeters(object):
    """Running accuracies of one attack: clean and adversarial, with and without the
    flip test-time augmentation, the success rate and the target-hit rate."""

    KEYS = ('clean_top1', 'clean_top5', 'adv_top1', 'adv_top5',
            'clean_top1_noflip', 'clean_top5_noflip', 'adv_top1_noflip', 'adv_top5_noflip')

    def __init__(self):
        self.acc = {key: AverageMeter(key, ':.2f') for key in self.KEYS}
        self.correct = self.fooled = self.hit = 0

    def update(self, target, clean_logits, clean_flip, adv_logits, adv_flip, target_labels):
        n = target.size(0)
        for (key1, key5), logits in ((('clean_top1', 'clean_top5'), clean_flip),
                                     (('adv_top1', 'adv_top5'), adv_flip),
                                     (('clean_top1_noflip', 'clean_top5_noflip'), clean_logits),
                                     (('adv_top1_noflip', 'adv_top5_noflip'), adv_logits)):
            acc1, acc5 = accuracy(logits, target, (1, 5))
            self.acc[key1].update(acc1.item(), n)
            self.acc[key5].update(acc5.item(), n)
        correct = clean_flip.argmax(1) == target
        self.correct += correct.sum().item()
        self.fooled += (correct & (adv_flip.argmax(1) != target)).sum().item()
        self.hit += (adv_logits.argmax(1) == target_labels).sum().item()

    def reduce(self):
        """Sum the counts of all processes (each attacked its share of the images)."""
        distributed.reduce_meters(list(self.acc.values()))
        self.correct, self.fooled, self.hit = (int(x) for x in distributed.reduce_sums(
            [self.correct, self.fooled, self.hit]))

    def result(self):
        n = max(self.acc['clean_top1'].count, 1)
        result = {key: meter.avg for key, meter in self.acc.items()}
        result['success_rate'] = 100.0 * self.fooled / max(self.correct, 1)
        result['target_hit_rate'] = 100.0 * self.hit / n
        return result


def attack_validate(val_loader, model, attacker, args, device, writer):
    """Accuracy on clean and on adversarial validation images, side by side."""
    meters = AttackMeters()
    progress = ProgressMeter(len(val_loader), [meters.acc[k] for k in (
        'clean_top1', 'adv_top1', 'clean_top5', 'adv_top5')], prefix='Attack: ')
    model.eval()
    start = time.time()
    for i, (input, target) in enumerate(val_loader):  # on the device (OnDevice)
        with autocast(args, device), torch.no_grad():
            clean_logits, clean_flip = predict_with_flip(model, input)
        with gradient_autocast(args, device):  # PGD's input gradient stays float32 (a leaf)
            adv_input = attacker.perturb(model, input)
        with autocast(args, device), torch.no_grad():
            adv_logits, adv_flip = predict_with_flip(model, adv_input)
        meters.update(target, clean_logits, clean_flip, adv_logits, adv_flip,
                      student_code.least_confident_labels(clean_logits))
        if i % args.print_freq == 0:
            print(progress.line(i), flush=True)
            if args.vis:
                log_attack_images(writer, i, input, adv_input, attacker.epsilon)
    meters.reduce()
    result = dict(meters.result(), num_steps=attacker.num_steps, step_size=attacker.step_size,
                  epsilon=attacker.epsilon, time_s=time.time() - start)
    print_attack_result(result)
    return result


def log_attack_images(writer, step, input, adv_input, epsilon):
    writer.add_image('Image/Org_Image', student_code.default_visfunction(input), step)
    writer.add_image('Image/Adv_Image', student_code.default_visfunction(adv_input), step)
    writer.add_image('Image/Perturbation', student_code.vis_perturbation(
        adv_input, input, epsilon=epsilon), step)


def print_attack_result(result):
    rows = [(f'Acc@{k} {label}', result[f'clean_top{k}{suffix}'],
             result[f'adv_top{k}{suffix}'])
            for label, suffix in (('with flip (handout)', ''), ('without flip', '_noflip'))
            for k in (1, 5)]
    width = max(len(label) for label, _, _ in rows)  # the labels' column fits the longest
    print(f"\n{'':<{width}}{'clean':>10}{'adversarial':>14}")
    for label, clean, adversarial in rows:
        print(f"{label:<{width}}{clean:>10.2f}{adversarial:>14.2f}")
    print(f"PGD: {result['num_steps']} steps of {result['step_size']} within epsilon "
          f"{result['epsilon']} (normalized units, images kept in the valid pixel range); "
          f"attack success rate {result['success_rate']:.2f}% of correctly classified "
          f"images; least-confident label reached for {result['target_hit_rate']:.2f}%")
    print(f"******Acc@1 {result['adv_top1']:.3f} Acc@5 {result['adv_top5']:.3f}", flush=True)


def log_saliency(val_loader, model, criterion, args, device, writer):
    """Saliency maps (Simonyan et al. 2014) of every print_freq-th batch to TensorBoard."""
    explainer = student_code.default_attention(criterion)
    model.eval()
    for i, (input, _) in enumerate(val_loader):
        if i % args.print_freq:  # one batch in print_freq, like the attack's images
            continue
        with gradient_autocast(args, device):  # the input's gradient is float32
            saliency = explainer.explain(model, input)
        writer.add_image('Image/Org_Image', student_code.default_visfunction(input), i)
        writer.add_image('Image/Saliency', student_code.vis_grid(saliency), i)
        writer.add_image('Image/Saliency_Overlay', student_code.vis_saliency(input, saliency), i)
    print(f'saliency maps written to TensorBoard ({writer.log_dir})')
