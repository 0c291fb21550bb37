"""Part III: PGD attack, adversarial training batches, saliency maps, visualizations.

References are independent of student_code: a PGD written by hand with the
analytic gradient of a linear model, saliency computed image by image with
.backward(), and tiny CNNs trained here on synthetic tasks (a few seconds).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import student_code as sc
from benchmarks.bench_timing import SavedForBackwardMeter

K, C, H = 4, 3, 16          # classes, channels, image size of the synthetic tasks


# tiny tensors: threads only add overhead (and the test machine is shared)
pytestmark = pytest.mark.usefixtures('one_thread')


# ---------------------------------------------------------------- synthetic tasks
def template_data(n, seed, amp=1.2):
    """Each class is a fixed random pattern plus unit Gaussian noise everywhere."""
    templates = torch.randn(K, C, H, H, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    return amp * templates[y] + torch.randn(n, C, H, H, generator=g), y


def region_data(n, seed, amp=1.5):
    """Only the 4x4 patch at rows 2:6, columns 9:13 carries the label."""
    patches = torch.randn(K, C, 4, 4, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    x = torch.randn(n, C, H, H, generator=g)
    x[:, :, 2:6, 9:13] += amp * patches[y]
    return x, y


def tiny_cnn():
    # BatchNorm on purpose: attacks must not touch its running statistics
    return nn.Sequential(
        nn.Conv2d(C, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, K))


def train(model, x, y, epochs, attacker=None, batch=64):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            xb, yb = x[perm[i:i + batch]], y[perm[i:i + batch]]
            if attacker is not None:
                xb = sc.adversarial_training_batch(model, attacker, xb, ratio=0.5)
                assert model.training, "adversarial_training_batch must restore train mode"
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y = template_data(512, seed=1)
    return train(tiny_cnn(), x, y, epochs=5)


@pytest.fixture(scope="module")
def test_set():
    return template_data(200, seed=2)


# ---------------------------------------------------------------- PGD: exact behaviour
def test_pgd_matches_hand_written_reference_on_linear_model():
    torch.manual_seed(0)
    n, d = 8, C * H * H
    W, b = torch.randn(d, K, dtype=torch.float64) * 0.05, torch.randn(K, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, K)).double()
    with torch.no_grad():
        model[1].weight.copy_(W.t())
        model[1].bias.copy_(b)
    # real images: pixels in [0, 1], normalized as the data loader does
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, C, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, C, 1, 1)
    x = (torch.rand(n, C, H, H, dtype=torch.float64) - mean) / std
    eps, step, steps = 0.1, 0.03, 10          # 10 x 0.03 > 0.1: the projection is active

    # reference: targeted PGD with the analytic gradient of the mean cross-entropy,
    # d/dx CE(xW + b, t) = (softmax(xW + b) - onehot(t)) W^T / n
    target = (x.flatten(1) @ W + b).argmin(1)   # least confident label, chosen once
    ref = x.clone()
    for _ in range(steps):
        p = torch.softmax(ref.flatten(1) @ W + b, dim=1)
        grad = ((p - F.one_hot(target, K)) @ W.t() / n).view_as(x)
        ref = ref - step * grad.sign()                       # descend the target's loss
        ref = torch.max(torch.min(ref, x + eps), x - eps)    # project around the ORIGINAL x
        ref = torch.max(torch.min(ref, (1 - mean) / std), -mean / std)  # pixels in [0, 1]

    adv = sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=steps, step_size=step,
                       epsilon=eps).perturb(model, x)
    assert torch.allclose(adv, ref, atol=1e-12, rtol=0)
    assert (adv - x).abs().max() > eps - 1e-9               # it did use the whole budget


def test_pgd_guarantees_on_a_trained_batchnorm_model(trained, test_set):
    model = copy.deepcopy(trained).train()
    model[1].eval()                          # a module the caller froze: must stay frozen
    x = test_set[0][:32]
    x_copy = x.clone()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    eps = 0.1
    attack = sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=5, step_size=0.04, epsilon=eps)
    with torch.no_grad():                    # as in a validation loop
        adv = attack.perturb(model, x)

    assert (adv - x).abs().max().item() <= eps + 1e-6
    assert torch.equal(x, x_copy), "the input tensor was modified"
    assert adv.data_ptr() != x.data_ptr()
    assert adv.grad_fn is None and not adv.requires_grad
    assert adv.dtype == x.dtype and adv.device == x.device and adv.shape == x.shape
    assert all(p.grad is None for p in model.parameters()), "parameter .grad was written"
    assert model.training and not model[1].training and model[4].training
    for k, v in model.state_dict().items():  # BatchNorm statistics untouched: eval mode
        assert torch.equal(v, buffers[k]), k


def test_pgd_leaves_existing_parameter_gradients_alone(trained, test_set):
    model = copy.deepcopy(trained)
    x, y = test_set[0][:16], test_set[1][:16]
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=3).perturb(model, x)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_pgd_graph_does_not_grow_with_steps(trained, test_set):
    x = test_set[0][:16]
    peaks = []
    for steps in (1, 8):
        with SavedForBackwardMeter() as meter:
            adv = sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=steps).perturb(trained, x)
        assert meter.live_bytes == 0, "autograd still holds tensors after perturb returned"
        peaks.append(meter.peak_bytes)
    assert peaks[0] > 0 and peaks[0] == peaks[1], peaks
    assert adv.grad_fn is None


def test_pgd_zero_steps_or_zero_epsilon_return_a_copy_of_the_input(trained, test_set):
    x = test_set[0][:4]
    for attack in (sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=0),
                   sc.PGDAttack(nn.CrossEntropyLoss(), epsilon=0.0)):
        adv = attack.perturb(trained, x)
        assert torch.equal(adv, x) and adv.data_ptr() != x.data_ptr()


def test_pgd_keeps_dtype(trained, test_set):
    model = copy.deepcopy(trained).double()
    x = test_set[0][:4].double()
    adv = sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=2).perturb(model, x)
    assert adv.dtype == torch.float64 and (adv - x).abs().max() <= 0.1 + 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_pgd_on_cuda(trained, test_set):
    model, x = copy.deepcopy(trained).cuda(), test_set[0][:8].cuda()
    adv = sc.PGDAttack(nn.CrossEntropyLoss()).perturb(model, x)
    assert adv.device == x.device and (adv - x).abs().max().item() <= 0.1 + 1e-6


@pytest.mark.parametrize("kwargs, word", [
    (dict(epsilon=-0.1), "epsilon"), (dict(step_size=-0.01), "step_size"),
    (dict(num_steps=-1), "num_steps"), (dict(num_steps=2.5), "num_steps"),
    (dict(epsilon=float("nan")), "epsilon")])
def test_pgd_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        sc.PGDAttack(nn.CrossEntropyLoss(), **kwargs)
    with pytest.raises(ValueError, match=word):
        sc.UntargetedPGDAttack(nn.CrossEntropyLoss(), **kwargs)


def test_pgd_rejects_integer_images(trained):
    with pytest.raises(ValueError, match="floating point"):
        sc.PGDAttack(nn.CrossEntropyLoss()).perturb(trained, torch.zeros(2, C, H, H, dtype=torch.uint8))


# ---------------------------------------------------------------- PGD: does it attack?
def test_pgd_reaches_least_confident_label_and_drops_accuracy(trained, test_set):
    x, y = test_set
    with torch.no_grad():
        clean_logits = trained(x)
    least = clean_logits.argmin(1)
    eps = 0.3
    adv = sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=10, step_size=eps / 10,
                       epsilon=eps).perturb(trained, x)
    with torch.no_grad():
        adv_logits = trained(adv)
    clean_acc = (clean_logits.argmax(1) == y).float().mean().item()
    adv_acc = (adv_logits.argmax(1) == y).float().mean().item()
    reached = (adv_logits.argmax(1) == least).float().mean().item()
    assert clean_acc >= 0.9, clean_acc
    assert reached >= 0.8, reached
    assert adv_acc <= 0.2, (clean_acc, adv_acc)
    # targeted: the loss of the chosen label went down (a sign error makes it go up)
    before = F.cross_entropy(clean_logits, least, reduction='none')
    after = F.cross_entropy(adv_logits, least, reduction='none')
    assert (after < before).float().mean().item() >= 0.95


def test_untargeted_pgd_stays_in_the_ball_and_drops_accuracy(trained, test_set):
    x, y = test_set
    eps = 0.3
    attack = sc.UntargetedPGDAttack(nn.CrossEntropyLoss(), num_steps=5, epsilon=eps)
    assert attack.step_size == pytest.approx(2.5 * eps / 5)
    adv = attack.perturb(trained, x)
    assert (adv - x).abs().max().item() <= eps + 1e-6
    assert accuracy(trained, adv, y) <= 0.2


# ---------------------------------------------------------------- adversarial training
def test_adversarial_training_batch_replaces_the_first_fraction(trained, test_set):
    model = copy.deepcopy(trained).train()
    x = test_set[0][:10]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    attack = sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=2, step_size=0.05)
    mixed = sc.adversarial_training_batch(model, attack, x, ratio=0.5)
    assert mixed.shape == x.shape and model.training
    changed = (mixed != x).flatten(1).any(1)
    assert changed[:5].all() and not changed[5:].any()
    assert (mixed - x).abs().max() <= 0.1 + 1e-6
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    assert torch.equal(sc.adversarial_training_batch(model, attack, x, ratio=0.0), x)
    assert (sc.adversarial_training_batch(model, attack, x, ratio=1.0) != x).flatten(1).any(1).all()
    with pytest.raises(ValueError, match="ratio"):
        sc.adversarial_training_batch(model, attack, x, ratio=1.5)


def test_adversarial_training_raises_accuracy_under_attack(test_set):
    x, y = template_data(512, seed=1)
    eps = 0.2
    evaluation = sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=10, step_size=eps / 10, epsilon=eps)
    robust_acc = {}
    for name, attacker in [("standard", None),
                           ("adversarial", sc.UntargetedPGDAttack(nn.CrossEntropyLoss(),
                                                                  num_steps=3, epsilon=eps))]:
        torch.manual_seed(0)
        model = train(tiny_cnn(), x, y, epochs=5, attacker=attacker)   # equal epochs
        assert accuracy(model, *test_set) >= 0.75, name
        robust_acc[name] = accuracy(model, evaluation.perturb(model, test_set[0]), test_set[1])
    assert robust_acc["adversarial"] >= robust_acc["standard"] + 0.15, robust_acc


# ---------------------------------------------------------------- saliency
def test_saliency_matches_per_image_backward_reference(trained, test_set):
    model = copy.deepcopy(trained).train()
    x = test_set[0][:6]
    x_copy = x.clone()
    saliency = sc.GradAttention(nn.CrossEntropyLoss()).explain(model, x)
    assert saliency.shape == (6, 1, H, H) and saliency.grad_fn is None
    assert torch.equal(x, x_copy) and x.grad is None
    assert all(p.grad is None for p in model.parameters()) and model.training

    reference = copy.deepcopy(trained).eval()
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        scores = reference(xi)
        scores[0, scores.argmax()].backward()
        s = xi.grad.abs().max(dim=1)[0]
        assert torch.allclose(saliency[i, 0], s[0] / s.max(), atol=1e-6)
    assert torch.allclose(saliency.flatten(1).max(1)[0], torch.ones(6))
    assert saliency.min() >= 0


def test_saliency_is_high_where_the_label_is():
    x, y = region_data(512, seed=1)
    torch.manual_seed(0)
    # no global pooling: the model can tell where a pattern is
    model = train(nn.Sequential(nn.Conv2d(C, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Flatten(), nn.Linear(8 * 8 * 8, K)), x, y, epochs=5)
    x_test, y_test = region_data(100, seed=2)
    assert accuracy(model, x_test, y_test) >= 0.9
    saliency = sc.GradAttention(nn.CrossEntropyLoss()).explain(model, x_test)[:, 0]
    region = torch.zeros(H, H, dtype=torch.bool)
    region[2:6, 9:13] = True
    ratio = saliency[:, region].mean(1) / saliency[:, ~region].mean(1)
    assert (ratio > 2).float().mean().item() >= 0.9, ratio.median()


def test_saliency_rejects_non_image_input(trained):
    with pytest.raises(ValueError, match="N x C x H x W"):
        sc.GradAttention(None).explain(trained, torch.zeros(C, H, H))


# ---------------------------------------------------------------- visualizations
def _is_image(t):
    return t.dim() == 3 and t.size(0) == 3 and t.is_floating_point() \
        and t.min() >= 0 and t.max() <= 1


def test_vis_functions_return_rgb_grids_in_unit_range(trained, test_set):
    x = test_set[0][:12]
    saliency = sc.GradAttention(None).explain(trained, x)
    adv = sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=3).perturb(trained, x)
    pad = 2                                  # make_grid's default padding
    grid = sc.vis_grid(x, n_rows=4)
    assert _is_image(grid) and grid.shape == (3, 3 * (H + pad) + pad, 4 * (H + pad) + pad)
    overlay = sc.vis_saliency(x, saliency, n_rows=4)
    assert _is_image(overlay) and overlay.shape == grid.shape
    pert = sc.vis_perturbation(adv, x, n_rows=4, epsilon=0.1)
    assert _is_image(pert) and pert.shape == grid.shape
    # no change -> grey, +epsilon -> 1, -epsilon -> 0
    flat = sc.vis_perturbation(x + torch.tensor([0.1, 0.0, -0.1]).view(1, 3, 1, 1), x, epsilon=0.1)
    inner = flat[:, pad:pad + H, pad:pad + H]
    assert torch.allclose(inner, torch.tensor([1.0, 0.5, 0.0]).view(3, 1, 1).expand_as(inner), atol=1e-5)
    with pytest.raises(ValueError, match="maps"):
        sc.vis_saliency(x, saliency[:3])


def test_vis_grids_land_in_tensorboard_event_files(tmp_path, trained, test_set):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    x = test_set[0][:4]
    adv = sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=2).perturb(trained, x)
    writer = SummaryWriter(str(tmp_path))
    writer.add_image('Image/Org_Image', sc.vis_grid(x), 0)
    writer.add_image('Image/Adv_Image', sc.vis_grid(adv), 0)
    writer.add_image('Image/Perturbation', sc.vis_perturbation(adv, x, epsilon=0.1), 0)
    writer.add_image('Image/Saliency', sc.vis_saliency(x, sc.GradAttention(None).explain(trained, x)), 0)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()['images']) == {'Image/Org_Image', 'Image/Adv_Image',
                                            'Image/Perturbation', 'Image/Saliency'}


# ------------------------------------------------------- adversarial images are images
@pytest.mark.parametrize("attack", [
    sc.PGDAttack(nn.CrossEntropyLoss(), num_steps=20, step_size=0.1, epsilon=1.0),
    sc.UntargetedPGDAttack(nn.CrossEntropyLoss(), num_steps=20, epsilon=1.0),
    sc.PGDAttack(nn.CrossEntropyLoss()),                     # the handout's defaults
], ids=["targeted-eps1", "untargeted-eps1", "targeted-default"])
def test_pgd_samples_are_valid_images_within_epsilon(trained, attack):
    """Un-normalized with get_val_transforms()'s mean and std, every adversarial pixel
    lies in [0, 1] (an image one can save), and within epsilon of the input, also at
    an epsilon (1.0 ~ 58 grey levels) where an unclipped attack leaves the range."""
    norm = [t for t in sc.get_val_transforms().transforms
            if isinstance(t, sc.transforms.Normalize)][0]
    mean = torch.tensor(norm.mean).view(1, C, 1, 1)
    std = torch.tensor(norm.std).view(1, C, 1, 1)
    torch.manual_seed(3)
    pixels = torch.rand(32, C, H, H)
    pixels[:, :, :4] = 0.0                   # saturated regions: any step outward leaves
    pixels[:, :, -4:] = 1.0                  # the range unless it is clipped
    x = (pixels - mean) / std
    adv = attack.perturb(trained, x)
    adv_pixels = adv * std + mean
    assert adv_pixels.min() >= -1e-6 and adv_pixels.max() <= 1 + 1e-6
    assert (adv - x).abs().max() <= attack.epsilon + 1e-6
    assert (adv - x).abs().max() > 0.5 * attack.epsilon     # it did move
    mixed = sc.adversarial_training_batch(trained, attack, x, ratio=0.5)
    mixed_pixels = mixed * std + mean
    assert mixed_pixels.min() >= -1e-6 and mixed_pixels.max() <= 1 + 1e-6
