"""CUDA checks; every test is skipped without a GPU (the dense-transfer ones: tests/test_cuda_dense.py). First run
on an H200 (torch 2.11) on 2026-12-04: what passed and what was fixed after it is in BENCHMARKS.md, "CUDA tests on
the H200".

Tolerances, with the reason for each:
- bf16 vs fp32 losses: |l - l32| <= 2e-2 |l32| + 5e-3. bf16 keeps 8 significant bits (relative rounding 2^-9);
  over a few layers the prediction's error is about 1e-2 relative, which a mean squared error over thousands of
  elements averages to far less; the InfoNCE logits are divided by tau = 0.07, which multiplies their error by 14.
- fp16 vs fp32: 5e-3 |l32| + 2e-3 (11 significant bits).
- gradients (all parameters as one vector): cosine >= 0.99 (bf16) / 0.999 (fp16) to the fp32 gradient; single
  elements are not compared (a weight whose true gradient is about 0 gets a gradient of rounding noise).
- forced FlashAttention kernel vs fp32 math on the same bf16 inputs: torch.testing's bf16 rtol 1.6e-2 with
  atol 1e-2 (the output is rounded to bf16, |out| < 3); gradients by relative norm 2e-2.
- torch.compile vs eager in fp32 (TF32 off): loss 1e-4 relative, gradients 1e-3 relative norm (only the order
  of floating-point reductions differs).
- SDPA with a bf16 attention bias (segmentation, detection's decomposed relative position) vs fp32 math on the
  same bf16 inputs: as the flash kernel above.
- Mask R-CNN in bf16 vs fp32: only the RPN's losses are compared (as the losses above), since the RoI heads
  sample from proposals whose order bf16 scores change.
Process groups over NCCL (torchrun with 2 GPUs, a one-process NCCL world): tests/test_cuda_ddp.py.
The fp32 references run with torch.set_float32_matmul_precision('highest'), since the training scripts turn
TF32 on for CUDA (misc.cuda_setup).
"""
import argparse
import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import engine_pretrain
import main_pretrain
import masking
import models_cmae
import models_mae
import util.misc as misc
from conftest import PICO, read_log, run_script
from cuda_common import (TOL, amp_args, close, cuda_syncs, data_path, exact_fp32, flat_grads,  # noqa: F401
                         restore_cuda_flags, sdpa_as_math)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

VARIANTS = {  # name: (model kwargs, views, kept_mask_ratio)
    'mae': ({}, 1, None),
    'cross25': ({'cross_mae': True, 'weight_fm': True, 'use_input': True}, 1, 0.25),
    'cmae': ({'proj_hidden_dim': 256, 'proj_dim': 64}, 2, None),
}


def build(variant, seed=0):
    """mae_vit_micro_patch8 at 64 px (encoder heads of 64, decoder heads of 32), norm_pix_loss, on CUDA."""
    kwargs, _, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    if variant == 'cmae':
        model = models_cmae.cmae_model('mae_vit_micro_patch8', norm_pix_loss=True, **kwargs)
    else:
        model = models_mae.mae_vit_micro_patch8(norm_pix_loss=True, **kwargs)
    return model.cuda()


def inputs(variant, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g)
    noise = torch.rand(n, 64, generator=g)
    views = [x, 0.9 * x.roll(3, dims=-1)] if VARIANTS[variant][1] == 2 else [x]
    return [v.cuda() for v in views], noise.cuda()


def loss_of(model, views, noise, variant, amp):
    with misc.autocast(amp_args(amp)):
        return model(*views, mask_ratio=0.75, noise=noise, kept_mask_ratio=VARIANTS[variant][2])[0]


