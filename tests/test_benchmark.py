"""benchmark.py's own tools: the saved-for-backward meter, the interleaved timer."""
import torch

from benchmark import SavedForBackwardMeter, interleaved_times


class SaveGiven(torch.autograd.Function):
    """Identity on x that saves the tensors it is given for backward (and ignores them)."""

    @staticmethod
    def forward(ctx, x, *to_save):
        ctx.save_for_backward(*to_save)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + (None,) * len(ctx.saved_tensors)


def test_meter_counts_each_storage_once_while_the_graph_lives():
    x = torch.randn(10, requires_grad=True)
    a, b = torch.randn(100), torch.randn(30, dtype=torch.float64)
    with SavedForBackwardMeter() as meter:
        # a twice, a view of a and b: two storages
        y = SaveGiven.apply(x, a, a, a[10:20], b)
        assert meter.live_bytes == 100 * 4 + 30 * 8
        del y                      # the graph goes: its saved tensors are dropped
        assert meter.live_bytes == 0
        small = SaveGiven.apply(x, torch.randn(5))
    # the peak is the most held at once, not the sum of both graphs
    assert meter.peak_bytes == 100 * 4 + 30 * 8 and meter.live_bytes == 5 * 4
    del small
    assert meter.live_bytes == 0


def test_meter_releases_after_backward():
    x = torch.randn(50, requires_grad=True)
    with SavedForBackwardMeter() as meter:
        SaveGiven.apply(x, torch.randn(50)).sum().backward()
    assert meter.peak_bytes == 50 * 4 and meter.live_bytes == 0
    assert torch.equal(x.grad, torch.ones(50))


def test_interleaved_times_alternate_the_variants_after_a_warm_up():
    calls = []
    times = interleaved_times({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
                              torch.device('cpu'), repeats=3)
    assert calls == ['a', 'b'] * 4
    assert sorted(times) == ['a', 'b'] and all(len(t) == 3 and min(t) >= 0
                                               for t in times.values())
