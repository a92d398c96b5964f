"""Pretraining: MAE, ColorMAE masks, CrossMAE decoder and the CMAE contrastive branch, switched by flags.

    torchrun --nproc_per_node=8 main_pretrain.py --model mae_vit_base_patch16 --norm_pix_loss \
        --batch_size 64 --accum_iter 8 --blr 1.5e-4 --epochs 800 --warmup_epochs 40 --data_path /imagenet
"""
import argparse
import datetime
import json
import os
import random
import time

import numpy as np
import torch

import masking
import models_cmae
import models_mae
import util.misc as misc
from engine_pretrain import train_one_epoch
from util.checkpoint import check_output_dir, checkpoint_args, resume_path, rng_state, save_on_master, set_rng_state
from util.datasets import (TwoViewTransform, build_dataset, build_image_dataset, build_loader, eval_transform,
                           pretrain_transform)
from util.lr_decay import param_groups_weight_decay
from util.lr_sched import momentum_at
from util.pretrained import load_exact
from util.visualize import log_to_tensorboard


def get_args_parser():
    parser = argparse.ArgumentParser('MAE pre-training', add_help=True)
    # --- batch and schedule
    parser.add_argument('--batch_size', default=64, type=int,
                        help='batch size per process (effective batch = batch_size * accum_iter * world_size)')
    parser.add_argument('--epochs', default=400, type=int)
    parser.add_argument('--accum_iter', default=1, type=int, help='gradient accumulation steps')
    parser.add_argument('--max_steps_per_epoch', default=0, type=int, help='> 0: cap the steps of each epoch (quick runs)')
    # --- model
    parser.add_argument('--model', default='mae_vit_large_patch16', type=str, metavar='MODEL',
                        help=f'one of: {", ".join(models_mae.MODELS)}')
    parser.add_argument('--input_size', default=224, type=int, help='image size')
    parser.add_argument('--mask_ratio', default=0.75, type=float, help='fraction of patches removed')
    parser.add_argument('--norm_pix_loss', action='store_true', help='per-patch normalized pixels as targets')
    parser.set_defaults(norm_pix_loss=False)
    parser.add_argument('--decoder_depth', default=None, type=int, help='default: the factory\'s (8)')
    parser.add_argument('--attn', default='sdpa', choices=['sdpa', 'math'], help='attention implementation')
    parser.add_argument('--flash_attn', action='store_true',
                        help='CUDA, bf16/fp16: the flash-attn package when installed, else SDPA held to its flash kernel')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (the DDP-wrapped one under torchrun)')
    # --- masks
    parser.add_argument('--mask_type', default='random', choices=masking.MASK_TYPES,
                        help='random (MAE), ColorMAE white/red/blue/green/purple, block (BEiT), block2x2 (CMAE)')
    parser.add_argument('--mask_schedule', default='', help='switch mask type at epochs, e.g. 200:blue,250:red')
    parser.add_argument('--mask_pattern_path', default='', help='ColorMAE pattern file (.npz, [P, M, N]) to use')
    parser.add_argument('--num_patterns', default=256, type=int, help='size of a generated colored-noise bank')
    # --- CrossMAE
    parser.add_argument('--cross_mae', action='store_true', help='cross-attention decoder (CrossMAE)')
    parser.add_argument('--kept_mask_ratio', default=None, type=float,
                        help='fraction of patches predicted (<= mask_ratio; default = mask_ratio)')
    parser.add_argument('--weight_fm', action='store_true', help='decoder blocks read learned mixes of encoder features')
    parser.add_argument('--use_fm', nargs='+', type=int, default=[-1], help='encoder blocks feeding wfm (-1 = all)')
    parser.add_argument('--use_input', action='store_true', help='also feed the masked encoder input to wfm')
    parser.add_argument('--self_attn', action='store_true', help='self-attention in each CrossMAE decoder block')
    parser.add_argument('--inverse_lr', action='store_true', help='lr scale mask_ratio / kept_mask_ratio')
    parser.add_argument('--no_lr_scale', action='store_true', help='lr scale 1 (default: kept_mask_ratio / mask_ratio)')
    # --- CMAE contrastive branch
    parser.add_argument('--contrastive', action='store_true',
                        help='CMAE: momentum target encoder, feature decoder and InfoNCE (recipe: --mask_type block2x2 --mask_ratio 0.65)')
    parser.add_argument('--contrastive_weight', type=float, default=1.0, help='loss = pixel + weight * InfoNCE')
    parser.add_argument('--temperature', type=float, default=0.07, help='InfoNCE temperature tau (loss scaled by 2 tau)')
    parser.add_argument('--momentum', type=float, default=0.996, help='EMA momentum m of the target branch')
    parser.add_argument('--momentum_cosine', action='store_true', help='ramp m to 1 along a half cosine over the run')
    parser.add_argument('--proj_dim', type=int, default=256)
    parser.add_argument('--proj_hidden_dim', type=int, default=1536)
    parser.add_argument('--feat_decoder_depth', type=int, default=2)
    parser.add_argument('--max_shift', type=int, default=None, help='target view shift in pixels (default 31 * input_size / 224)')
    # --- optimizer
    parser.add_argument('--weight_decay', type=float, default=0.05)
    parser.add_argument('--lr', type=float, default=None, metavar='LR', help='absolute lr (default: from blr)')
    parser.add_argument('--blr', type=float, default=1.5e-4, metavar='LR',
                        help='base lr: absolute_lr = scale * blr * eff_batch / 256 (scale from CrossMAE ratios, else 1)')
    parser.add_argument('--min_lr', type=float, default=0., metavar='LR', help='lower lr bound of the cosine')
    parser.add_argument('--warmup_epochs', type=int, default=40, metavar='N')
    parser.add_argument('--clip_grad', type=float, default=None)
    # --- data, output, checkpoints
    parser.add_argument('--data_path', default='../shared/data/imagenette2-224', type=str, help='ImageFolder root with train/')
    parser.add_argument('--subset', default=0, type=int, help='> 0: a fixed, class-balanced subset of this many images')
    parser.add_argument('--cache_data', action='store_true', help='decode the images once and keep them in memory (uint8)')
    parser.add_argument('--cache_size', default=0, type=int, help='cached image size (default input_size * 256 / 224)')
    parser.add_argument('--output_dir', default='./output_dir', help='checkpoints and log.txt go here')
    parser.add_argument('--log_dir', default=None, help='TensorBoard folder (default: output_dir)')
    parser.add_argument('--resume', default='', help='checkpoint to resume from (default: output_dir/checkpoint.pth if present)')
    parser.add_argument('--save_freq', default=20, type=int, help='also keep checkpoint-{epoch}.pth every N epochs')
    parser.add_argument('--print_freq', default=20, type=int)
    parser.add_argument('--vis_freq', default=20, type=int, help='TensorBoard reconstructions and masks every N epochs (0: off)')
    parser.add_argument('--no_step_log', action='store_true',
                        help='skip the per-step TensorBoard scalars (written every --print_freq steps, one point per step)')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N')
    return misc.add_dist_args(parser)