def train_step(variant, amp):
    """One step as the engine takes it: autocast, GradScaler for fp16 (init scale 2^10, so that the first step
    is not skipped for an overflow), fused AdamW. -> (loss before, loss after, gradient, scaler)"""
    model = build(variant)
    views, noise = inputs(variant)
    opt = misc.adamw([p for p in model.parameters() if p.requires_grad], 'cuda', lr=1e-4, betas=(0.9, 0.95))
    assert opt.defaults['fused']
    scaler = torch.amp.GradScaler('cuda', init_scale=2. ** 10, enabled=amp == 'fp16')
    loss = loss_of(model, views, noise, variant, amp)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = flat_grads(model)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    if variant == 'cmae':
        model.update_target(0.996)
    with torch.no_grad():
        after = loss_of(model, views, noise, variant, amp)
    return loss.item(), after.item(), grads, scaler


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_one_training_step_in_half_precision_matches_fp32(exact_fp32, variant, amp):
    ref_before, ref_after, ref_grads, _ = train_step(variant, 'none')
    before, after, grads, scaler = train_step(variant, amp)
    tol = TOL[amp]
    assert close(before, ref_before, tol['rtol'], tol['atol']), (before, ref_before)
    assert close(after, ref_after, tol['rtol'], tol['atol']), (after, ref_after)
    assert torch.isfinite(grads).all()
    assert F.cosine_similarity(grads, ref_grads, dim=0).item() >= tol['cos']
    if amp == 'fp16':
        assert scaler.get_scale() == 2. ** 10  # no overflow: the step was taken, with the loss scaled


def test_adamw_is_fused_on_cuda_and_tf32_is_on_for_fp32():
    model = torch.nn.Linear(4, 4).cuda()
    assert misc.adamw(model.parameters(), 'cuda', lr=1e-3).defaults['fused']
    assert not misc.adamw(torch.nn.Linear(4, 4).parameters(), 'cpu', lr=1e-3).defaults['fused']
    misc.cuda_setup(torch.device('cuda'))
    assert torch.get_float32_matmul_precision() == 'high' and torch.backends.cudnn.benchmark


@pytest.mark.parametrize('lq,lk,d', [(17, 17, 64), (197, 197, 64), (49, 17, 32), (50, 50, 80)])
def test_sdpa_flash_kernel_matches_math(exact_fp32, lq, lk, d):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator(device='cuda').manual_seed(0)
    q, k, v = (torch.randn(4, 6, n, d, device='cuda', generator=g).bfloat16().requires_grad_() for n in (lq, lk, lk))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # an error, not a fallback, if the flash kernel cannot run
        out = F.scaled_dot_product_attention(q, k, v)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = models_mae.attention(q32, k32, v32, 'math')
    torch.testing.assert_close(out.float(), ref, rtol=1.6e-2, atol=1e-2)
    up = torch.randn(out.shape, device='cuda', generator=g)
    out.backward(up.bfloat16())
    ref.backward(up)
    for a, b in ((q, q32), (k, k32), (v, v32)):
        assert ((a.grad.float() - b.grad).norm() / b.grad.norm()).item() < 2e-2


def assert_backends_agree(variant, a, b):
    """One bf16 step with attention backend a and with b: losses within bf16 tolerance, gradients aligned."""
    views, noise = inputs(variant)
    losses, grads = {}, {}
    for backend in (a, b):
        model = build(variant)
        model.set_attention_backend(backend)
        loss = loss_of(model, views, noise, variant, 'bf16')
        loss.backward()
        losses[backend], grads[backend] = loss.item(), flat_grads(model)
    assert close(losses[a], losses[b], 1e-2, 2e-3), losses
    assert F.cosine_similarity(grads[a], grads[b], dim=0).item() >= 0.99


@pytest.mark.parametrize('variant', ['mae', 'cross25'])
def test_flash_backend_without_the_package_is_sdpa_flash(monkeypatch, variant):
    """backend 'flash' with flash_attn absent runs SDPA held to its flash kernel; equal to 'math' in bf16."""
    monkeypatch.setattr(models_mae, 'flash_attn_func', None)
    assert_backends_agree(variant, 'flash', 'math')


