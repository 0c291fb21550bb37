"""Part II: attention, Transformer blocks, SimpleViT and their helper blocks.

Every check compares against something computed independently: attention written
by hand head by head, a global block run on each window separately, plain slicing,
and a model that must actually learn a task from pixels.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_blocks import (PatchEmbed, window_partition, window_unpartition, DropPath,
                           MLP, Mlp, trunc_normal_)
from student_code import Attention, TransformerBlock, SimpleViT, default_vit_model


# tiny models: one thread each (on a shared 2-core machine a second only waits)
pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_vit(**kw):
    """A ViT small enough to train in a test: 16x16 images, a 4x4 grid of tokens."""
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
               window_size=2, window_block_indexes=(0,), drop_path_rate=0.0)
    cfg.update(kw)
    return SimpleViT(**cfg)


def reference_attention(attn, x):
    """Multi-head self-attention written by hand from the module's weights:
    one head at a time, Q = X Wq^T + bq etc., S_h = softmax(Q K^T / sqrt(d)) V."""
    B, N, C = x.shape
    h = attn.num_heads
    d = C // h
    Wq, Wk, Wv = attn.qkv.weight.split(C, dim=0)
    bq, bk, bv = attn.qkv.bias.split(C, dim=0)
    Q, K, V = x @ Wq.T + bq, x @ Wk.T + bk, x @ Wv.T + bv
    heads = []
    for i in range(h):
        cols = slice(i * d, (i + 1) * d)
        scores = Q[..., cols] @ K[..., cols].transpose(1, 2) / math.sqrt(d)
        heads.append(torch.softmax(scores, dim=-1) @ V[..., cols])
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


# ----------------------------------------------------------------------------- blocks
def test_patch_embed_shape_and_patches():
    torch.manual_seed(0)
    pe = PatchEmbed(kernel_size=(4, 4), stride=(4, 4), in_chans=3, embed_dim=8)
    x = torch.randn(2, 3, 12, 16)
    out = pe(x)
    assert out.shape == (2, 3, 4, 8)                     # B x H/p x W/p x C
    # token (i, j) is the linear map of patch (i, j) alone
    patch = x[:, :, 4:8, 8:12].reshape(2, -1)
    expected = patch @ pe.proj.weight.reshape(8, -1).T + pe.proj.bias
    torch.testing.assert_close(out[:, 1, 2], expected, atol=1e-5, rtol=1e-5)


def test_patch_embed_rejects_indivisible_image():
    pe = PatchEmbed(kernel_size=16, stride=16, in_chans=3, embed_dim=8)
    with pytest.raises(ValueError, match="height 30 is not divisible by the patch size 16"):
        pe(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        pe(torch.randn(1, 1, 32, 32))


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 7, 10, 3)
    windows, (Hp, Wp) = window_partition(x, 4)
    assert (Hp, Wp) == (8, 12)
    assert windows.shape == (2 * 2 * 3, 4, 4, 3)
    # windows are taken row by row within an image, images one after another
    torch.testing.assert_close(windows[0], x[0, :4, :4])
    torch.testing.assert_close(windows[1], x[0, :4, 4:8])
    torch.testing.assert_close(windows[6], x[1, :4, :4])
    # the last window of the first image holds 3 x 2 real tokens, the rest is zero padding
    torch.testing.assert_close(windows[5, :3, :2], x[0, 4:7, 8:10])
    assert windows[5, 3:].abs().sum() == 0 and windows[5, :, 2:].abs().sum() == 0
    back = window_unpartition(windows, 4, (Hp, Wp), (7, 10))
    assert torch.equal(back, x)


def test_window_partition_without_padding_is_exact():
    x = torch.randn(1, 8, 8, 5)
    windows, pad_hw = window_partition(x, 4)
    assert pad_hw == (8, 8) and windows.shape == (4, 4, 4, 5)
    assert torch.equal(window_unpartition(windows, 4, pad_hw, (8, 8)), x)


def test_drop_path_statistics():
    torch.manual_seed(0)
    p = 0.3
    dp = DropPath(p).train()
    x = torch.ones(20000, 4, 4, 8)
    out = dp(x)
    per_sample = out.flatten(1)
    # a sample's branch is kept or dropped as a whole
    assert torch.all(per_sample.amin(1) == per_sample.amax(1))
    dropped = (per_sample[:, 0] == 0).float().mean().item()
    assert abs(dropped - p) < 0.02                       # binomial std here is 0.003
    torch.testing.assert_close(per_sample[per_sample[:, 0] > 0, 0],
                               torch.full_like(per_sample[per_sample[:, 0] > 0, 0], 1 / (1 - p)))
    assert abs(out.mean().item() - 1.0) < 0.03           # expectation preserved
    dp.eval()
    assert torch.equal(dp(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_rejects_bad_rate():
    with pytest.raises(ValueError, match="drop_prob must be in"):
        DropPath(1.5)


def test_mlp_and_trunc_normal():
    assert Mlp is MLP
    torch.manual_seed(0)
    mlp = MLP(6, hidden_features=10, out_features=4, act_layer=nn.ReLU)
    x = torch.randn(2, 3, 3, 6)
    expected = F.relu(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected)
    t = trunc_normal_(torch.empty(100000), std=0.02)
    assert t.abs().max() <= 2.0 and abs(t.std().item() - 0.02) < 1e-3
    t = trunc_normal_(torch.empty(100000), std=1.0, a=-1.0, b=1.0)
    assert t.min() >= -1.0 and t.max() <= 1.0


# -------------------------------------------------------------------------- attention
@pytest.mark.parametrize("shape,heads", [((2, 4, 4, 24), 3), ((3, 10, 16), 4), ((1, 5, 7, 8), 1)])
def test_attention_explicit_fused_and_reference_agree(shape, heads):
    torch.manual_seed(0)
    C = shape[-1]
    attn = Attention(C, num_heads=heads)
    nn.init.normal_(attn.qkv.bias, std=0.5)              # make the biases matter
    x = torch.randn(shape)
    attn.fused = False
    explicit = attn(x)
    attn.fused = True
    fused = attn(x)
    ref = reference_attention(attn, x.reshape(shape[0], -1, C)).reshape(shape)
    assert explicit.shape == x.shape
    torch.testing.assert_close(explicit, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_attention_default_is_fused_and_gradients_agree():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2)
    assert attn.fused is None and attn.use_fused()       # auto picks the fused kernel here
    x = torch.randn(2, 3, 3, 16, requires_grad=True)
    grads = []
    for fused in (False, True):
        attn.fused = fused
        attn.zero_grad()
        x.grad = None
        (attn(x) ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in attn.parameters()])
    for g_explicit, g_fused in zip(*grads):
        torch.testing.assert_close(g_explicit, g_fused, atol=1e-5, rtol=1e-5)


def test_attention_grid_and_sequence_inputs_agree():
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2)
    x = torch.randn(2, 3, 4, 8)
    torch.testing.assert_close(attn(x).reshape(2, 12, 8), attn(x.reshape(2, 12, 8)))


def test_attention_bad_input():
    with pytest.raises(ValueError, match="dim 10 is not divisible by num_heads 3"):
        Attention(10, num_heads=3)
    with pytest.raises(ValueError, match="Attention expects tokens"):
        Attention(8, num_heads=2)(torch.randn(2, 4, 4, 6))


# ------------------------------------------------------------------ transformer blocks
def paired_blocks(window_size, dim=16, heads=2):
    """A windowed block and a global block with the same weights."""
    torch.manual_seed(0)
    windowed = TransformerBlock(dim, heads, window_size=window_size).eval()
    glob = TransformerBlock(dim, heads, window_size=0).eval()
    glob.load_state_dict(windowed.state_dict())
    return windowed, glob


def test_windowed_block_equals_global_block_on_each_window():
    windowed, glob = paired_blocks(4)
    x = torch.randn(2, 8, 12, 16)
    out = windowed(x)
    assert out.shape == x.shape
    for i in range(0, 8, 4):
        for j in range(0, 12, 4):
            torch.testing.assert_close(out[:, i:i + 4, j:j + 4],
                                       glob(x[:, i:i + 4, j:j + 4]), atol=1e-5, rtol=1e-5)
    # and it really is local: global attention over the whole grid differs
    assert (glob(x) - out).abs().max() > 1e-3


def test_windowed_block_with_padding():
    windowed, glob = paired_blocks(5)
    x = torch.randn(2, 5, 7, 16)                         # width 7: padded to 10
    out = windowed(x)
    assert out.shape == x.shape
    # the first window lies wholly inside the grid, so padding cannot touch it
    torch.testing.assert_close(out[:, :, :5], glob(x[:, :, :5]), atol=1e-5, rtol=1e-5)


def test_block_is_pre_norm_residual():
    # with zeroed output projections both branches add nothing: the block is the identity
    block = TransformerBlock(8, 2, window_size=2).eval()
    nn.init.zeros_(block.attn.proj.weight), nn.init.zeros_(block.attn.proj.bias)
    nn.init.zeros_(block.mlp.fc2.weight), nn.init.zeros_(block.mlp.fc2.bias)
    x = torch.randn(2, 4, 4, 8)
    torch.testing.assert_close(block(x), x)


# --------------------------------------------------------------------------- SimpleViT
def test_simplevit_handout_defaults_shape():
    torch.manual_seed(0)
    model = SimpleViT().eval()
    assert model.pos_embed.shape == (1, 8, 8, 192)
    assert [b.window_size for b in model.blocks] == [4, 0, 4, 0]
    drop = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert drop == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    with torch.no_grad():
        assert model(torch.randn(2, 3, 128, 128)).shape == (2, 100)
    assert default_vit_model(num_classes=10).head.out_features == 10


def test_simplevit_other_image_sizes():
    torch.manual_seed(0)
    for img_size, patch, window in [(64, 16, 4), (48, 8, 4), (96, 16, 4)]:  # 96/16 = 6: padded windows
        model = SimpleViT(img_size=img_size, patch_size=patch, num_classes=7, embed_dim=32,
                          depth=2, num_heads=2, window_size=window, window_block_indexes=(0,))
        with torch.no_grad():
            assert model(torch.randn(2, 3, img_size, img_size)).shape == (2, 7)


def test_simplevit_init_follows_handout():
    torch.manual_seed(0)
    model = SimpleViT(embed_dim=64, depth=2, num_heads=2, window_block_indexes=(0,))
    assert 0.015 < model.pos_embed.std().item() < 0.025
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert m.bias.abs().max() == 0 and 0.015 < m.weight.std().item() < 0.025
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = tiny_vit().train()
    out = model(torch.randn(4, 3, 16, 16))
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_simplevit_bad_input():
    with pytest.raises(ValueError, match="img_size 100 is not divisible by patch_size 16"):
        SimpleViT(img_size=100)
    with pytest.raises(ValueError, match=r"window_block_indexes \[4\]"):
        SimpleViT(depth=4, window_block_indexes=(0, 4))
    with pytest.raises(ValueError, match="dim 30 is not divisible by num_heads 4"):
        SimpleViT(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="built for 16x16 images, got 32x32"):
        tiny_vit()(torch.randn(1, 3, 32, 32))


def test_checkpoint_of_another_image_size_is_rejected_clearly():
    small = tiny_vit(img_size=16)                        # 4x4 grid
    large = tiny_vit(img_size=32)                        # 8x8 grid
    with pytest.raises(ValueError, match=r"4x4 patch grid \(img_size 16.*this model has 8x8 "
                                         r"\(img_size 32\)"):
        large.load_state_dict(small.state_dict())
    same = tiny_vit(img_size=16)
    same.load_state_dict(small.state_dict())             # same size loads
    torch.testing.assert_close(same.pos_embed, small.pos_embed)


def make_quadrant_task(n, generator):
    """16x16 noise images; the class is the quadrant holding a bright 6x6 square.
    Only position tells the classes apart, so the model must use its tokens' positions."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    x = 0.5 * torch.randn(n, 3, 16, 16, generator=generator)
    offsets = torch.randint(0, 3, (n, 2), generator=generator)
    for i, (c, (dy, dx)) in enumerate(zip(labels.tolist(), offsets.tolist())):
        y0, x0 = 8 * (c // 2) + dy, 8 * (c % 2) + dx
        x[i, :, y0:y0 + 6, x0:x0 + 6] += 1.5
    return x, labels


@pytest.mark.slow
def test_tiny_vit_learns_a_task_well_above_chance():
    g = torch.Generator().manual_seed(0)
    x_train, y_train = make_quadrant_task(512, g)
    x_val, y_val = make_quadrant_task(256, g)
    torch.manual_seed(0)
    model = tiny_vit(num_classes=4, drop_path_rate=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    model.train()
    for step in range(100):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    assert acc > 0.9, f"validation accuracy {acc:.2f} (chance 0.25)"