def check_args(args):
    if args.model not in models_mae.MODELS:
        raise misc.UserError(f'unknown --model {args.model!r}; choose from: {", ".join(models_mae.MODELS)}')
    if not 0 <= args.mask_ratio < 1:
        raise misc.UserError(f'--mask_ratio must be in [0, 1), got {args.mask_ratio}')
    if args.kept_mask_ratio is None:
        args.kept_mask_ratio = args.mask_ratio
    if args.kept_mask_ratio != args.mask_ratio and not args.cross_mae:
        raise misc.UserError('--kept_mask_ratio (partial reconstruction) needs --cross_mae')
    valid_kept = 0 < args.kept_mask_ratio <= args.mask_ratio or args.kept_mask_ratio == args.mask_ratio == 0
    if not valid_kept:
        raise misc.UserError(f'--kept_mask_ratio must be in (0, mask_ratio={args.mask_ratio}], got {args.kept_mask_ratio}')
    if (args.weight_fm or args.use_input or args.self_attn) and not args.cross_mae:
        raise misc.UserError('--weight_fm, --use_input and --self_attn belong to the CrossMAE decoder: add --cross_mae')
    patch = models_mae.CONFIGS[args.model.replace('mae_vit_', '').replace('_dec512d8b', '')]['patch_size']
    if args.input_size % patch:
        raise misc.UserError(f'--input_size {args.input_size} is not divisible by the patch size {patch} of {args.model}')
    args.schedule = masking.parse_mask_schedule(args.mask_schedule)
    if args.accum_iter < 1 or args.batch_size < 1:
        raise misc.UserError('--batch_size and --accum_iter must be >= 1')


def lr_scale(args):
    """CrossMAE scales the lr by kept_mask_ratio / mask_ratio (or its inverse); MAE by 1."""
    if not args.cross_mae or args.no_lr_scale or args.mask_ratio == 0:
        return 1.0
    r = args.kept_mask_ratio / args.mask_ratio
    return 1.0 / r if args.inverse_lr else r


