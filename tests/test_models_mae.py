import pytest
import torch
import torch.nn as nn

import models_mae
import reference as ref
from conftest import randomize_norms
from util.pos_embed import get_2d_sincos_pos_embed

SMALL = dict(embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3,
             norm_layer=models_mae._LN)


def small_mae(img_size, patch_size, **kw):
    torch.manual_seed(0)
    return randomize_norms(models_mae.MaskedAutoencoderViT(img_size=img_size, patch_size=patch_size, **{**SMALL, **kw}))


@pytest.mark.parametrize('img_size,patch_size', [(32, 4), (48, 8)])
@pytest.mark.parametrize('norm_pix', [False, True])
def test_mae_matches_reference(img_size, patch_size, norm_pix):
    model = small_mae(img_size, patch_size, norm_pix_loss=norm_pix)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, img_size, img_size, generator=g)
    noise = torch.rand(3, (img_size // patch_size) ** 2, generator=g)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    rloss, rpred, rmask = ref.mae_reference(model.state_dict(), imgs, noise, 0.75, patch_size, 4, 3, norm_pix)
    assert abs(loss.item() - rloss.item()) <= 1e-5
    assert (pred.double() - rpred).abs().max() <= 1e-4
    assert torch.equal(mask, rmask.float())


def test_random_noise_is_drawn_like_the_original():
    """Without noise, one torch.rand(N, L) is drawn: seeding the same way gives the same mask."""
    model = small_mae(32, 4)
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    _, _, mask = model(imgs)
    torch.manual_seed(5)
    noise = torch.rand(2, 64)
    _, _, mask2 = model(imgs, noise=noise)
    assert torch.equal(mask, mask2)
    keep = noise.argsort(1)[:, :16]
    assert mask.gather(1, keep).sum() == 0 and mask.sum() == 2 * 48


@pytest.mark.parametrize('ratio', [0.0, 0.5, 0.75, 0.9])
def test_mask_counts_and_zero_ratio(ratio):
    model = small_mae(32, 4)
    loss, pred, mask = model(torch.randn(2, 3, 32, 32), mask_ratio=ratio)
    assert torch.isfinite(loss)
    assert pred.shape == (2, 64, 48)
    assert (mask.sum(1) == 64 - int(64 * (1 - ratio))).all()


def test_patchify_roundtrip_and_order():
    model = models_mae.MaskedAutoencoderViT(img_size=(32, 48), patch_size=8, **SMALL)
    imgs = torch.randn(2, 3, 32, 48)
    x = model.patchify(imgs)
    assert x.shape == (2, 24, 192)
    assert torch.equal(x, ref.patches(imgs, 8))
    assert torch.equal(model.unpatchify(x), imgs)


@pytest.mark.parametrize('grid', [(8, 8), (14, 14), (4, 6)])
def test_pos_embed_is_float64_sincos(grid):
    table = ref.sincos_table(64, *grid)
    ours = torch.from_numpy(get_2d_sincos_pos_embed(64, grid, cls_token=True))
    assert torch.allclose(ours, table, atol=1e-12)
    model = models_mae.MaskedAutoencoderViT(img_size=(grid[0] * 4, grid[1] * 4), patch_size=4, **{**SMALL, 'embed_dim': 64})
    assert torch.equal(model.pos_embed[0], table.float()) and not model.pos_embed.requires_grad
    assert torch.equal(model.decoder_pos_embed[0], ref.sincos_table(24, *grid).float())


def expected_mae_keys(D, depth, p, L, Dd=512, ddepth=8):
    """The official MAE state_dict, from SPEC §1.1."""
    keys = {'cls_token': (1, 1, D), 'pos_embed': (1, L + 1, D), 'patch_embed.proj.weight': (D, 3, p, p),
            'patch_embed.proj.bias': (D,), 'norm.weight': (D,), 'norm.bias': (D,), 'mask_token': (1, 1, Dd),
            'decoder_pos_embed': (1, L + 1, Dd), 'decoder_embed.weight': (Dd, D), 'decoder_embed.bias': (Dd,),
            'decoder_norm.weight': (Dd,), 'decoder_norm.bias': (Dd,), 'decoder_pred.weight': (p * p * 3, Dd),
            'decoder_pred.bias': (p * p * 3,)}
    for prefix, n, d in (('blocks', depth, D), ('decoder_blocks', ddepth, Dd)):
        for i in range(n):
            k = f'{prefix}.{i}.'
            keys.update({k + 'norm1.weight': (d,), k + 'norm1.bias': (d,), k + 'attn.qkv.weight': (3 * d, d),
                         k + 'attn.qkv.bias': (3 * d,), k + 'attn.proj.weight': (d, d), k + 'attn.proj.bias': (d,),
                         k + 'norm2.weight': (d,), k + 'norm2.bias': (d,), k + 'mlp.fc1.weight': (4 * d, d),
                         k + 'mlp.fc1.bias': (4 * d,), k + 'mlp.fc2.weight': (d, 4 * d), k + 'mlp.fc2.bias': (d,)})
    return keys


@pytest.mark.parametrize('name,D,depth,p', [('mae_vit_base_patch16', 768, 12, 16),
                                            ('mae_vit_large_patch16', 1024, 24, 16),
                                            ('mae_vit_huge_patch14', 1280, 32, 14),
                                            ('mae_vit_base_patch16_dec512d8b', 768, 12, 16)])
def test_official_keys_and_shapes(name, D, depth, p):
    with torch.device('meta'):
        model = models_mae.MODELS[name]()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_mae_keys(D, depth, p, (224 // p) ** 2)


def test_init_follows_spec():
    torch.manual_seed(0)
    model = models_mae.mae_vit_pico_patch4()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = (6 / (m.in_features + m.out_features)) ** 0.5
            assert m.weight.abs().max() <= bound and torch.all(m.bias == 0)
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-6
    w = model.patch_embed.proj.weight
    assert w.abs().max() <= (6 / (w.shape[0] + w[0].numel())) ** 0.5
    assert 0.01 < model.cls_token.std() < 0.03 and 0.01 < model.mask_token.std() < 0.04


@pytest.mark.parametrize('kw', [dict(), dict(cross_mae=True), dict(cross_mae=True, weight_fm=True, use_input=True),
                                dict(cross_mae=True, weight_fm=True, self_attn=True)])
def test_every_parameter_gets_a_gradient(kw):
    model = small_mae(32, 4, **kw)
    loss, _, _ = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75, kept_mask_ratio=0.5 if kw else None)
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_attention_backends_agree():
    model = small_mae(32, 4)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    a = model(imgs, noise=noise)[0]
    model.set_attention_backend('math')
    b = model(imgs, noise=noise)[0]
    assert abs(a.item() - b.item()) < 1e-5
