"""End-to-end fine-tuning of a pretrained encoder (MAE recipe), and evaluation of a fine-tuned checkpoint.

    torchrun --nproc_per_node=8 main_finetune.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth \
        --batch_size 32 --accum_iter 4 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 \
        --mixup 0.8 --cutmix 1.0 --reprob 0.25 --epochs 100 --dist_eval --data_path /imagenet
    python main_finetune.py --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 --data_path /imagenet
"""
import argparse
import datetime
import json
import os
import random
import time

import numpy as np
import torch
from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
import util.misc as misc
from engine_finetune import evaluate, train_one_epoch
from util.checkpoint import check_output_dir, resume_path, rng_state, save_epoch, set_rng_state
from util.datasets import build_image_dataset, build_loader, eval_transform, finetune_transform
from util.lr_decay import param_groups_lrd
from util.pretrained import fill_from_checkpoint, load_encoder, load_exact

DEFAULTS = {'model': 'vit_base_patch16', 'input_size': 224}  # when neither a flag nor the checkpoint says


def get_args_parser():
    parser = argparse.ArgumentParser('MAE fine-tuning for image classification', add_help=True)
    add_common_args(parser, batch_size=64, epochs=50, blr=1e-3, warmup_epochs=5)
    # --- model
    parser.add_argument('--drop_path', type=float, default=0.1, metavar='PCT', help='drop path rate')
    parser.add_argument('--layer_decay', type=float, default=0.75, help='layer-wise lr decay (ELECTRA/BEiT)')
    parser.add_argument('--weight_decay', type=float, default=0.05)
    parser.add_argument('--clip_grad', type=float, default=None, metavar='NORM')
    # --- augmentation (timm)
    parser.add_argument('--color_jitter', type=float, default=None, metavar='PCT', help='only without --aa')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME', help='RandAugment policy')
    parser.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    parser.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erase prob')
    parser.add_argument('--remode', type=str, default='pixel', help='random erase mode')
    parser.add_argument('--recount', type=int, default=1, help='random erase count')
    parser.add_argument('--mixup', type=float, default=0, help='mixup alpha, > 0 enables')
    parser.add_argument('--cutmix', type=float, default=0, help='cutmix alpha, > 0 enables')
    parser.add_argument('--cutmix_minmax', type=float, nargs='+', default=None)
    parser.add_argument('--mixup_prob', type=float, default=1.0)
    parser.add_argument('--mixup_switch_prob', type=float, default=0.5)
    parser.add_argument('--mixup_mode', type=str, default='batch', help='batch, pair or elem')
    return parser


def add_common_args(parser, batch_size, epochs, blr, warmup_epochs):
    """Flags that fine-tuning and linear probing share."""
    parser.add_argument('--batch_size', default=batch_size, type=int,
                        help='batch size per process (effective batch = batch_size * accum_iter * world_size)')
    parser.add_argument('--epochs', default=epochs, type=int)
    parser.add_argument('--accum_iter', default=1, type=int, help='gradient accumulation steps')
    parser.add_argument('--max_steps_per_epoch', default=0, type=int, help='> 0: cap the steps of each epoch')
    parser.add_argument('--model', default=None, type=str, metavar='MODEL',
                        help=f'one of: {", ".join(models_vit.MODELS)} (or the mae_vit_* pretrain name); '
                             'default: the --finetune (or --resume) checkpoint\'s, else vit_base_patch16')
    parser.add_argument('--input_size', default=None, type=int, help="image size (default: the checkpoint's, else 224)")
    parser.add_argument('--lr', type=float, default=None, metavar='LR', help='absolute lr (default: from blr)')
    parser.add_argument('--blr', type=float, default=blr, metavar='LR', help='base lr: absolute_lr = blr * eff_batch / 256')
    parser.add_argument('--min_lr', type=float, default=1e-6 if blr < 0.01 else 0., metavar='LR')
    parser.add_argument('--warmup_epochs', type=int, default=warmup_epochs, metavar='N')
    parser.add_argument('--finetune', default='',
                        help='pretrained checkpoint to start from (MAE, CrossMAE, CMAE; an HF ViTMAE folder or '
                             '.safetensors, a timm file)')
    parser.add_argument('--global_pool', action='store_true', help='mean of patch tokens -> fc_norm -> head')
    parser.set_defaults(global_pool=blr < 0.01)  # fine-tuning: global pool; linear probing: cls token
    parser.add_argument('--cls_token', action='store_false', dest='global_pool', help='norm(x)[:, 0] -> head')
    parser.add_argument('--data_path', default='../shared/data/imagenette2-224', type=str, help='ImageFolder root (train/, val/)')
    parser.add_argument('--subset', default=0, type=int, help='> 0: a fixed, class-balanced subset of the train split')
    parser.add_argument('--val_subset', default=0, type=int, help='> 0: a fixed, class-balanced subset of the val split')
    parser.add_argument('--cache_data', action='store_true', help='decode the images once and keep them in memory')
    parser.add_argument('--cache_size', default=0, type=int)
    parser.add_argument('--nb_classes', default=1000, type=int, help='number of classes (head size)')
    parser.add_argument('--output_dir', default='./output_dir', help='checkpoints and log.txt go here')
    parser.add_argument('--log_dir', default=None, help='TensorBoard folder (default: output_dir)')
    parser.add_argument('--resume', default='', help='checkpoint of this model to resume or evaluate')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N')
    parser.add_argument('--eval', action='store_true', help='only evaluate --resume and exit')
    parser.add_argument('--dist_eval', action='store_true', help='split evaluation across processes')
    parser.add_argument('--save_freq', default=20, type=int)
    parser.add_argument('--print_freq', default=20, type=int)
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (the DDP-wrapped one under torchrun)')
    misc.add_dist_args(parser)