def build_model(args):
    kwargs = dict(img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)
    if args.decoder_depth is not None:
        kwargs['decoder_depth'] = args.decoder_depth
    if args.cross_mae:
        kwargs.update(cross_mae=True, weight_fm=args.weight_fm, use_fm=args.use_fm, use_input=args.use_input,
                      self_attn=args.self_attn)
    if args.contrastive:
        kwargs.update(feat_decoder_depth=args.feat_decoder_depth, proj_hidden_dim=args.proj_hidden_dim,
                      proj_dim=args.proj_dim, temperature=args.temperature, contrastive_weight=args.contrastive_weight)
        model = models_cmae.cmae_model(args.model, **kwargs)
    else:
        model = models_mae.MODELS[args.model](**kwargs)
    backend = args.attn
    if args.flash_attn:
        if args.device.type != 'cuda' or args.amp == 'none':
            print('--flash_attn needs CUDA and --amp bf16/fp16; using PyTorch SDPA')
        elif models_mae.flash_attn_func is None and not flash_sdpa_available(args.device):
            print('--flash_attn: neither the flash_attn package nor SDPA\'s flash kernel (Ampere or newer) is here; '
                  'using PyTorch SDPA')
        else:
            backend = 'flash'
            print('--flash_attn: ' + ('the flash_attn package' if models_mae.flash_attn_func is not None
                                      else 'SDPA held to its FlashAttention kernel (flash_attn is not installed)'))
    model.set_attention_backend(backend)
    return model


def flash_sdpa_available(device):
    """SDPA's FlashAttention kernel: built in and an sm80+ GPU."""
    available = getattr(torch.backends.cuda, 'is_flash_attention_available', lambda: True)()
    return models_mae.sdpa_kernel is not None and available and torch.cuda.get_device_capability(device)[0] >= 8


def build_mask_generator(args, epoch, grid):
    kind = masking.mask_type_at(epoch, args.mask_type, args.schedule)
    patterns = masking.load_patterns(args.mask_pattern_path) if args.mask_pattern_path and kind in masking.COLORS else None
    segment = max([start for start, _ in args.schedule if start <= epoch], default=0)  # same seed on resume
    return masking.MaskGenerator(kind, grid, args.mask_ratio, seed=args.seed + args.rank + 7919 * segment,
                                 device=args.device, num_patterns=args.num_patterns, patterns=patterns)


