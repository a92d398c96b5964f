"""CUDA checks of the process-group paths; every test is skipped without a GPU (see tests/test_cuda.py).

With one GPU the torchrun tests over NCCL are skipped (a world of one tests no collective); the test_one_gpu_*
tests run our collective code paths on a one-process NCCL group instead: DDP's bucket all-reduce, SyncBatchNorm's
kernels, the metric reads, CMAE's gather of the keys and k-NN's feature gather.

Tolerances: SyncBatchNorm + DDP in a world of one vs the plain model in fp32: loss 1e-5 relative, gradients 1e-4
relative norm (cuDNN's backward may accumulate in another order); SyncBatchNorm's kernels on one rank vs
batch_norm: 1e-5 (the same arithmetic, another kernel).
"""
import argparse
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import engine_pretrain
import masking
import models_cmae
import models_mae
import util.meters as meters
import util.misc as misc
from conftest import PICO, read_log, torchrun
from cuda_common import close, cuda_syncs, data_path, exact_fp32, flat_grads, restore_cuda_flags  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


MULTI_GPU = pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 GPUs: with one, torchrun runs a world of '
                               'one and no collective is tested (the one-GPU paths: test_one_gpu_* below)')


@MULTI_GPU
def test_torchrun_nccl_cmae(data_path, tmp_path):
    """DDP over NCCL on every GPU present: InfoNCE's all_gather, the windowed all-reduce of the metrics."""
    n = torch.cuda.device_count()
    out = tmp_path / 'ddp'
    res = torchrun('main_pretrain.py', [*PICO, '--device', 'cuda', '--data_path', data_path, '--subset', 512,
                                        '--batch_size', 16, '--epochs', 2, '--warmup_epochs', 1,
                                        '--max_steps_per_epoch', 4, '--print_freq', 2, '--contrastive',
                                        '--mask_type', 'block2x2', '--proj_hidden_dim', 64, '--proj_dim', 16,
                                        '--output_dir', out], nproc=n)
    assert res.stdout.count('nccl)') == n, res.stdout[-2000:]
    log = read_log(out / 'log.txt')
    assert len(log) == 2 and all(math.isfinite(r['train_loss']) for r in log)


@MULTI_GPU
def test_torchrun_nccl_compile(data_path, tmp_path):
    """torch.compile of the DDP-wrapped model (the order main_pretrain uses), with gradient accumulation."""
    n = torch.cuda.device_count()
    out = tmp_path / 'ddp_compile'
    torchrun('main_pretrain.py', [*PICO, '--device', 'cuda', '--data_path', data_path, '--subset', 512,
                                  '--batch_size', 16, '--accum_iter', 2, '--epochs', 1, '--warmup_epochs', 0,
                                  '--max_steps_per_epoch', 6, '--print_freq', 2, '--compile', '--output_dir', out],
             nproc=n)
    log = read_log(out / 'log.txt')
    assert len(log) == 1 and math.isfinite(log[0]['train_loss'])


def tiny_upernet():
    import models_seg
    return models_seg.UperNetViT(5, img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, channels=16,
                                 aux_channels=8, rel_pos_bias=True).cuda()


