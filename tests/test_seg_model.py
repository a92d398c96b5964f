"""Segmentation transfer, the model: UperNet shapes, relative position bias (zero init, resizing, the cached
index), the poly schedule and auxiliary loss, and checkpoint loading (tests/test_segmentation.py: metrics,
datasets and the script end to end)."""
import collections

import pytest
import torch

import models_cmae
import models_mae
import models_seg
import models_vit


def tiny(patch, img_size, **kw):
    return models_seg.UperNetViT(5, img_size=img_size, patch_size=patch, embed_dim=48, depth=4, num_heads=3,
                                 channels=16, aux_channels=8, **kw)


@pytest.mark.parametrize('patch', [8, 16])
@pytest.mark.parametrize('size', [64, 96, 128])
def test_upernet_shapes(patch, size):
    model = tiny(patch, 64).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out, aux = model(x, with_aux=True)
        levels = model.neck(model.forward_features(x))
    assert out.shape == aux.shape == (2, 5, size, size)
    assert [tuple(f.shape[2:]) for f in levels] == [(size * 4 // patch // s,) * 2 for s in (1, 2, 4, 8)]
    if patch == 16:  # strides 4, 8, 16, 32 of the input
        assert [size // f.shape[-1] for f in levels] == [4, 8, 16, 32]


def test_every_parameter_learns_and_out_indices():
    model = tiny(8, 32, rel_pos_bias=True)
    assert models_seg.default_out_indices(12) == (3, 5, 7, 11) and models_seg.default_out_indices(24) == (5, 11, 17, 23)
    assert model.out_indices == (0, 1, 2, 3)
    out, aux = model(torch.randn(2, 3, 40, 56), with_aux=True)  # not a multiple of the patch: padded, cropped
    assert out.shape == (2, 5, 40, 56)
    (out.square().mean() + aux.square().mean()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_relative_position_bias_zero_init_is_a_no_op_and_resizes():
    torch.manual_seed(0)
    a, b = tiny(8, 32).eval(), tiny(8, 32, rel_pos_bias=True).eval()
    models_seg.load_pretrained(b, a.state_dict())
    b.load_state_dict({k: v for k, v in a.state_dict().items()}, strict=False)
    x = torch.randn(1, 3, 48, 40)  # another grid than the 4x4 the tables were made for
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
        for blk in b.blocks:
            blk.attn.relative_position_bias_table.normal_()
        bias = b.blocks[0].attn.relative_position_bias((4, 4))
        table, index = b.blocks[0].attn.relative_position_bias_table, models_seg.relative_position_index(4, 4)
        assert bias.shape == (3, 17, 17) and torch.equal(bias[:, 1, 2], table[index[1, 2]])
        assert index[1, 2] == index[5, 6] and index[0, 3] == 49 and index[3, 0] == 50 and index[0, 0] == 51
        assert b(x).shape == (1, 5, 48, 40)



def bias_before_the_cache(attn, grid):
    """Attention.relative_position_bias as it was: the index rebuilt (on the CPU) at every call off the
    training grid."""
    table, (gh0, gw0) = attn.relative_position_bias_table, attn.rel_pos_grid
    if tuple(grid) == (gh0, gw0):
        index = attn.relative_position_index
    else:
        gh, gw = grid
        patch = table[:-3].T.reshape(1, -1, 2 * gh0 - 1, 2 * gw0 - 1)
        patch = torch.nn.functional.interpolate(patch, size=(2 * gh - 1, 2 * gw - 1), mode='bicubic',
                                                align_corners=False)
        table = torch.cat([patch.flatten(2)[0].T, table[-3:]])
        index = models_seg.relative_position_index(gh, gw).to(table.device)
    t = index.shape[0]
    return table[index.view(-1)].view(t, t, -1).permute(2, 0, 1)


def test_relative_position_index_is_cached_per_grid_and_the_tables_still_learn(monkeypatch):
    """Off the training grid the index is built once per grid (not per block and forward); the bicubic resize
    of each block's own table stays in every forward, so the outputs and the tables' gradients are those of
    the uncached code, bit for bit."""
    torch.manual_seed(0)
    model = tiny(8, 32, rel_pos_bias=True)  # 4x4 training grid, a table per block
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.relative_position_bias_table.normal_()
    tables = [blk.attn.relative_position_bias_table for blk in model.blocks]
    assert len({id(t) for t in tables}) == len(model.blocks)  # not shared: each block resizes its own
    x = torch.randn(2, 3, 48, 40)  # a 6x5 grid

    def run():
        model.zero_grad()
        out, aux = model(x, with_aux=True)
        (out.square().mean() + aux.square().mean()).backward()
        return out.detach(), [t.grad.clone() for t in tables]

    model.eval()  # no dropout / drop path, batch statistics fixed: two runs must agree exactly
    with monkeypatch.context() as m:
        m.setattr(models_seg.Attention, 'relative_position_bias', bias_before_the_cache)
        ref_out, ref_grads = run()
    builds, builder = [], models_seg.relative_position_index

    def counted(*a, **k):
        builds.append(a[:2])
        return builder(*a, **k)
    monkeypatch.setattr(models_seg, 'relative_position_index', counted)
    monkeypatch.setattr(models_seg, '_INDEX_CACHE', collections.OrderedDict(), raising=False)  # as a fresh process
    out, grads = run()
    assert torch.equal(out, ref_out)
    assert all(torch.equal(g, r) and g.abs().sum() > 0 for g, r in zip(grads, ref_grads))
    out_again, _ = run()
    assert torch.equal(out_again, ref_out) and builds == [(6, 5)]  # once for 4 blocks and 2 forwards
    model(torch.randn(1, 3, 32, 32))  # the training grid: the registered index
    model(torch.randn(1, 3, 40, 40))
    assert builds == [(6, 5), (5, 5)]
    bias = model.blocks[1].attn.relative_position_bias((6, 5))
    torch.testing.assert_close(bias, bias_before_the_cache(model.blocks[1].attn, (6, 5)), rtol=0, atol=0)


PICO_ENC = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)


@pytest.mark.parametrize('kind', ['mae', 'crossmae', 'cmae', 'finetuned'])
def test_checkpoints_load_at_another_resolution(kind):
    if kind == 'mae':
        src = models_mae.mae_vit_pico_patch4()
    elif kind == 'crossmae':
        src = models_mae.mae_vit_pico_patch4(cross_mae=True, weight_fm=True, use_input=True)
    elif kind == 'cmae':
        src = models_cmae.cmae_model('mae_vit_pico_patch4', proj_hidden_dim=32, proj_dim=16)
    else:
        src = models_vit.vit_pico_patch4(num_classes=10)
    sd = src.state_dict()
    assert ('norm.weight' in sd) == (kind in ('mae', 'cmae'))  # CrossMAE: no final norm; fine-tuned: fc_norm
    seg = models_seg.upernet_vit('vit_pico_patch4', 11, img_size=64, channels=16, aux_channels=8)  # 16x16 grid, not 8x8
    ignored, missing = models_seg.load_pretrained(seg, sd)
    assert missing == []
    assert torch.equal(seg.blocks[3].mlp.fc2.weight, sd['blocks.3.mlp.fc2.weight'])
    assert seg.pos_embed.shape == (1, 257, 96)
    torch.testing.assert_close(seg.pos_embed[:, :1], sd['pos_embed'][:, :1])
    assert not any(k.startswith(models_seg.ENCODER_KEYS) for k in ignored)


def test_another_architecture_is_refused():
    seg = models_seg.upernet_vit('vit_pico_patch4', 11, img_size=32, channels=16, aux_channels=8)
    wide = models_vit.vision_transformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3)
    deep = models_vit.vision_transformer(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3)
    with pytest.raises(ValueError, match='another architecture.*shapes'):
        models_seg.load_pretrained(seg, wide.state_dict())
    with pytest.raises(ValueError, match='unexpected.*blocks.4'):
        models_seg.load_pretrained(seg, deep.state_dict())
    with pytest.raises(ValueError, match='no ViT encoder keys'):
        models_seg.load_pretrained(seg, {'conv1.weight': torch.zeros(3)})


def test_poly_schedule_and_aux_weight():
    from engine_segmentation import poly_lr, segmentation_loss
    lr, total, warm = 1e-4, 1000, 100
    assert poly_lr(0, lr, 0, warm, total) == 0
    assert poly_lr(50, lr, 0, warm, total) == pytest.approx(lr * (1 - 50 / total) * 50 / warm)
    assert poly_lr(500, lr, 0, warm, total) == pytest.approx(lr * 0.5)
    assert poly_lr(500, lr, 1e-6, warm, total, power=0.9) == pytest.approx((lr - 1e-6) * 0.5 ** 0.9 + 1e-6)
    assert poly_lr(total, lr, 0, warm, total) == 0
    model = tiny(8, 32).eval()
    assert [m[0].output_size for m in model.decode_head.psp_modules] == [1, 2, 3, 6]  # pyramid pooling scales
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    y[:, 0] = 255
    with torch.no_grad():
        out, aux = model(x, with_aux=True)
        loss, logs = segmentation_loss(model, x, y, 0.4)
    main = torch.nn.functional.cross_entropy(out, y, ignore_index=255)
    torch.testing.assert_close(loss, main + 0.4 * torch.nn.functional.cross_entropy(aux, y, ignore_index=255))
    torch.testing.assert_close(logs['loss_main'], main)
