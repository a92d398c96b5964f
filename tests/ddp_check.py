"""DDP equivalence: `python ddp_check.py OUT` (one process, batch 2b) and `torchrun --nproc_per_node=2 ddp_check.py
OUT` (batch b each) see the same samples in the same order with the same per-sample masks (through `noise`),
run a few steps of engine_pretrain.train_one_epoch and write the first-step loss and the final weights.
AdamW at lr 1e-4: parameters whose true gradient is zero (the key bias of attention) only see rounding noise,
which Adam normalizes to steps of up to ~lr; a small lr keeps that noise below the 1e-5 tolerance."""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import models_mae  # noqa: E402
import util.misc as misc  # noqa: E402
from engine_pretrain import train_one_epoch  # noqa: E402
from util.datasets import build_dataset, eval_transform  # noqa: E402
from util.lr_decay import param_groups_weight_decay  # noqa: E402

STEPS, GLOBAL_BATCH = 4, 16


class Recorder:
    def __init__(self):
        self.losses = []

    def add_scalar(self, tag, value, step):
        if tag == 'train_loss':
            self.losses.append(value)


def main(out, data_path):
    torch.set_num_threads(1)
    args = argparse.Namespace(device='cpu', dist_url='env://', amp='none', accum_iter=1, max_steps_per_epoch=0,
                              print_freq=100, no_step_log=False, clip_grad=None, mask_ratio=0.75, kept_mask_ratio=None,
                              lr=1e-4, min_lr=0., warmup_epochs=0, epochs=1)
    misc.init_distributed_mode(args)
    rank, world = args.rank, args.world_size
    ds = build_dataset(data_path, 'train', eval_transform(32), subset=STEPS * GLOBAL_BATCH)
    images = torch.stack([ds[i][0] for i in range(len(ds))]).view(STEPS, GLOBAL_BATCH, 3, 32, 32)
    noise = torch.rand(STEPS, GLOBAL_BATCH, 64, generator=torch.Generator().manual_seed(0))
    b = GLOBAL_BATCH // world
    loader = [(images[s, rank * b:(rank + 1) * b], torch.zeros(b)) for s in range(STEPS)]
    slices = iter(noise[s, rank * b:(rank + 1) * b] for s in range(STEPS))
    torch.manual_seed(0)
    model = models_mae.mae_vit_pico_patch4()
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model_without_ddp, 0.05), lr=args.lr, betas=(0.9, 0.95))
    rec = Recorder() if rank == 0 else None
    train_one_epoch(model, loader, optimizer, 0, misc.LossScaler(), args, mask_gen=lambda n: next(slices), log_writer=rec)
    if rank == 0:
        torch.manual_seed(0)
        init = models_mae.mae_vit_pico_patch4().state_dict()
        torch.save({'losses': rec.losses, 'model': model_without_ddp.state_dict(), 'init': init}, out)
    if args.distributed:
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