@pytest.mark.skipif(models_mae.flash_attn_func is None, reason='flash-attn is not installed')
@pytest.mark.parametrize('variant', ['mae', 'cross25'])
def test_flash_attn_package_matches_sdpa(variant):
    g = torch.Generator(device='cuda').manual_seed(0)
    q, k, v = (torch.randn(4, 6, n, 64, device='cuda', generator=g).bfloat16() for n in (49, 17, 17))
    torch.testing.assert_close(models_mae.attention(q, k, v, 'flash').float(),
                               F.scaled_dot_product_attention(q, k, v).float(), rtol=1.6e-2, atol=1e-2)
    assert_backends_agree(variant, 'flash', 'sdpa')


@pytest.mark.parametrize('variant', ['mae', 'cross25', 'cmae'])
def test_compile_matches_eager(exact_fp32, variant):
    views, noise = inputs(variant)
    eager = build(variant)
    loss_e = loss_of(eager, views, noise, variant, 'none')
    loss_e.backward()
    compiled_model = build(variant)
    compiled = torch.compile(compiled_model)
    loss_c = loss_of(compiled, views, noise, variant, 'none')
    loss_c.backward()
    assert close(loss_c.item(), loss_e.item(), 1e-4, 0), (loss_c.item(), loss_e.item())
    ge, gc = flat_grads(eager), flat_grads(compiled_model)
    assert ((gc - ge).norm() / ge.norm()).item() < 1e-3


@pytest.mark.parametrize('variant,amp', [('mae', 'bf16'), ('mae', 'fp16'), ('cross25', 'bf16'), ('cmae', 'bf16')])
def test_hot_path_has_no_cuda_sync(variant, amp):
    """torch.cuda.set_sync_debug_mode('warn') flags every synchronising CUDA call made by PyTorch (blocking
    copies, .item(), stream syncs): 20 steps at --print_freq 10 may make 3, the reads at steps 0, 10 and 19.
    fp16 covers GradScaler + fused AdamW (found_inf stays on the device)."""
    model = build(variant)
    _, views, kept = VARIANTS[variant]
    opt = misc.adamw([p for p in model.parameters() if p.requires_grad], 'cuda', lr=1e-4, betas=(0.9, 0.95))
    args = argparse.Namespace(device=torch.device('cuda'), amp=amp, accum_iter=1, max_steps_per_epoch=0, print_freq=10,
                              no_step_log=False, clip_grad=None, mask_ratio=0.75, kept_mask_ratio=kept, lr=1e-4,
                              min_lr=0., warmup_epochs=0, epochs=2, distributed=False)
    x = torch.randn(16, 3, 64, 64)
    batch = ([x.pin_memory(), x.roll(3, -1).pin_memory()] if views == 2 else x.pin_memory(), torch.zeros(16))
    mask_gen = masking.MaskGenerator('random', 8, 0.75, device='cuda')
    scaler = misc.LossScaler('cuda', enabled=amp == 'fp16')
    after = (lambda e: model.update_target(0.996)) if variant == 'cmae' else None
    engine_pretrain.train_one_epoch(model, [batch] * 3, opt, 0, scaler, args, mask_gen=mask_gen, after_step=after)
    _, syncs = cuda_syncs(lambda: engine_pretrain.train_one_epoch(model, [batch] * 20, opt, 1, scaler, args,
                                                                  mask_gen=mask_gen, after_step=after,
                                                                  stop_flag=misc.StopFlag()))
    assert len(syncs) <= 3, syncs


def test_cuda_checkpoint_resumes_on_cpu_and_back(data_path, tmp_path):
    out = tmp_path / 'ckpt'
    common = [*PICO, '--data_path', data_path, '--subset', 128, '--batch_size', 32, '--max_steps_per_epoch', 2,
              '--warmup_epochs', 0, '--vis_freq', 0, '--output_dir', out]
    run_script(main_pretrain, [*common, '--device', 'cuda', '--epochs', 1])  # bf16, fused AdamW: CUDA tensors saved
    state = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)
    assert state['epoch'] == 0
    run_script(main_pretrain, [*common, '--device', 'cpu', '--epochs', 2])  # resumes on the CPU (fp32, foreach)
    # back on CUDA in fp16 from the CPU's (non-fused) optimizer state: the fused AdamW must stay fused for GradScaler
    run_script(main_pretrain, [*common, '--device', 'cuda', '--amp', 'fp16', '--epochs', 3])
    log = read_log(out / 'log.txt')
    assert [r['epoch'] for r in log] == [0, 1, 2] and all(math.isfinite(r['train_loss']) for r in log)


