"""CUDA checks of dense transfer (detection, segmentation); every test is skipped without a GPU. Tolerances as in
tests/test_cuda.py (shared through tests/cuda_common.py). First run on an H200 (torch 2.11) on 2026-12-04: all
passed."""
import math

import pytest
import torch
import torch.nn.functional as F

import util.misc as misc
from conftest import read_log
from cuda_common import TOL, amp_args, close, exact_fp32, flat_grads, restore_cuda_flags, sdpa_as_math  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


# ---------------------------------------------------------------- detection and segmentation on CUDA (issue 25)

def det_model(seed=0):
    """A tiny ViTDet Mask R-CNN on CUDA: vit_pico_patch4 at 64 px, window 4 with global blocks, relative
    position, small proposal and RoI counts (2 classes)."""
    import models_det
    torch.manual_seed(seed)
    model = models_det.vitdet('vit_pico_patch4', 2, 64, fpn_channels=16, fc_dim=32, anchor_sizes=(8, 16, 24, 32, 48),
                              backbone_kwargs=dict(window_size=4, rel_pos=True, drop_path_rate=0.),
                              rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_batch_size_per_image=64,
                              box_batch_size_per_image=32)
    for m in model.modules():  # relative position tables away from their zero init: a bias that changes attention
        if hasattr(m, 'rel_pos_h'):
            with torch.no_grad():
                m.rel_pos_h.normal_(std=0.2), m.rel_pos_w.normal_(std=0.2)
    return model.cuda()


def det_batch(n=2, seed=1):
    """n 64x64 images, each with one or two boxes and their masks, on CUDA."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        boxes = torch.tensor([[8., 10., 40., 38.], [30., 24., 60., 60.]][:1 + i % 2])
        masks = torch.zeros(len(boxes), 64, 64, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0:x1] = 1
        images.append(torch.rand(3, 64, 64, generator=g).cuda())
        targets.append({'boxes': boxes.cuda(), 'labels': torch.tensor([1, 2][:len(boxes)]).cuda(),
                        'masks': masks.cuda()})
    return images, targets


@pytest.mark.parametrize('window', [0, 4])
def test_detection_bf16_window_attention_with_rel_pos_through_sdpa_matches_math(exact_fp32, monkeypatch, window):
    """models_det.Block in bf16, global (6x7 grid, the tables resized from 6 to 7 on one axis) or windowed (4x4
    windows; the 6x7 grid padded to 8x8, the padded tokens attending): SDPA with the decomposed relative position
    bias as attn_mask against fp32 math attention on the same bf16 q, k, v and bias. The attention output within
    bf16 tolerance (rtol 1.6e-2, atol 1e-2), the tables' gradients within 2e-2 relative norm (as segmentation)."""
    import models_det
    torch.manual_seed(0)
    block = models_det.Block(96, 3, window_size=window, rel_pos_size=window or 6).cuda()
    with torch.no_grad():
        block.attn.rel_pos_h.normal_(std=0.2), block.attn.rel_pos_w.normal_(std=0.2)
    x = torch.randn(2, 6, 7, 96, device='cuda')
    outs, grads = [], []
    for ref in (False, True):
        caught = []
        handle = block.attn.register_forward_hook(lambda m, i, o: caught.append(o))
        with monkeypatch.context() as m:
            if ref:
                m.setattr(models_det.F, 'scaled_dot_product_attention', sdpa_as_math)
            block.zero_grad()
            with torch.autocast('cuda', dtype=torch.bfloat16):
                block(x)
            caught[0].float().square().sum().backward()
        handle.remove()
        assert caught[0].shape[:3] == ((8, 4, 4) if window else (2, 6, 7))
        outs.append(caught[0].float())
        grads.append(torch.cat([block.attn.rel_pos_h.grad.flatten(), block.attn.rel_pos_w.grad.flatten()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1.6e-2, atol=1e-2)
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 2e-2


def test_detection_bf16_training_step(exact_fp32):
    """One Mask R-CNN training step in bf16 and in fp32 from the same weights and RNG state: the RPN samples the
    same anchors in both (they depend on the ground truth alone), so its losses agree within the bf16 loss
    tolerance (2e-2 relative + 5e-3); the RoI heads sample from proposals that bf16 scores reorder, so their
    losses are only finite. Every parameter gets a finite gradient in bf16, and a fused AdamW step runs."""
    model = det_model()
    model.train()
    images, targets = det_batch()
    losses = {}
    for amp in ('none', 'bf16'):
        torch.manual_seed(1)  # the same sampling draws (torch.randperm on the device)
        model.zero_grad()
        with misc.autocast(amp_args(amp)):
            out = model(images, targets)
        sum(out.values()).backward()
        losses[amp] = {k: v.item() for k, v in out.items()}
    assert set(losses['bf16']) == {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness',
                                   'loss_rpn_box_reg'}
    assert all(math.isfinite(v) for v in losses['bf16'].values()), losses
    for k in ('loss_objectness', 'loss_rpn_box_reg'):
        assert close(losses['bf16'][k], losses['none'][k], **{k: v for k, v in TOL['bf16'].items() if k != 'cos'}), (k, losses)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())]
    assert not missing, missing
    opt = misc.adamw([p for p in model.parameters() if p.requires_grad], 'cuda', lr=1e-4)
    assert opt.defaults['fused']
    opt.step()
    model.eval()
    with torch.no_grad(), misc.autocast(amp_args('bf16')):
        dets = model(images)
    assert len(dets) == 2 and all(d['masks'].shape[-2:] == (64, 64) for d in dets)