def main(args):
    misc.init_distributed_mode(args)
    misc.resolve_amp(args)
    check_args(args)
    check_output_dir(args.output_dir if misc.is_main_process() else '')
    print(f'job dir: {os.path.dirname(os.path.realpath(__file__))}')
    print(', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))

    seed = args.seed + misc.get_rank()  # different augmentations and masks per process
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    transform = (TwoViewTransform(args.input_size, args.max_shift) if args.contrastive
                 else pretrain_transform(args.input_size))
    dataset = build_image_dataset(args, 'train', transform, cache=args.cache_data)
    print(f'dataset: {len(dataset)} images in {dataset.root}')
    if len(dataset) < args.batch_size * args.world_size:
        raise misc.UserError(f'{len(dataset)} images are fewer than one global batch of {args.batch_size * args.world_size}')
    loader = build_loader(dataset, args)
    model = misc.convert_sync_batchnorm(build_model(args), args).to(args.device)  # CMAE's heads
    model_without_ddp = model
    print(f'model: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters')

    eff_batch = args.batch_size * args.accum_iter * misc.get_world_size()
    if args.lr is None:
        args.lr = lr_scale(args) * args.blr * eff_batch / 256
    print(f'base lr: {args.lr * 256 / eff_batch:.2e}, actual lr: {args.lr:.2e}, accumulate grad iterations: '
          f'{args.accum_iter}, effective batch size: {eff_batch}')

    model = misc.ddp(model, args)
    optimizer = misc.adamw(param_groups_weight_decay(model_without_ddp, args.weight_decay), args.device, lr=args.lr,
                           betas=(0.9, 0.95))  # fused on CUDA
    loss_scaler = misc.LossScaler(args.device.type, enabled=args.amp == 'fp16')
    grid = model_without_ddp.grid_size

    # --- resume: --resume, or output_dir/checkpoint.pth when a run is started again with the same command
    start_step, mask_state = 0, None
    path = resume_path(args)
    if path:
        ckpt = load_exact(model_without_ddp, path)
        if 'optimizer' in ckpt:
            misc.load_optimizer_state(optimizer, ckpt['optimizer'])
            loss_scaler.load_state_dict(ckpt.get('scaler'))
            start_step = ckpt.get('step_in_epoch', 0)
            args.start_epoch = ckpt['epoch'] + (0 if start_step else 1)
            ranks = ckpt.get('rank_states', [])
            if len(ranks) == misc.get_world_size():  # each process continues its own RNG and mask streams
                set_rng_state(ranks[misc.get_rank()]['rng'])
                mask_state = ranks[misc.get_rank()]['mask_gen']
            else:
                print(f'{path} was written by {len(ranks)} processes: RNG and mask streams start afresh from the seed')
        print(f'resumed from {path}: epoch {args.start_epoch}, step {start_step}')

    log_writer = None
    if misc.is_main_process() and args.output_dir:
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir or args.output_dir)
    if args.compile:  # after DDP (its DDPOptimizer splits the graph at the gradient buckets); state dicts and
        model = torch.compile(model)  # checkpoints use model_without_ddp, so their keys carry no _orig_mod.
    stop_flag = misc.StopFlag().install()

    def checkpoint(epoch, step_in_epoch=0):
        """epoch: the last complete epoch, or the one in progress when step_in_epoch > 0."""
        ranks = [{'rng': rng_state(), 'mask_gen': mask_gen.state_dict()}]
        if args.distributed:  # a collective: every process calls checkpoint()
            mine, ranks = ranks[0], [None] * misc.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        state = {'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
                 'step_in_epoch': step_in_epoch, 'scaler': loss_scaler.state_dict(), 'rank_states': ranks,
                 'args': checkpoint_args(args)}
        save_on_master(state, os.path.join(args.output_dir, 'checkpoint.pth'))
        return state

    def update_target(epoch_float):  # CMAE: EMA of the target branch after each optimizer step
        model_without_ddp.update_target(momentum_at(epoch_float, args.momentum, args.epochs, args.momentum_cosine))
    after_step = update_target if args.contrastive else None

    print(f'start training for {args.epochs} epochs')
    start_time, mask_gen, vis_imgs = time.time(), None, None
    for epoch in range(args.start_epoch, args.epochs):
        epoch_start = time.time()
        if mask_gen is None or mask_gen.mask_type != masking.mask_type_at(epoch, args.mask_type, args.schedule):
            mask_gen = build_mask_generator(args, epoch, grid)
            if mask_state is not None and mask_state['mask_type'] == mask_gen.mask_type:
                mask_gen.load_state_dict(mask_state)
            print(f'epoch {epoch}: mask type {mask_gen.mask_type}')
        mask_state = None
        loader.sampler.set_epoch(epoch)
        loader.sampler.start_index = start_step * args.batch_size  # > 0 only when resuming mid-epoch
        train_stats, steps, interrupted = train_one_epoch(
            model, loader, optimizer, epoch, loss_scaler, args, mask_gen=mask_gen, log_writer=log_writer,
            start_step=start_step, stop_flag=stop_flag, after_step=after_step)
        start_step = 0
        if interrupted:
            if args.output_dir:
                checkpoint(epoch, step_in_epoch=steps)  # resumes inside this epoch, after `steps` steps
            print(f'stopped by signal in epoch {epoch} after step {steps}; checkpoint saved')
            break
        if args.output_dir:
            checkpoint(epoch)
            if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
                save_on_master({'model': model_without_ddp.state_dict(), 'epoch': epoch,
                                'args': checkpoint_args(args)}, os.path.join(args.output_dir, f'checkpoint-{epoch}.pth'))
        if log_writer is not None and args.vis_freq and (epoch % args.vis_freq == 0 or epoch + 1 == args.epochs):
            if vis_imgs is None:
                vis_imgs = build_dataset(args.data_path, 'train', eval_transform(args.input_size), 4)
                vis_imgs = torch.stack([vis_imgs[i][0] for i in range(len(vis_imgs))]).to(args.device)
            log_to_tensorboard(log_writer, model_without_ddp, vis_imgs, mask_gen, args.mask_ratio,
                               args.kept_mask_ratio, epoch, seed=args.seed)
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch,
                     'epoch_time_s': time.time() - epoch_start}  # training + checkpoints (a resumed epoch: its rest)
        if args.output_dir and misc.is_main_process():
            if log_writer is not None:
                log_writer.flush()
            with open(os.path.join(args.output_dir, 'log.txt'), mode='a', encoding='utf-8') as f:
                f.write(json.dumps(log_stats) + '\n')
        if epoch + 1 < args.epochs and stop_flag.should_stop(args.device):  # a signal at the epoch's end
            print(f'stopped by signal after epoch {epoch}')
            break
    if log_writer is not None:
        log_writer.close()
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    if args.output_dir:
        print(f'checkpoints and log.txt in {os.path.abspath(args.output_dir)}')


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    misc.run_main(main, args)
