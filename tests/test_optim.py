"""Learning-rate schedule, weight-decay and layer-decay groups, LARS, CrossMAE lr scaling (SPEC §1.3-1.5, §2)."""
import argparse
import math

import pytest
import torch

import main_pretrain
import models_mae
import models_vit
import util.misc as misc
from util.lars import LARS
from util.lr_decay import param_groups_lrd, param_groups_weight_decay
from util.lr_sched import adjust_learning_rate, momentum_at


def test_lr_schedule_matches_the_formula():
    args = argparse.Namespace(lr=1e-3, min_lr=1e-5, warmup_epochs=4, epochs=10)
    opt = torch.optim.SGD([{'params': [torch.zeros(1, requires_grad=True)]},
                           {'params': [torch.zeros(1, requires_grad=True)], 'lr_scale': 0.5}], lr=0)
    steps = 25
    assert adjust_learning_rate(opt, 0.0, args) == 0.0  # warmup start
    assert adjust_learning_rate(opt, 2 + 10 / steps, args) == pytest.approx(1e-3 * (2.4 / 4))
    assert adjust_learning_rate(opt, 4.0, args) == pytest.approx(1e-3)  # warmup end
    last = 9 + (steps - 1) / steps  # the final step
    expected = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (last - 4) / 6))
    assert adjust_learning_rate(opt, last, args) == pytest.approx(expected)
    assert opt.param_groups[0]['lr'] == pytest.approx(expected) and opt.param_groups[1]['lr'] == pytest.approx(expected / 2)


def test_pretrain_weight_decay_groups():
    model = models_mae.mae_vit_pico_patch4()
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay['weight_decay'] == 0 and decay['weight_decay'] == 0.05
    decayed = {names[id(p)] for p in decay['params']}
    assert {'cls_token', 'mask_token', 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight'} <= decayed  # ndim >= 2
    assert all(not n.endswith('.bias') and 'norm' not in n for n in decayed)
    assert 'pos_embed' not in decayed and 'pos_embed' not in {names[id(p)] for p in no_decay['params']}  # frozen


def test_layer_decay_groups():
    model = models_vit.vit_pico_patch4(num_classes=10)  # depth 4 -> num_layers 5
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.65)
    names = {id(p): n for n, p in model.named_parameters()}
    scale, wd = {}, {}
    for g in groups:
        for p in g['params']:
            scale[names[id(p)]], wd[names[id(p)]] = g['lr_scale'], g['weight_decay']
    assert scale['cls_token'] == scale['pos_embed'] == scale['patch_embed.proj.weight'] == pytest.approx(0.65 ** 5)
    for k in range(4):
        assert scale[f'blocks.{k}.attn.qkv.weight'] == pytest.approx(0.65 ** (5 - (k + 1)))
    assert scale['head.weight'] == scale['fc_norm.weight'] == 1.0
    assert wd['pos_embed'] == wd['cls_token'] == wd['blocks.0.norm1.weight'] == wd['head.bias'] == 0
    assert wd['blocks.0.attn.qkv.weight'] == wd['head.weight'] == wd['patch_embed.proj.weight'] == 0.05


def test_lars_step_matches_the_rule():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt = LARS([w, b], lr=0.1, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    dw = gw + 0.01 * w0
    q = 0.001 * w0.norm() / dw.norm()
    assert torch.allclose(w.detach(), w0 - 0.1 * dw * q)
    assert torch.allclose(b.detach(), b0 - 0.1 * gb)  # 1-D: no decay, no trust ratio
    w.grad, b.grad = gw, gb
    opt.step()
    mu = 0.9 * (dw * q) + (gw + 0.01 * (w0 - 0.1 * dw * q)) * (0.001 * (w0 - 0.1 * dw * q).norm() / (gw + 0.01 * (w0 - 0.1 * dw * q)).norm())
    assert torch.allclose(w.detach(), w0 - 0.1 * dw * q - 0.1 * mu, atol=1e-6)


@pytest.mark.parametrize('flags,scale', [([], 1 / 3), (['--inverse_lr'], 3.0), (['--no_lr_scale'], 1.0)])
def test_crossmae_lr_scaling(flags, scale):
    args = main_pretrain.get_args_parser().parse_args(['--cross_mae', '--mask_ratio', '0.75', '--kept_mask_ratio', '0.25', *flags])
    assert main_pretrain.lr_scale(args) == pytest.approx(scale)
    assert main_pretrain.lr_scale(main_pretrain.get_args_parser().parse_args([])) == 1.0


def test_momentum_schedule():
    assert momentum_at(3.3, 0.996, 10) == 0.996
    assert momentum_at(0, 0.996, 10, cosine=True) == pytest.approx(0.996)
    assert momentum_at(5, 0.996, 10, cosine=True) == pytest.approx(0.998)
    assert momentum_at(10, 0.996, 10, cosine=True) == pytest.approx(1.0)


@pytest.mark.parametrize('loader', ['plain', 'helper'])
def test_resumed_fused_adamw_stays_fused(loader):
    """A checkpoint of a non-fused AdamW (written on CPU, or by an older run) loaded into the fused one that CUDA
    runs build: load_state_dict alone copies fused=None over, and an fp16 GradScaler step then fails."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 2)
    m = model()
    plain = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(3, 4)).sum().backward()
    plain.step()
    m2 = model()
    fused = torch.optim.AdamW(m2.parameters(), lr=1e-3, fused=True)  # fused AdamW also runs on CPU
    scaler = torch.amp.GradScaler('cpu')
    scaler.scale(m2(torch.randn(3, 4)).sum()).backward()
    if loader == 'plain':
        fused.load_state_dict(plain.state_dict())
        with pytest.raises(AssertionError):
            scaler.step(fused)
    else:
        misc.load_optimizer_state(fused, plain.state_dict())
        scaler.step(fused)
        assert fused.param_groups[0]['fused'] is True
        assert float(fused.state[m2.weight]['step']) == 2  # the resumed step count, one more step taken


@pytest.mark.parametrize('flag', ['fused', 'capturable'])
def test_resumed_step_counters_live_where_the_fused_kernel_needs_them(flag):
    """A checkpoint of a plain CPU AdamW resumed by a fused (or capturable) one: torch places `state['step']` by
    the saved groups' flags, so without this run's flags it would stay a host tensor, which CUDA's fused kernel
    refuses. Parameters on the 'meta' device stand in for CUDA ones."""
    p = torch.nn.Parameter(torch.randn(3))
    plain = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(3)
    plain.step()
    q = torch.nn.Parameter(torch.empty(3, device='meta'))
    resumed = torch.optim.AdamW([q], lr=0.1)
    resumed.param_groups[0][flag] = True  # as on CUDA; the meta device has no fused kernel to construct with
    misc.load_optimizer_state(resumed, plain.state_dict())
    state = resumed.state[q]
    assert state['step'].device.type == 'meta' and state['step'].dtype == torch.float32
    assert state['exp_avg'].device.type == 'meta' and resumed.param_groups[0][flag] is True
    assert plain.state_dict()['param_groups'][0][flag] in (None, False)  # the checkpoint itself is not changed