def test_pretrain_50_steps_on_real_data_loss_falls(data_path, tmp_path):
    out = tmp_path / 'run'
    run_script(main_pretrain, ['--model', 'mae_vit_micro_patch8', '--input_size', 64, '--device', 'cuda',
                               '--data_path', data_path, '--subset', 1600, '--batch_size', 64, '--epochs', 2,
                               '--max_steps_per_epoch', 25, '--warmup_epochs', 1, '--blr', 1e-2,
                               '--num_workers', min(8, os.cpu_count() or 1), '--print_freq', 10, '--vis_freq', 0,
                               '--output_dir', out])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next(out.glob('events.out.tfevents*'))))
    events.Reload()
    losses = [e.value for e in events.Scalars('train_loss')]
    assert len(losses) == 50 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    log = read_log(out / 'log.txt')
    assert log[1]['train_loss'] < log[0]['train_loss']


# ---------------------------------------------------------------- review #21 (issue items 3, 6, 7, 11, 12)

class Images:
    def add_image(self, tag, img, step):
        pass

    add_images = add_image


def test_tensorboard_figure_leaves_the_cuda_generator_alone():
    """The figure's masks come from private generators: the CUDA default generator (which the `random` masks
    of training draw from) keeps its state, and the figure's noise is what the old re-seeding drew."""
    from util.visualize import figure_noise, log_to_tensorboard
    model = build('mae')
    imgs = inputs('mae', n=2)[0][0]
    for mask_type in ('random', 'block2x2'):
        mask_gen = masking.MaskGenerator(mask_type, 8, 0.75, seed=3, device='cuda')
        state = torch.cuda.get_rng_state()
        expected = torch.rand(4, device='cuda')
        torch.cuda.set_rng_state(state)
        log_to_tensorboard(Images(), model, imgs, mask_gen, 0.75, None, epoch=0, seed=0)
        assert torch.equal(torch.cuda.get_rng_state(), state), mask_type
        assert torch.equal(torch.rand(4, device='cuda'), expected), mask_type
    noise = figure_noise(masking.MaskGenerator('random', 8, 0.75, device='cuda'), 2, 0.75, 7, torch.device('cuda'))
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(7)
        assert torch.equal(noise, torch.rand(2, 64, device='cuda'))


@pytest.mark.parametrize('mask_type', ['green', 'block', 'block2x2'])
def test_mask_generator_on_cuda_equals_cpu_without_a_sync(mask_type):
    """The pinned non-blocking copies (and the on-device gather of the colored patterns): 10 draws queued
    without waiting -- each staging buffer must live until its copy has run -- equal the CPU generator's."""
    cpu = masking.MaskGenerator(mask_type, 8, 0.75, seed=3)
    gpu = masking.MaskGenerator(mask_type, 8, 0.75, seed=3, device='cuda')
    draws, syncs = cuda_syncs(lambda: [gpu(16) for _ in range(10)])
    assert syncs == []
    assert all(d.is_cuda for d in draws)
    assert torch.equal(torch.stack(draws).cpu(), torch.stack([cpu(16) for _ in range(10)]))


