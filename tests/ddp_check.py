"""DDP equivalence: `python ddp_check.py OUT DATA` (one process, batch 16) and `torchrun --nproc_per_node=2
ddp_check.py OUT DATA` (batch 8 each) see the same samples in the same order with the same per-sample masks
(through `noise`) and run engine_pretrain.train_one_epoch from the same initial weights. OUT gets, per run:

- 'adamw': the real optimizer (AdamW, lr 1e-4): the loss of every step (the engine's logged values, averaged
  over the processes) and the gradients of the first step (after DDP's all-reduce);
- 'sgd': plain SGD: the final weights and each step's gradient norm per tensor. SGD's weights are the initial
  ones minus lr times the summed gradients, so they differ between the runs by the gradients' rounding only.
  AdamW's would not: it divides each gradient by its own running scale, so a parameter whose true gradient is
  zero (the key part of an attention bias: softmax ignores a shift shared by all keys) takes steps of about
  +-lr whose signs follow the rounding noise of the CPU's kernels;
- 'broken' (two processes only): the SGD run with DDP's gradient average replaced by a sum -- a wrong world
  size -- so that the test can show the comparison catches a real DDP bug.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import models_mae  # noqa: E402
import util.misc as misc  # noqa: E402
from engine_pretrain import train_one_epoch  # noqa: E402
from util.datasets import build_dataset, eval_transform  # noqa: E402
from util.lr_decay import param_groups_weight_decay  # noqa: E402

STEPS, GLOBAL_BATCH, SGD_LR = 4, 16, 0.5


class Recorder:
    def __init__(self):
        self.losses = []

    def add_scalar(self, tag, value, step):
        if tag == 'train_loss':
            self.losses.append(value)


def sum_not_mean(state, bucket):
    """A DDP communication hook with a wrong world size: sums the gradients instead of averaging them."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def run(args, images, noise, optimizer_name, comm_hook=None):
    rank, world = args.rank, args.world_size
    b = GLOBAL_BATCH // world
    loader = [(images[s, rank * b:(rank + 1) * b], torch.zeros(b)) for s in range(STEPS)]
    slices = iter(noise[s, rank * b:(rank + 1) * b] for s in range(STEPS))
    torch.manual_seed(0)
    model = model_without_ddp = models_mae.mae_vit_pico_patch4()
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
        if comm_hook is not None:
            model.register_comm_hook(None, comm_hook)
    groups = param_groups_weight_decay(model_without_ddp, 0.05)
    if optimizer_name == 'adamw':
        args.lr = 1e-4
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    else:
        args.lr = SGD_LR
        optimizer = torch.optim.SGD(groups, lr=args.lr)
    names = {p: n for n, p in model_without_ddp.named_parameters()}
    grads, grad_norms = {}, []

    def record(opt, *_):  # before each step: the gradients as the optimizer sees them (all-reduced under DDP)
        if not grads:
            grads.update({names[p]: p.grad.clone() for g in opt.param_groups for p in g['params']})
        grad_norms.append({names[p]: p.grad.norm().item() for g in opt.param_groups for p in g['params']})
    optimizer.register_step_pre_hook(record)
    rec = Recorder()
    train_one_epoch(model, loader, optimizer, 0, misc.LossScaler(), args, mask_gen=lambda n: next(slices), log_writer=rec)
    return {'losses': rec.losses, 'grad0': grads, 'grad_norms': grad_norms, 'lr': args.lr,
            'model': {k: v.clone() for k, v in model_without_ddp.state_dict().items()}}


def main(out, data_path):
    torch.set_num_threads(1)
    args = argparse.Namespace(device='cpu', dist_url='env://', amp='none', accum_iter=1, max_steps_per_epoch=0,
                              print_freq=100, no_step_log=False, clip_grad=None, mask_ratio=0.75, kept_mask_ratio=None,
                              lr=None, min_lr=0., warmup_epochs=0, epochs=1)
    misc.init_distributed_mode(args)
    ds = build_dataset(data_path, 'train', eval_transform(32), subset=STEPS * GLOBAL_BATCH)
    images = torch.stack([ds[i][0] for i in range(len(ds))]).view(STEPS, GLOBAL_BATCH, 3, 32, 32)
    noise = torch.rand(STEPS, GLOBAL_BATCH, 64, generator=torch.Generator().manual_seed(0))
    result = {'adamw': run(args, images, noise, 'adamw'), 'sgd': run(args, images, noise, 'sgd')}
    if args.distributed:
        result['broken'] = run(args, images, noise, 'sgd', comm_hook=sum_not_mean)
    torch.manual_seed(0)
    result['init'] = models_mae.mae_vit_pico_patch4().state_dict()
    if args.rank == 0:
        torch.save(result, out)
    if args.distributed:
        dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