def test_detection_trains_on_cuda_resumes_on_cpu_and_evaluates_on_cuda(tmp_path, capsys):
    """main_detection on a synthetic COCO set: one epoch on CUDA (bf16, fused AdamW), the second resumed on the
    CPU (fp32), then --eval --resume on CUDA: the '* bbox AP' line and a results file pycocotools reads."""
    from test_detection import DET, ap_line, make_coco, run_det
    data, out = make_coco(tmp_path / 'data', obj=(18, 30)), tmp_path / 'run'
    common = [*DET, '--data_path', data, '--batch_size', 2, '--print_freq', 1, '--output_dir', out]
    code, stdout, err = run_det(capsys, [*common, '--device', 'cuda', '--epochs', 1])
    assert code == 0, stdout[-2000:] + err[-2000:]
    assert torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)['epoch'] == 0
    code, stdout, err = run_det(capsys, [*common, '--device', 'cpu', '--epochs', 2])
    assert code == 0 and 'at epoch 1' in stdout, stdout[-2000:] + err[-2000:]
    log = read_log(out / 'log.txt')
    assert [r['epoch'] for r in log] == [0, 1] and all(math.isfinite(r['train_loss']) for r in log)
    code, stdout, err = run_det(capsys, [*DET, '--data_path', data, '--device', 'cuda', '--eval', '--resume',
                                         out / 'checkpoint.pth', '--output_dir', tmp_path / 'eval'])
    assert code == 0 and 'segm AP' in ap_line(stdout), stdout[-2000:] + err[-2000:]
    import json
    from pycocotools.coco import COCO
    results = json.loads((tmp_path / 'eval' / 'coco_instances_results.json').read_text())
    assert isinstance(results, list)
    if results:  # a few steps may find nothing above the score threshold
        COCO(str(data / 'annotations' / 'instances_val.json')).loadRes(results)


def test_segmentation_bf16_step_matches_fp32(exact_fp32):
    """One UperNet (relative position bias, BatchNorm) loss and backward in bf16 and in fp32 from the same
    weights and draws: the loss within 2e-2 relative + 5e-3, the gradient's cosine to fp32's >= 0.99."""
    import engine_segmentation
    import models_seg
    torch.manual_seed(0)
    model = models_seg.UperNetViT(5, img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, channels=16,
                                  aux_channels=8, rel_pos_bias=True).cuda()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 40, 48, generator=g).cuda(), torch.randint(0, 5, (2, 40, 48), generator=g).cuda()
    losses, grads = {}, {}
    for amp in ('none', 'bf16'):
        torch.manual_seed(1)
        model.zero_grad()
        with misc.autocast(amp_args(amp)):
            loss, _ = engine_segmentation.segmentation_loss(model, x, y, 0.4)
        loss.backward()
        losses[amp], grads[amp] = loss.item(), flat_grads(model)
    assert close(losses['bf16'], losses['none'], 2e-2, 5e-3), losses
    assert F.cosine_similarity(grads['bf16'], grads['none'], dim=0).item() >= 0.99


def test_segmentation_trains_on_cuda_resumes_on_cpu_and_evaluates_on_cuda(tmp_path, capsys):
    """main_segmentation on a synthetic folder dataset: one epoch on CUDA (bf16), the second resumed on the CPU,
    then --eval --resume on CUDA prints '* mIoU'."""
    from test_segmentation import SEG, make_dataset, miou_line, run_seg
    data, out = make_dataset(tmp_path / 'data'), tmp_path / 'run'
    common = [*SEG, '--data_path', data, '--output_dir', out]
    code, stdout, err = run_seg(capsys, [*common, '--device', 'cuda', '--epochs', 1])
    assert code == 0, stdout[-2000:] + err[-2000:]
    code, stdout, err = run_seg(capsys, [*common, '--device', 'cpu', '--epochs', 2])
    assert code == 0 and 'at epoch 1' in stdout, stdout[-2000:] + err[-2000:]
    log = read_log(out / 'log.txt')
    assert [r['epoch'] for r in log] == [0, 1] and 0 <= log[-1]['test_miou'] <= 100
    code, stdout, err = run_seg(capsys, [*SEG, '--data_path', data, '--device', 'cuda', '--eval', '--resume',
                                         out / 'checkpoint.pth', '--output_dir', ''])
    assert code == 0 and miou_line(stdout).startswith('mIoU'), stdout[-2000:] + err[-2000:]