def setup(args, defaults=DEFAULTS):
    """Process group, precision, --model/--input_size from the checkpoint (those of `defaults`; None: the caller
    resolves them), output folder and seeds: shared by fine-tuning, probing and segmentation."""
    misc.init_distributed_mode(args)
    misc.resolve_amp(args)
    if defaults:
        fill_from_checkpoint(args, args.finetune if args.finetune and not args.eval else args.resume,
                             models_vit.CONFIGS, defaults)
    check_output_dir(args.output_dir if misc.is_main_process() and not args.eval else '')
    print(', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    seed = args.seed + misc.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_data(args, train_transform):
    dataset_val = build_image_dataset(args, 'val', eval_transform(args.input_size), cache=args.cache_data)
    loader_val = build_loader(dataset_val, args, shuffle=False, drop_last=False, split=args.dist_eval)
    if args.eval:
        return None, loader_val
    dataset_train = build_image_dataset(args, 'train', train_transform, cache=args.cache_data)
    if len(dataset_train.classes) > args.nb_classes:
        raise misc.UserError(f'{len(dataset_train.classes)} classes in the data but --nb_classes {args.nb_classes}')
    print(f'train: {len(dataset_train)} images, val: {len(dataset_val)} images')
    return build_loader(dataset_train, args), loader_val


def run(args, model, model_without_ddp, optimizer, criterion, loader_train, loader_val, mixup_fn=None):
    """The epoch loop: resume, train, evaluate, checkpoint (output_dir/checkpoint.pth every epoch)."""
    loss_scaler = misc.LossScaler(args.device.type, enabled=args.amp == 'fp16')
    path = resume_path(args)
    if path:
        ckpt = load_exact(model_without_ddp, path)
        print(f'resumed model from {path}')
        if 'optimizer' in ckpt and not args.eval:
            misc.load_optimizer_state(optimizer, ckpt['optimizer'])
            loss_scaler.load_state_dict(ckpt.get('scaler'))
            args.start_epoch = ckpt['epoch'] + 1
            if 'rng' in ckpt and misc.get_rank() == 0:
                set_rng_state(ckpt['rng'])
    if args.eval:
        evaluate(loader_val, model, args)
        return
    log_writer = None
    if misc.is_main_process() and args.output_dir:
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir or args.output_dir)
    print(f'start training for {args.epochs} epochs')
    start_time, max_accuracy = time.time(), 0.0
    for epoch in range(args.start_epoch, args.epochs):
        loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, epoch, loss_scaler, args,
                                      mixup_fn=mixup_fn, log_writer=log_writer)
        if args.output_dir:
            save_epoch({'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
                        'scaler': loss_scaler.state_dict(), 'rng': rng_state(), 'args': checkpoint_args(args)},
                       args.output_dir, args.save_freq, args.epochs)
        test_stats = evaluate(loader_val, model, args)
        max_accuracy = max(max_accuracy, test_stats['acc1'])
        print(f'accuracy on {len(loader_val.dataset)} test images: {test_stats["acc1"]:.1f}%, max {max_accuracy:.2f}%')
        if log_writer is not None:
            for k in ('acc1', 'acc5', 'loss'):
                log_writer.add_scalar(f'perf/test_{k}', test_stats[k], epoch)
            log_writer.flush()
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()}, 'epoch': epoch}
        if args.output_dir and misc.is_main_process():
            with open(os.path.join(args.output_dir, 'log.txt'), mode='a', encoding='utf-8') as f:
                f.write(json.dumps(log_stats) + '\n')
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


def checkpoint_args(args):
    return {k: v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v) for k, v in vars(args).items()}


def place(model, args):
    """Moves the model to the device, sets args.lr from blr and wraps the model in DDP when distributed.
    -> (model to train, model_without_ddp)"""
    model.to(args.device)
    print(f'model: {args.model}, {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.3f}M trainable')
    set_lr(args)
    wrapped = model
    if args.distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if args.device.type == 'cuda' else None)
    if getattr(args, 'compile', False):  # after DDP, as main_pretrain; checkpoints use the bare model
        wrapped = torch.compile(wrapped)
    return wrapped, model


def set_lr(args):
    eff_batch = args.batch_size * args.accum_iter * misc.get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    print(f'base lr: {args.lr * 256 / eff_batch:.2e}, actual lr: {args.lr:.2e}, effective batch size: {eff_batch}')


def main(args):
    setup(args)
    loader_train, loader_val = build_data(args, None if args.eval else finetune_transform(args))
    mixup_fn = None
    if not args.eval and (args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None):
        if args.mixup_mode == 'batch' and args.batch_size % 2:
            raise misc.UserError('mixup/cutmix in batch mode needs an even --batch_size')
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
    model = models_vit.create_vit(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                                  drop_path_rate=args.drop_path, global_pool=args.global_pool)
    if args.finetune and not args.eval:
        load_encoder(model, args.finetune)
        models_vit.init_head(model, std=2e-5)  # as MAE: a tiny head keeps the start close to the features
    model, model_without_ddp = place(model, args)
    param_groups = param_groups_lrd(model_without_ddp, args.weight_decay, layer_decay=args.layer_decay)
    optimizer = misc.adamw(param_groups, args.device, lr=args.lr)  # fused on CUDA
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is done in mixup's label mixing
    elif args.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    run(args, model, model_without_ddp, optimizer, criterion, loader_train, loader_val, mixup_fn)


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    misc.run_main(main, args)