@pytest.fixture
def nccl_world_of_one(tmp_path):
    """A one-process NCCL group here (what torchrun --nproc_per_node=1 sets up, without a new interpreter):
    DDP's bucket all-reduce, SyncBatchNorm's kernels and our gathers then run over NCCL on one GPU."""
    import torch.distributed as dist
    torch.cuda.set_device(0)
    dist.init_process_group('nccl', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1,
                            device_id=torch.device('cuda', 0))
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_one_gpu_nccl_collective_paths(nccl_world_of_one, monkeypatch):
    """Our collectives are skipped in a world of one. Here their branches are entered on the one-rank NCCL
    group with the world size faked to 2 where it selects the branch: the all-reduce then sums one rank's
    values and the mean divides by the faked 2 -- so the devices, dtypes and copies (float64 stacks, host
    numbers sent non-blocking, a bool from a reduced flag, the autograd of the gather) go through NCCL."""
    import util.dist_ops as dist_ops
    for module in (misc, meters):  # meters imports it by name (tests/test_distributed.py: the same on gloo)
        monkeypatch.setattr(module, 'get_world_size', lambda: 2)
    m = meters.DeviceMeters()  # StepReader's read under DDP: read(reduce=True)
    m.update(loss=torch.tensor(3.0, device='cuda'), n=2)
    m.update(loss=torch.tensor(5.0, device='cuda', dtype=torch.bfloat16), stop=1.0)
    assert m.read(reduce=True) == {'loss': [1.5, 2.5], 'stop': [0.5]}
    assert misc.all_reduce_mean(4.0) == 2.0
    flag = misc.StopFlag()
    assert flag.should_stop(torch.device('cuda')) is False
    flag.set = True
    assert flag.should_stop(torch.device('cuda')) is True
    logger = meters.MetricLogger()
    reader = meters.StepReader(argparse.Namespace(distributed=True), 0, 10, logger, stop_flag=flag)
    reader.record(0, 1e-3, True, loss=torch.tensor(4.0, device='cuda'))
    assert reader.read() is True and logger.meters['loss'].value == 2.0  # the flag and the loss in one all-reduce
    meter = meters.SmoothedValue()
    meter.update(2.0, n=3)
    meter.synchronize_between_processes()  # sums (count, total) over the ranks
    assert (meter.count, meter.total) == (3, 6.0)
    monkeypatch.setattr(dist_ops, '_active', lambda: True)  # CMAE's gather of the keys
    x = torch.randn(4, 8, device='cuda', requires_grad=True)
    y = dist_ops.all_gather_keep_local_grad(x)
    assert torch.equal(y, x)
    (2 * y).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.))
    model = models_cmae.cmae_model('mae_vit_micro_patch8', proj_hidden_dim=64, proj_dim=16).cuda()
    q, k = torch.randn(2, 6, 16, device='cuda').unbind(0)
    gathered = model.contrastive_loss(q, k)
    monkeypatch.setattr(dist_ops, '_active', lambda: False)
    assert torch.equal(gathered, model.contrastive_loss(q, k))


