"""Detection transfer, the model: ViTDet backbone / pyramid shapes, window attention and decomposed relative
position against direct computations, gradients through Mask R-CNN, the evaluation resize, the schedule and
layer decay, and checkpoint loading (tests/test_detection.py: COCO AP, datasets and the script end to end)."""
import pytest
import torch
import torch.nn.functional as F

import main_detection
import models_cmae
import models_det
import models_mae
import models_vit


# ---------------------------------------------------------------- model

def tiny_vit(patch, size, **kw):
    kw = {'window_size': 4, 'global_blocks': (1, 3), 'rel_pos': True, 'pretrain_img_size': 4 * patch, **kw}
    return models_det.ViT(img_size=size, patch_size=patch, embed_dim=48, depth=4, num_heads=3, **kw)


@pytest.mark.parametrize('patch', [8, 16])
@pytest.mark.parametrize('size', [64, 96, 128])
def test_backbone_and_pyramid_shapes(patch, size):
    fpn = models_det.SimpleFeaturePyramid(tiny_vit(patch, size), 16).eval()
    with torch.no_grad():
        levels = fpn(torch.randn(2, 3, size, size))
    assert list(levels) == ['0', '1', '2', '3', 'pool'] and all(f.shape[:2] == (2, 16) for f in levels.values())
    grid = size // patch
    assert [f.shape[-1] for f in levels.values()] == [4 * grid, 2 * grid, grid, grid // 2, -(-grid // 4)]
    assert fpn.strides[:4] == (patch / 4, patch / 2, patch, 2 * patch)
    if patch == 16:  # strides 4, 8, 16, 32 (64) of the input
        assert [size // f.shape[-1] for f in list(levels.values())[:4]] == [4, 8, 16, 32]


def test_window_attention_equals_global_when_the_window_covers_the_grid():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 6, 48)
    glob = models_det.Block(48, 3, window_size=0)
    for ws, equal in ((6, True), (8, False), (4, False)):  # 8: the zero padding takes part (detectron2)
        blk = models_det.Block(48, 3, window_size=ws)
        blk.load_state_dict(glob.state_dict())
        with torch.no_grad():
            assert torch.allclose(blk(x), glob(x), atol=1e-5) == equal, ws
    w, padded = models_det.window_partition(x, 4)
    assert w.shape == (8, 4, 4, 48) and padded == (8, 8)
    assert torch.equal(models_det.window_unpartition(w, 4, padded, (6, 6)), x)


def test_border_windows_attend_to_their_zero_padding():
    """detectron2's window attention: norm1, zero-pad to a multiple of the window, attention over each whole
    window with no mask, crop. A window larger than the grid is then one attention over the padded map."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 6, 48)
    blk = models_det.Block(48, 3, window_size=8).eval()
    with torch.no_grad():
        y = F.pad(blk.norm1(x), (0, 0, 0, 2, 0, 2))  # [2, 8, 8, 48]
        ref = x + blk.attn(y)[:, :6, :6]
        ref = ref + blk.mlp(blk.norm2(ref))
        assert torch.allclose(blk(x), ref, atol=1e-5)


def test_decomposed_relative_position_equals_a_direct_sum():
    """bias[(i, j), (k, l)] = q(i, j) . Rh[i - k + S - 1] + q(i, j) . Rw[j - l + S - 1]; tables made for another
    size are linearly resized; zero tables change nothing."""
    torch.manual_seed(0)
    h, w, d = 3, 4, 5
    q = torch.randn(1, 1, h * w, d)
    rh, rw = torch.randn(2 * h - 1, d), torch.randn(2 * w - 1, d)
    bias = models_det.decomposed_rel_pos(q, rh, rw, (h, w))[0, 0]
    for i, j, k, l in [(0, 0, 2, 3), (2, 1, 0, 3), (1, 3, 1, 0)]:
        direct = q[0, 0, i * w + j] @ rh[i - k + h - 1] + q[0, 0, i * w + j] @ rw[j - l + w - 1]
        torch.testing.assert_close(bias[i * w + j, k * w + l], direct)
    assert models_det.rel_pos_table(5, torch.arange(5.)[:, None]).shape == (5, 5, 1)  # 5 rows -> 9 by interpolation
    assert models_det.rel_pos_table(5, torch.arange(5.)[:, None])[0, 4, 0] == 0  # the table's ends stay
    a, b = tiny_vit(8, 64, rel_pos=False).eval(), tiny_vit(8, 64).eval()
    b.load_state_dict(a.state_dict(), strict=False)
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(a(x), b(x))


def tiny_detector(masks=True, **kw):
    return models_det.vitdet('vit_pico_patch4', 2, 64, masks=masks, fpn_channels=16, fc_dim=32,
                             backbone_kwargs=dict(rel_pos=True, **kw), rpn_pre_nms_top_n_train=200,
                             rpn_post_nms_top_n_train=100, box_batch_size_per_image=32)


def test_every_parameter_gets_a_gradient_and_the_transform_does_not_resize_in_training():
    torch.manual_seed(0)
    model = tiny_detector().train()
    assert model.backbone.net.global_blocks == (3,) and model.backbone.net.blocks[0].window_size == 8
    images = [torch.rand(3, 64, 64), torch.rand(3, 40, 64)]  # the second is padded to the square
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 5:25], masks[1, 30:60, 30:50] = 1, 1
    targets = [{'boxes': torch.tensor([[5., 10, 25, 30], [30, 30, 50, 60]]), 'labels': torch.tensor([1, 2]), 'masks': masks},
               {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.int64),
                'masks': torch.zeros(0, 40, 64, dtype=torch.uint8)}]
    batch, tg = model.transform(images, targets)
    assert batch.image_sizes == [(64, 64), (40, 64)] and batch.tensors.shape == (2, 3, 64, 64)
    assert torch.equal(tg[0]['boxes'], targets[0]['boxes'])
    losses = model(images, targets)
    assert sorted(losses) == ['loss_box_reg', 'loss_classifier', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg']
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
    faster = tiny_detector(masks=False)
    assert faster.roi_heads.mask_head is None and 'loss_mask' not in faster.train()(images, targets)


def test_evaluation_resizes_the_longer_side_and_maps_back():
    model = tiny_detector().eval()
    batch, _ = model.transform([torch.rand(3, 50, 80)])
    assert batch.image_sizes == [(40, 64)] and batch.tensors.shape == (1, 3, 64, 64)
    out = model.transform.postprocess([{'boxes': torch.tensor([[0., 0, 64, 40]])}], batch.image_sizes, [(50, 80)])
    torch.testing.assert_close(out[0]['boxes'], torch.tensor([[0., 0, 80, 50]]))
    with torch.no_grad():
        det = model([torch.rand(3, 50, 80)])[0]
    assert det['masks'].shape[1:] == (1, 50, 80) and (det['boxes'][:, 2] <= 80).all()


def test_schedule_and_layer_decay():
    from engine_detection import milestones, step_lr
    assert milestones(184375) == (163889, 177546)
    assert step_lr(0, 1e-4, 250, 184375) == pytest.approx(1e-7)
    assert step_lr(125, 1e-4, 250, 184375) == pytest.approx(1e-4 * (0.001 * 0.5 + 0.5))
    assert step_lr(250, 1e-4, 250, 184375) == pytest.approx(1e-4)
    assert step_lr(163889, 1e-4, 250, 184375) == pytest.approx(1e-5)
    assert step_lr(177546, 1e-4, 250, 184375) == pytest.approx(1e-6)
    args = main_detection.get_args_parser().parse_args(['--layer_decay', '0.7'])
    model = tiny_detector()
    groups = main_detection.param_groups(model, args)
    scale = {id(p): (g['lr_scale'], g['weight_decay']) for g in groups for p in g['params']}
    named = dict(model.named_parameters())
    assert len(scale) == len(named)
    assert scale[id(named['backbone.net.pos_embed'])] == (pytest.approx(0.7 ** 5), 0)  # depth 4: 0.7 ** (4 + 1)
    assert scale[id(named['backbone.net.blocks.0.attn.qkv.weight'])] == (pytest.approx(0.7 ** 4), 0.1)
    assert scale[id(named['backbone.net.blocks.3.attn.rel_pos_h'])][0] == pytest.approx(0.7)
    assert scale[id(named['roi_heads.box_head.5.weight'])] == (1, 0.1) and scale[id(named['rpn.head.conv.0.0.bias'])] == (1, 0)


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize('kind', ['mae', 'crossmae', 'cmae', 'finetuned', 'hf', 'timm'])
def test_checkpoints_load_at_another_resolution(tmp_path, kind):
    """32-px pico checkpoints (8x8 grid) into a detector at 64 px (16x16): the encoder is loaded as it is, the
    window is the pretraining grid and pos_embed keeps the checkpoint's grid (resized in the forward pass)."""
    from util import convert
    if kind == 'crossmae':
        src = models_mae.mae_vit_pico_patch4(cross_mae=True, weight_fm=True, use_input=True)
    elif kind == 'cmae':
        src = models_cmae.cmae_model('mae_vit_pico_patch4', proj_hidden_dim=32, proj_dim=16)
    elif kind == 'finetuned':
        src = models_vit.vit_pico_patch4(num_classes=10)
    else:
        src = models_mae.mae_vit_pico_patch4()
    state = src.state_dict()
    assert ('norm.weight' in state) == (kind in ('mae', 'cmae', 'hf', 'timm'))  # CrossMAE: no final norm
    path = tmp_path / 'ckpt.pth'
    if kind == 'hf':
        path = tmp_path / 'hf'
        convert.save_hf_folder(convert.mae_to_hf(state), convert.hf_config(convert.arch_from_state(state)), path)
    elif kind == 'timm':
        path = tmp_path / 'enc.safetensors'
        convert.save_safetensors(convert.mae_to_timm(state)[0], path)
    else:
        torch.save({'model': state, 'args': {'model': 'mae_vit_pico_patch4', 'input_size': 32}}, path)
    args = main_detection.get_args_parser().parse_args(['--finetune', str(path), '--input_size', '64',
                                                        '--fpn_channels', '16', '--fc_dim', '32', '--output_dir', ''])
    main_detection.check_args(args)
    assert (args.model, args.pretrain_size, args.window_size, args.global_blocks) == ('vit_pico_patch4', 32, 8, [3])
    model = main_detection.build_model(args, 3)
    vit = model.backbone.net
    assert 'finetune_state' not in vars(args) and vit.pos_embed.shape == (1, 65, 96)
    torch.testing.assert_close(vit.pos_embed, state['pos_embed'])
    assert torch.equal(vit.blocks[2].attn.qkv.weight, state['blocks.2.attn.qkv.weight'])
    with torch.no_grad():
        assert model.eval()([torch.rand(3, 64, 48)])[0]['boxes'].shape[1] == 4


def test_another_architecture_is_refused():
    vit = tiny_vit(4, 32, pretrain_img_size=32)
    wide = models_vit.vision_transformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)
    deep = models_vit.vision_transformer(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3)
    with pytest.raises(ValueError, match='another architecture.*shapes'):
        models_det.load_pretrained(vit, wide.state_dict())
    with pytest.raises(ValueError, match='unexpected.*blocks.4'):
        models_det.load_pretrained(vit, deep.state_dict())
    with pytest.raises(ValueError, match='no ViT encoder keys'):
        models_det.load_pretrained(vit, {'conv1.weight': torch.zeros(3)})