@pytest.mark.parametrize('grid', [(4, 4), (6, 5)])
def test_segmentation_bf16_relative_bias_through_sdpa_matches_math(exact_fp32, monkeypatch, grid):
    """models_seg.Attention in bf16: SDPA with the relative position bias as attn_mask (17 or 31 tokens: an
    unaligned mask) against fp32 math attention on the same bf16 q, k, v and bias; outputs within bf16
    tolerance (rtol 1.6e-2, atol 1e-2), the bias table's gradient within 2e-2 relative norm (bf16 has 8
    significant bits; the gradient sums over the batch). Off the training grid the cached index is on CUDA."""
    import models_seg
    torch.manual_seed(0)
    attn = models_seg.Attention(96, 3, rel_pos_grid=(4, 4)).cuda()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()  # std 1: a bias that changes the attention
    x = torch.randn(4, 1 + grid[0] * grid[1], 96, device='cuda')
    outs, grads = [], []
    for ref in (False, True):
        with monkeypatch.context() as m:
            if ref:
                m.setattr(models_seg.F, 'scaled_dot_product_attention', sdpa_as_math)
            attn.zero_grad()
            with torch.autocast('cuda', dtype=torch.bfloat16):
                out = attn(x, grid)
            out.float().square().sum().backward()
        outs.append(out.float())
        grads.append(attn.relative_position_bias_table.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1.6e-2, atol=1e-2)
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 2e-2
    if grid != (4, 4):
        assert models_seg.cached_relative_position_index(*grid, torch.device('cuda', 0)).is_cuda


def image_folder(root, classes=2, per_class=12, size=40):
    """A tiny ImageFolder (train/, val/): each class tints another channel."""
    import numpy as np
    from PIL import Image
    rng = np.random.RandomState(0)
    for split in ('train', 'val'):
        for c in range(classes):
            d = Path(root) / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(per_class):
                img = rng.randint(0, 60, (size, size, 3)).astype(np.uint8)
                img[..., c % 3] += 150
                Image.fromarray(img).save(d / f'{i}.png')
    return root


@pytest.mark.parametrize('script', ['main_finetune', 'main_linprobe'])
def test_finetune_and_linprobe_steps_on_cuda(tmp_path, script):
    """Two steps and the evaluation of each script on CUDA (bf16, fused AdamW / LARS; fine-tuning with mixup
    and cutmix), on a synthetic image folder (the device machine may not have the test data)."""
    import importlib
    data = image_folder(tmp_path / 'data')
    extra = ['--mixup', 0.8, '--cutmix', 1.0] if script == 'main_finetune' else []
    run_script(importlib.import_module(script), [
        '--model', 'vit_pico_patch4', '--input_size', 32, '--num_workers', 0, '--cache_data', '--data_path', data,
        '--nb_classes', 2, '--batch_size', 8, '--epochs', 1, '--max_steps_per_epoch', 2, '--warmup_epochs', 0,
        '--device', 'cuda', '--output_dir', tmp_path / 'out', *extra])
    log = read_log(tmp_path / 'out' / 'log.txt')
    assert len(log) == 1 and math.isfinite(log[0]['train_loss']) and 0 <= log[0]['test_acc1'] <= 100


def test_cpu_optimizer_state_resumes_into_fused_cuda_adamw():
    """A plain CPU AdamW's state loaded into the fused CUDA one (what a CPU run's checkpoint resumed on a GPU
    does): the step counters go to the GPU, where the fused kernel needs them, and the next step runs and equals
    the CPU one's to fp32 rounding (one step of size ~lr; the fused kernel rounds in another order)."""
    torch.manual_seed(0)
    cpu = torch.nn.Linear(8, 4)
    gpu = copy.deepcopy(cpu).cuda()
    opt_cpu = misc.adamw(cpu.parameters(), 'cpu', lr=1e-2)
    for _ in range(2):
        cpu(torch.randn(3, 8)).square().sum().backward()
        opt_cpu.step()
    gpu.load_state_dict(cpu.state_dict())
    opt_gpu = misc.adamw(gpu.parameters(), 'cuda', lr=1e-2)
    misc.load_optimizer_state(opt_gpu, opt_cpu.state_dict())
    assert opt_gpu.param_groups[0]['fused'] is True
    assert all(s['step'].is_cuda for s in opt_gpu.state.values())
    x = torch.randn(3, 8)
    for model, opt, dev in ((cpu, opt_cpu, 'cpu'), (gpu, opt_gpu, 'cuda')):
        opt.zero_grad()
        model(x.to(dev)).square().sum().backward()
        opt.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)

