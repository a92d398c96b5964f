"""Data-parallel training paths on CPU (gloo): gradient accumulation all-reduces once per optimizer step, and
models whose later encoder blocks feed nothing train under DDP."""
import argparse

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import engine_finetune
import engine_segmentation
import models_seg
import models_vit
import util.misc as misc
from conftest import PICO, read_log, torchrun

STEPS, ACCUM = 8, 4


@pytest.fixture
def world_of_one():
    """A gloo process group of this process alone: DDP then runs its reducer and all-reduces as with several."""
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def counting_ddp(model):
    """DDP whose all-reduces record the number of forwards run so far -> (ddp model, list of those numbers)."""
    forwards, reduced = [0], []
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)

    def hook(state, bucket):
        reduced.append(forwards[0])
        return allreduce_hook(state, bucket)
    ddp.register_comm_hook(None, hook)
    return ddp, reduced


def base_args(**kw):
    return argparse.Namespace(device=torch.device('cpu'), distributed=True, amp='none', accum_iter=ACCUM, print_freq=100,
                              max_steps_per_epoch=0, clip_grad=None, lr=1e-3, min_lr=0., warmup_epochs=0, epochs=1, **kw)


@pytest.mark.parametrize('engine', ['finetune', 'segmentation'])
def test_gradient_accumulation_all_reduces_once_per_optimizer_step(world_of_one, engine):
    torch.manual_seed(0)
    if engine == 'finetune':
        model, reduced = counting_ddp(models_vit.vit_pico_patch4(num_classes=10))
        loader = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(STEPS)]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine_finetune.train_one_epoch(model, torch.nn.CrossEntropyLoss(), loader, opt, 0, misc.LossScaler(),
                                        base_args())
    else:
        seg = models_seg.upernet_vit('vit_pico_patch4', 3, img_size=32, channels=16, aux_channels=8)
        model, reduced = counting_ddp(seg)
        loader = [(torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))) for _ in range(STEPS)]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        args = base_args(iters_per_epoch=STEPS, total_iters=STEPS, warmup_iters=0, poly_power=1.0, aux_weight=0.4)
        engine_segmentation.train_one_epoch(model, loader, opt, 0, misc.LossScaler(), args)
    assert reduced and sorted(set(reduced)) == [ACCUM, 2 * ACCUM]  # at the 4th and 8th forward only


def test_unused_later_blocks_train_under_ddp(data_path, tmp_path):
    """CrossMAE with --use_fm leaving out the last encoder blocks, and segmentation with --out_indices that does
    not end at the last block: their later blocks get no gradient, which DDP must be told of (it stopped at the
    second step before). One torchrun rank reproduces it."""
    from test_segmentation import SEG, make_dataset
    pre = tmp_path / 'pre'
    torchrun('main_pretrain.py', [*PICO, '--data_path', data_path, '--subset', 64, '--batch_size', 16, '--epochs', 1,
                                  '--warmup_epochs', 0, '--cross_mae', '--weight_fm', '--use_fm', 0, 1,
                                  '--max_steps_per_epoch', 3, '--vis_freq', 0, '--print_freq', 1, '--output_dir', pre], nproc=1)
    assert read_log(pre / 'log.txt')[-1]['epoch'] == 0
    seg = tmp_path / 'seg'
    torchrun('main_segmentation.py', [*SEG, '--model', 'vit_micro_patch8', '--data_path', make_dataset(tmp_path / 'data'),
                                      '--epochs', 1, '--out_indices', 0, 1, 2, 3, '--output_dir', seg], nproc=1)  # of 6
    assert read_log(seg / 'log.txt')[-1]['epoch'] == 0


def test_collective_paths_with_a_faked_world_of_two(world_of_one, monkeypatch):
    """The branches our collectives take under DDP, entered on a one-rank gloo group with the world size faked to
    2 where it selects them (tests/test_cuda_ddp.py runs the same over NCCL): the all-reduce then sums one rank's
    values and the mean divides by the faked 2. get_world_size is faked in util.meters as well, which imports it
    by name (the NCCL test faked it in util.misc alone, and failed on its first GPU run)."""
    import util.meters as meters
    for module in (misc, meters):
        monkeypatch.setattr(module, 'get_world_size', lambda: 2)
    m = meters.DeviceMeters()  # StepReader's read under DDP: read(reduce=True)
    m.update(loss=torch.tensor(3.0), n=2)
    m.update(loss=torch.tensor(5.0, dtype=torch.bfloat16), stop=1.0)
    assert m.read(reduce=True) == {'loss': [1.5, 2.5], 'stop': [0.5]}
    assert misc.all_reduce_mean(4.0) == 2.0
    flag = misc.StopFlag()
    assert flag.should_stop(torch.device('cpu')) is False
    flag.set = True
    assert flag.should_stop(torch.device('cpu')) is True
    logger = meters.MetricLogger()
    reader = meters.StepReader(argparse.Namespace(distributed=True), 0, 10, logger, stop_flag=flag)
    reader.record(0, 1e-3, True, loss=torch.tensor(4.0))
    assert reader.read() is True and logger.meters['loss'].value == 2.0  # the flag and the loss in one all-reduce