def test_one_gpu_syncbn_upernet_ddp_step(nccl_world_of_one, exact_fp32):
    """main_segmentation's distributed CUDA setup (SyncBatchNorm conversion, then DDP) in a world of one: the
    loss and gradients equal the plain model's (SyncBatchNorm falls back to batch_norm below 2 ranks, DDP
    averages over one; only cuDNN's accumulation order may differ: 1e-4 relative norm). SyncBatchNorm's own
    kernels (the all-gather of the statistics) are then run directly on the one rank against batch_norm."""
    import engine_segmentation
    from torch.nn.modules._functions import SyncBatchNorm as sync_bn
    plain = tiny_upernet()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) > 10
    ddp = torch.nn.parallel.DistributedDataParallel(synced, device_ids=[0])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 40, 48, generator=g).cuda(), torch.randint(0, 5, (2, 40, 48), generator=g).cuda()
    losses = []
    for model in (plain, ddp):
        torch.manual_seed(1)  # the same dropout and drop-path draws
        loss, _ = engine_segmentation.segmentation_loss(model, x, y, 0.4)
        loss.backward()
        losses.append(loss.item())
    assert close(losses[1], losses[0], 1e-5, 0), losses
    ga, gb = flat_grads(plain), flat_grads(synced)
    assert ga.shape == gb.shape and ((gb - ga).norm() / ga.norm()).item() < 1e-4
    bn = torch.randn(6, 16, 5, 7, device='cuda')
    w, b = torch.rand(16, device='cuda') + 0.5, torch.randn(16, device='cuda')
    stats = [(torch.zeros(16, device='cuda'), torch.ones(16, device='cuda')) for _ in range(2)]
    xs = [bn.clone().requires_grad_() for _ in range(2)]
    out = sync_bn.apply(xs[0], w, b, *stats[0], 1e-5, 0.1, nccl_world_of_one.group.WORLD, 1)
    ref = F.batch_norm(xs[1], *stats[1], w, b, True, 0.1, 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(stats[0], stats[1]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    up = torch.randn_like(bn)
    out.backward(up)
    ref.backward(up)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)


def test_one_gpu_ddp_compiled_hot_path_has_no_cuda_sync(nccl_world_of_one):
    """main_pretrain's --compile under torchrun (torch.compile of the DDP-wrapped model, args.distributed: the
    metric reads go through StepReader's reduce) in a world of one: 20 bf16 steps at --print_freq 10 make at
    most the 3 reads, as without DDP (test_hot_path_has_no_cuda_sync). The pico model (depth 4, 8x8 patches at
    32 px): the smallest graph to compile."""
    torch.manual_seed(0)
    model = models_mae.mae_vit_pico_patch4().cuda()
    compiled = torch.compile(torch.nn.parallel.DistributedDataParallel(model, device_ids=[0]))
    opt = misc.adamw([p for p in model.parameters() if p.requires_grad], 'cuda', lr=1e-4, betas=(0.9, 0.95))
    args = argparse.Namespace(device=torch.device('cuda'), amp='bf16', accum_iter=1, max_steps_per_epoch=0,
                              print_freq=10, no_step_log=False, clip_grad=None, mask_ratio=0.75, kept_mask_ratio=None,
                              lr=1e-4, min_lr=0., warmup_epochs=0, epochs=2, distributed=True)
    batch = (torch.randn(16, 3, 32, 32).pin_memory(), torch.zeros(16))
    mask_gen = masking.MaskGenerator('random', 8, 0.75, device='cuda')
    scaler = misc.LossScaler('cuda', enabled=False)
    engine_pretrain.train_one_epoch(compiled, [batch] * 3, opt, 0, scaler, args, mask_gen=mask_gen)  # compiles
    (stats, steps, _), syncs = cuda_syncs(lambda: engine_pretrain.train_one_epoch(
        compiled, [batch] * 20, opt, 1, scaler, args, mask_gen=mask_gen, stop_flag=misc.StopFlag()))
    assert len(syncs) <= 3, syncs
    assert steps == 20 and math.isfinite(stats['loss'])


class LabelledNoise(torch.utils.data.Dataset):
    classes = list(range(3))

    def __init__(self, n=60):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + self.y[i], int(self.y[i])


def test_knn_on_the_device_gathers_over_nccl_without_syncs(nccl_world_of_one):
    """main_knn on CUDA: features stay on the device (at most the 3 one-off copies of labels, indices and the
    padding mask, not one per batch: 8 batches here), gathered with all_gather_into_tensor; the search in
    chunks split over the ranks (counts all-reduced), one read. The same as without a process group."""
    import main_knn
    import models_vit
    torch.manual_seed(0)
    vit = models_vit.vit_pico_patch4(num_classes=0).cuda().eval()
    embed = lambda x: models_vit.forward_features_pooled(vit, x)  # noqa: E731
    args = main_knn.get_args_parser().parse_args(['--batch_size', '8', '--num_workers', '0'])
    args.__dict__.update(world_size=1, rank=0, device=torch.device('cuda', 0), amp='bf16')
    results = []
    for distributed in (True, False):
        args.distributed = distributed
        (train_f, train_y), syncs = cuda_syncs(lambda: main_knn.extract_features(embed, LabelledNoise(60), args))
        assert len(syncs) <= 3 and train_f.is_cuda and train_y.is_cuda, syncs
        val_f, val_y = main_knn.extract_features(embed, LabelledNoise(20), args)
        res, syncs = cuda_syncs(lambda: main_knn.knn_classify(train_f, train_y, val_f, val_y, [1, 5, 100], 0.07, 3,
                                                              chunk=8, distributed=distributed))
        assert len(syncs) <= 1, syncs
        results.append((train_f, train_y, res))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]
    assert all(0 <= t1 <= t5 <= 100 for t1, t5 in results[0][2].values())


def test_cmae_heads_are_sync_batchnorm_under_ddp_on_cuda(nccl_world_of_one):
    """main_pretrain's CUDA DDP setup converts CMAE's projector/predictor BatchNorms (online and target) to
    SyncBatchNorm, as the official heads have them; a training step then runs."""
    args = argparse.Namespace(distributed=True, device=torch.device('cuda', 0), gpu=0)
    model = models_cmae.cmae_model('mae_vit_micro_patch8', proj_hidden_dim=64, proj_dim=16)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    model = misc.convert_sync_batchnorm(model, args).cuda()
    assert n_bn > 0 and sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == n_bn
    ddp = misc.ddp(model, args)
    views = [torch.randn(4, 3, 64, 64, device='cuda') for _ in range(2)]
    loss = ddp(*views, mask_ratio=0.65)[0]
    loss.backward()
    assert torch.isfinite(loss)
