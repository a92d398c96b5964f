import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import models_cmae
from conftest import PICO, read_log, torchrun
from util.datasets import TwoViewTransform


def small_cmae(**kw):
    torch.manual_seed(0)
    return models_cmae.cmae_model('mae_vit_pico_patch4', proj_hidden_dim=64, proj_dim=16, **kw)


def test_ema_update_formula_and_gradients():
    model = small_cmae()
    pairs = model.target_pairs()
    assert len(pairs) == len(list(model.target_encoder.parameters())) + len(list(model.target_projector.parameters()))
    for t, o in pairs:
        assert torch.equal(t, o) and not t.requires_grad  # starts as a copy
    imgs, target = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _, _, logs = model(imgs, target, mask_ratio=0.65)
    loss.backward()
    target_ids = {id(t) for t, _ in pairs}
    for n, p in model.named_parameters():
        if id(p) in target_ids:
            assert p.grad is None, n
        elif p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert set(logs) == {'loss_pixel', 'loss_contrastive'}
    with torch.no_grad():
        for _, o in pairs:
            o.add_(torch.randn_like(o))
    before = [(t.clone(), o.clone()) for t, o in pairs]
    model.update_target(0.9)
    for (t, o), (t0, o0) in zip(pairs, before):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * o0, atol=1e-7)


def test_target_branch_sees_the_whole_view_without_norm():
    model = small_cmae().eval()
    model.target_encoder.load_state_dict({k: v for k, v in model.state_dict().items()
                                          if k.split('.')[0] in ('cls_token', 'pos_embed', 'patch_embed', 'blocks')})
    x = torch.randn(2, 3, 32, 32)
    feats = model.patch_embed(x) + model.pos_embed[:, 1:]
    tokens = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), feats], 1)
    for blk in model.blocks:
        tokens = blk(tokens)
    assert torch.allclose(model.target_encoder(x), tokens[:, 1:].mean(1), atol=1e-6)


def test_infonce_single_process():
    model = small_cmae(temperature=0.07)
    q, k = torch.randn(6, 16), torch.randn(6, 16)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    logits = qn @ kn.T / 0.07
    expected = 2 * 0.07 * -(logits.diag() - logits.logsumexp(dim=1)).mean()
    assert torch.allclose(model.contrastive_loss(q, k), expected, atol=1e-6)
    assert torch.allclose(expected, 2 * 0.07 * F.cross_entropy(logits, torch.arange(6)), atol=1e-6)



def test_infonce_logits_are_fp32_under_bf16_autocast():
    """Under autocast the matmul of the logits ran in bf16 (8 significant bits, an error of about 2^-9 * 1/tau
    = 0.03 in each logit). Now the loss is computed in fp32 from the (bf16) features: it equals the fp32
    computation from the same features to fp32 rounding (|logit| <= 1/tau = 14.3: about 14 * 6e-8 absolute
    per logit, below 1e-6 in the loss after the 2 * tau scale)."""
    model = small_cmae(temperature=0.07)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(8, 16, generator=g).bfloat16() for _ in range(2))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = model.contrastive_loss(q, k)
    qn, kn = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    expected = 2 * 0.07 * F.cross_entropy(qn @ kn.T / 0.07, torch.arange(8))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, labels = model.contrastive_logits(q, k)
    assert logits.dtype == torch.float32 and torch.equal(labels, torch.arange(8))
    torch.testing.assert_close(logits, qn @ kn.T / 0.07, rtol=1e-6, atol=1e-5)
    # through the model: the logged contrastive loss is fp32 too
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, _, _, logs = model(torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g))
    assert logs['loss_contrastive'].dtype == torch.float32


def test_infonce_gathers_the_global_batch():
    out = torchrun('tests/dist_contrastive_check.py', [])
    assert out.stdout.count('OK') == 2


def test_views_are_shifted_and_share_the_flip():
    t = TwoViewTransform(64, color_aug=False)
    assert t.big == 73 and t.max_shift == 9  # 256/224 and 31/224 of 64 px
    img = torch.randint(0, 255, (t.big, t.big, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pil = Image.fromarray(img.numpy())
    from torchvision import transforms
    t.crop = transforms.RandomHorizontalFlip()  # known content: only the flip stays random
    shifts, flips = set(), set()
    torch.manual_seed(0)
    for _ in range(60):
        online, target, (dh, dw) = t.views(pil)
        online, target = torch.from_numpy(np.array(online)), torch.from_numpy(np.array(target))
        flipped = torch.equal(online, img.flip(1)[:64, :64])
        base = img.flip(1) if flipped else img
        assert torch.equal(online, base[:64, :64])
        assert torch.equal(target, base[dh:dh + 64, dw:dw + 64])  # same flip, shifted by (dh, dw)
        assert 0 <= dh <= 9 and 0 <= dw <= 9
        shifts.add((dh, dw))
        flips.add(flipped)
    assert flips == {True, False} and len(shifts) > 20
    views = TwoViewTransform(32)(Image.fromarray(img.numpy()))
    assert [v.shape for v in views] == [(3, 32, 32), (3, 32, 32)]


def test_contrastive_pretraining_under_torchrun(data_path, tmp_path):
    out = tmp_path / 'cmae'
    torchrun('main_pretrain.py', [*PICO, '--data_path', data_path, '--subset', 256, '--batch_size', 16, '--epochs', 3,
                                  '--warmup_epochs', 1, '--blr', 2e-3, '--max_steps_per_epoch', 4, '--contrastive',
                                  '--mask_type', 'block2x2', '--mask_ratio', 0.65, '--momentum_cosine',
                                  '--proj_hidden_dim', 128, '--proj_dim', 32, '--output_dir', out])
    log = read_log(out / 'log.txt')
    assert all('train_loss_pixel' in r and 'train_loss_contrastive' in r for r in log)
    assert log[-1]['train_loss'] < log[0]['train_loss']


def test_cmae_checkpoint_feeds_knn_linprobe_and_finetune(data_path, tmp_path):
    import main_knn
    import main_linprobe
    from conftest import run_script
    model = small_cmae()
    path = tmp_path / 'cmae.pth'
    torch.save({'model': model.state_dict(), 'epoch': 0}, path)
    common = ['--model', 'vit_pico_patch4', '--input_size', 32, '--data_path', data_path, '--subset', 64,
              '--val_subset', 30, '--cache_data', '--num_workers', 0]
    rows = main_knn.main(main_knn.get_args_parser().parse_args([str(a) for a in [*common, '--checkpoint', path, '--ks', 5]]))
    assert 0 <= rows[0][1][5][0] <= 100
    run_script(main_linprobe, [*common, '--finetune', path, '--nb_classes', 10, '--batch_size', 16, '--epochs', 1,
                               '--max_steps_per_epoch', 1, '--warmup_epochs', 0, '--output_dir', tmp_path / 'lp'])
    ft = tmp_path / 'lp' / 'checkpoint.pth'
    rows = main_knn.main(main_knn.get_args_parser().parse_args([str(a) for a in [*common, '--checkpoint', ft, '--ks', 5]]))
    assert 0 <= rows[0][1][5][0] <= 100  # a fine-tuned (probe) checkpoint works for k-NN too
