import pytest
import torch

import models_mae
import reference as ref
from test_models_mae import small_mae


@pytest.mark.parametrize('kept', [0.75, 0.25])
@pytest.mark.parametrize('use_input,weight_fm', [(False, True), (True, True), (False, False)])
def test_crossmae_matches_reference(kept, use_input, weight_fm):
    model = small_mae(32, 4, cross_mae=True, weight_fm=weight_fm, use_input=use_input, norm_pix_loss=True)
    g = torch.Generator().manual_seed(2)
    imgs, noise = torch.randn(3, 3, 32, 32, generator=g), torch.rand(3, 64, generator=g)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise, kept_mask_ratio=kept)
    rloss, rpred, rmask = ref.crossmae_reference(model.state_dict(), imgs, noise, 0.75, kept, 4, 4, 3, True,
                                                 use_input, weight_fm)
    assert abs(loss.item() - rloss.item()) <= 1e-5
    assert torch.equal(mask, rmask.float())
    got = torch.stack([pred[b][mask[b].bool()] for b in range(3)])  # predicted rows, ascending patch order
    assert (got.double() - rpred).abs().max() <= 1e-4
    assert (pred[~mask.bool()] == 0).all()


def test_crossmae_self_attn_matches_reference():
    model = small_mae(32, 4, cross_mae=True, weight_fm=True, self_attn=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise, kept_mask_ratio=0.5)
    rloss, _, _ = ref.crossmae_reference(model.state_dict(), imgs, noise, 0.75, 0.5, 4, 4, 3, False, False, True, True)
    assert abs(loss.item() - rloss.item()) <= 1e-5


@pytest.mark.parametrize('L,ratio,kept', [(64, 0.75, 0.75), (64, 0.75, 0.25), (196, 0.75, 0.25), (196, 0.9, 0.3),
                                          (49, 0.6, 0.1)])
def test_predicted_patch_counts(L, ratio, kept):
    g = int(L ** 0.5)
    model = small_mae(g * 4, 4, cross_mae=True)
    _, _, mask = model(torch.randn(2, 3, g * 4, g * 4), mask_ratio=ratio, kept_mask_ratio=kept)
    len_keep, len_masked = int(L * (1 - ratio)), int(L * (ratio - kept))
    assert (mask.sum(1) == L - len_keep - len_masked).all()


def test_loss_ignores_visible_and_unpredicted_patches():
    model = small_mae(32, 4, cross_mae=True, weight_fm=True, use_input=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise, kept_mask_ratio=0.25)
    ids = noise.argsort(1)
    not_predicted = ids[:, 16 + 32:]  # sanity: predicted are the largest noise
    assert mask.gather(1, not_predicted).sum() == mask.sum()
    target = model.patchify(imgs)
    target[~mask.bool()] += 100.0  # change the targets of everything that is not predicted
    assert torch.allclose(model.forward_loss(model.unpatchify(target), pred, mask), loss)


def test_official_crossmae_keys():
    with torch.device('meta'):
        model = models_mae.mae_vit_base_patch16(cross_mae=True, weight_fm=True, use_input=True, decoder_depth=12)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert not any(k.startswith(('norm.', 'decoder_embed.')) for k in sd)
    assert sd['wfm.linear.weight'] == (12, 13)
    for i in range(12):
        k = f'decoder_blocks.{i}.'
        blk = {n[len(k):]: s for n, s in sd.items() if n.startswith(k)}
        assert blk == {'norm1.weight': (512,), 'norm1.bias': (512,), 'cross_attn.q.weight': (512, 512),
                       'cross_attn.q.bias': (512,), 'cross_attn.kv.weight': (1024, 768), 'cross_attn.kv.bias': (1024,),
                       'cross_attn.proj.weight': (512, 512), 'cross_attn.proj.bias': (512,), 'norm2.weight': (512,),
                       'norm2.bias': (512,), 'mlp.fc1.weight': (2048, 512), 'mlp.fc1.bias': (2048,),
                       'mlp.fc2.weight': (512, 2048), 'mlp.fc2.bias': (512,)}
        assert sd[f'dec_norms.{i}.weight'] == (768,)
    rest = {k for k in sd if not k.startswith(('blocks.', 'decoder_blocks.', 'dec_norms.'))}
    assert rest == {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'mask_token',
                    'decoder_pos_embed', 'wfm.linear.weight', 'decoder_norm.weight', 'decoder_norm.bias',
                    'decoder_pred.weight', 'decoder_pred.bias'}
    with torch.device('meta'):
        sa = models_mae.mae_vit_base_patch16(cross_mae=True, weight_fm=True, self_attn=True)
    assert 'decoder_blocks.0.norm0.weight' in sa.state_dict() and 'decoder_blocks.0.self_attn.qkv.weight' in sa.state_dict()


def test_flash_attn_flag_falls_back_with_a_message(capsys):
    import main_pretrain
    args = main_pretrain.get_args_parser().parse_args(['--model', 'mae_vit_pico_patch4', '--input_size', '32',
                                                       '--cross_mae', '--flash_attn'])
    args.device, args.amp = torch.device('cpu'), 'none'
    model = main_pretrain.build_model(args)
    assert 'using PyTorch SDPA' in capsys.readouterr().out
    assert all(m.backend == 'sdpa' for m in model.modules() if hasattr(m, 'backend'))
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(loss)


def test_official_crossmae_vit_small_keys():
    """CrossMAE's ViT-S: decoder 256 wide, 8 heads (base/large/huge: 512, 16), as in its published checkpoints."""
    with torch.device('meta'):
        model = models_mae.mae_vit_small_patch16(cross_mae=True, weight_fm=True, use_input=True, decoder_depth=12)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd['decoder_pos_embed'] == (1, 197, 256) and sd['mask_token'] == (1, 1, 256)
    assert sd['wfm.linear.weight'] == (12, 13) and sd['decoder_pred.weight'] == (768, 256)
    assert sd['decoder_norm.weight'] == (256,) and not any(k.startswith(('norm.', 'decoder_embed.')) for k in sd)
    for i in range(12):
        k = f'decoder_blocks.{i}.'
        blk = {n[len(k):]: s for n, s in sd.items() if n.startswith(k)}
        assert blk == {'norm1.weight': (256,), 'norm1.bias': (256,), 'cross_attn.q.weight': (256, 256),
                       'cross_attn.q.bias': (256,), 'cross_attn.kv.weight': (512, 384), 'cross_attn.kv.bias': (512,),
                       'cross_attn.proj.weight': (256, 256), 'cross_attn.proj.bias': (256,), 'norm2.weight': (256,),
                       'norm2.bias': (256,), 'mlp.fc1.weight': (1024, 256), 'mlp.fc1.bias': (1024,),
                       'mlp.fc2.weight': (256, 1024), 'mlp.fc2.bias': (256,)}
        assert sd[f'dec_norms.{i}.weight'] == (384,) and model.decoder_blocks[i].cross_attn.num_heads == 8
    assert all(sd[f'blocks.{i}.attn.qkv.weight'] == (1152, 384) for i in range(12)) and sd['pos_embed'] == (1, 197, 384)
    assert len(sd) == 4 + 12 * 12 + 12 * 14 + 12 * 2 + 1 + 2 + 2 + 2  # nothing else
