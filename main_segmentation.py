"""Semantic segmentation transfer: UperNet on a pretrained ViT (MAE / BEiT ADE20K recipe), scored by mIoU.

    # ADE20K, ViT-B, 512 crops, batch 16 = 2 x 8 GPUs, 160k iterations, lr 1e-4, layer decay 0.65
    torchrun --nproc_per_node=8 main_segmentation.py --dataset ade20k --data_path /data/ADEChallengeData2016 \
        --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth --input_size 512 --batch_size 2 \
        --max_iters 160000 --lr 1e-4 --layer_decay 0.65 --weight_decay 0.05 --warmup_iters 1500 --rel_pos_bias \
        --slide --stride 341 --output_dir runs/ade_b
    python main_segmentation.py --eval --resume runs/ade_b/checkpoint.pth --dataset ade20k --data_path ... --slide
"""
import argparse
import datetime
import json
import os
import time

import torch

import models_seg
import util.misc as misc
from engine_segmentation import evaluate, train_one_epoch
from util.checkpoint import check_output_dir, checkpoint_args, load_checkpoint, resume_path, rng_state, save_epoch
from util.datasets import build_loader
from util.launch import resume_training, set_lr, setup
from util.lr_decay import param_groups_lrd
from util.pretrained import load_exact, read_checkpoint
from util.seg_datasets import EvalTransform, SegmentationDataset, TrainTransform, dataset_splits, shard_sampler


def get_args_parser():
    parser = argparse.ArgumentParser('UperNet semantic segmentation on a ViT', add_help=True)
    # --- model
    parser.add_argument('--model', default=None, help=f'encoder: {", ".join(models_seg.CONFIGS)} (default '
                        'vit_base_patch16; the architecture flags default to a resumed checkpoint\'s args)')
    parser.add_argument('--input_size', default=None, type=int, help='training crop size (default 512)')
    parser.add_argument('--finetune', default='', help='pretrained checkpoint for the encoder (MAE, CrossMAE, CMAE, fine-tuned)')
    parser.add_argument('--out_indices', default=None, type=int, nargs=4,
                        help='blocks feeding the neck (default 3 5 7 11 for depth 12, else evenly spaced)')
    parser.add_argument('--rel_pos_bias', action='store_true', default=None,
                        help='relative position bias in attention (zero-init)')
    parser.add_argument('--head_channels', default=None, type=int, help='UperNet width (default 768)')
    parser.add_argument('--aux_channels', default=None, type=int, help='auxiliary FCN head width (default 256)')
    parser.add_argument('--aux_weight', default=None, type=float, help='auxiliary loss weight (default 0.4; 0: no '
                        'auxiliary head)')
    parser.add_argument('--drop_path', default=0.1, type=float)
    # --- optimization: AdamW with layer decay, linear warmup then poly decay per iteration
    parser.add_argument('--batch_size', default=2, type=int, help='per process (effective = batch_size * accum_iter * world)')
    parser.add_argument('--accum_iter', default=1, type=int)
    parser.add_argument('--epochs', default=100, type=int, help='ignored when --max_iters is set')
    parser.add_argument('--max_iters', default=0, type=int, help='> 0: train this many iterations (epochs follow)')
    parser.add_argument('--max_steps_per_epoch', default=0, type=int, help='> 0: cap the steps of each epoch')
    parser.add_argument('--lr', type=float, default=None, help='absolute lr (default: from blr)')
    parser.add_argument('--blr', type=float, default=1.6e-3,
                        help='base lr: absolute_lr = blr * eff_batch / 256 (1.6e-3 -> 1e-4 at batch 16)')
    parser.add_argument('--min_lr', type=float, default=0.)
    parser.add_argument('--warmup_iters', type=int, default=1500)
    parser.add_argument('--poly_power', type=float, default=1.0)
    parser.add_argument('--layer_decay', type=float, default=0.65, help='lr scale layer_decay**(depth + 1 - layer_id)')
    parser.add_argument('--weight_decay', type=float, default=0.05)
    parser.add_argument('--clip_grad', type=float, default=None)
    # --- data: rescale ratio_range x base_size, crop input_size, flip, photometric distortion
    parser.add_argument('--dataset', default='folder', choices=['folder', 'ade20k'])
    parser.add_argument('--data_path', default='../shared/data/camvid', help='dataset root')
    parser.add_argument('--base_size', default=None, type=int, help='short side before the random rescale and at '
                        'evaluation (default: input_size)')
    parser.add_argument('--ratio_range', default=[0.5, 2.0], type=float, nargs=2)
    parser.add_argument('--subset', default=0, type=int, help='> 0: the first N training images')
    parser.add_argument('--eval_split', default=None, help='default: test where it exists, else val')
    # --- evaluation
    parser.add_argument('--slide', action='store_true', help='sliding-window inference (default: whole image)')
    parser.add_argument('--crop_size', default=None, type=int, help='sliding window (default: input_size)')
    parser.add_argument('--stride', default=None, type=int, help='sliding stride (default: 2/3 of the window)')
    parser.add_argument('--eval_batch_size', default=1, type=int, help='images per evaluation batch (those of one '
                        'size run in one forward)')
    parser.add_argument('--eval_freq', default=0, type=int, help='evaluate every N epochs (0: at the end only)')
    parser.add_argument('--num_figure', default=4, type=int, help='images in predictions.png')
    # --- run
    parser.add_argument('--output_dir', default='./output_dir')
    parser.add_argument('--log_dir', default=None, help='TensorBoard folder (default: output_dir)')
    parser.add_argument('--resume', default='', help='checkpoint of this model to resume or evaluate')
    parser.add_argument('--eval', action='store_true', help='only evaluate --resume and exit')
    parser.add_argument('--save_freq', default=20, type=int)
    parser.add_argument('--print_freq', default=20, type=int)
    misc.add_dist_args(parser)
    return parser


ARCH_DEFAULTS = dict(model='vit_base_patch16', input_size=512, head_channels=768, aux_channels=256, aux_weight=0.4,
                     rel_pos_bias=False, out_indices=None)


def resolve_arch(args):
    """Architecture flags not given: from the args stored in the checkpoint to resume (or evaluate), else --model
    from the --finetune checkpoint (its args, HF config or weights), else the defaults."""
    path, stored = resume_path(args), {}
    if path and any(getattr(args, k) is None for k in ARCH_DEFAULTS):
        ckpt = load_checkpoint(path)
        stored = ckpt.get('args') or {} if isinstance(ckpt, dict) else {}
        stored = stored if isinstance(stored, dict) else vars(stored)
    elif args.finetune and args.model is None:
        args.finetune_state, pretrained = read_checkpoint(args.finetune, models_seg.CONFIGS, prefix='')
        name = pretrained.get('model') or ''
        name = name.replace('mae_', '', 1).replace('_dec512d8b', '')  # a pretraining factory's encoder
        stored = {'model': name} if name in models_seg.CONFIGS else {}
    for k, default in ARCH_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, stored.get(k, default))
            print(f'--{k} {getattr(args, k)} ({"from the checkpoint" if k in stored else "default"})')


def check_args(args):
    resolve_arch(args)
    if args.model not in models_seg.CONFIGS:
        raise misc.UserError(f'unknown --model {args.model!r}; choose from: {", ".join(models_seg.CONFIGS)}')
    patch = models_seg.CONFIGS[args.model]['patch_size']
    if args.input_size % (2 * patch):
        raise misc.UserError(f'--input_size {args.input_size} must be a multiple of {2 * patch} (2 x patch size)')
    if args.eval and not resume_path(args):
        raise misc.UserError('--eval needs --resume CKPT (a segmentation checkpoint; --finetune is a pretrained '
                             'encoder without a trained head)')
    if not args.eval and args.batch_size * (args.world_size if args.device.type == 'cuda' else 1) < 2:
        raise misc.UserError('--batch_size must be at least 2: BatchNorm in the head needs 2 samples')
    args.base_size = args.base_size or args.input_size
    args.stride = args.stride or max((args.crop_size or args.input_size) * 2 // 3, 1)


def build_model(args, num_classes):
    model = models_seg.upernet_vit(args.model, num_classes, img_size=args.input_size, channels=args.head_channels,
                                   aux_channels=args.aux_channels, aux_head=args.aux_weight > 0,
                                   rel_pos_bias=args.rel_pos_bias, out_indices=args.out_indices,
                                   drop_path_rate=args.drop_path)
    if args.finetune and not args.resume:
        state = vars(args).pop('finetune_state', None) or read_checkpoint(args.finetune)[0]  # also HF / timm files
        try:
            ignored, missing = models_seg.load_pretrained(model, state)
        except ValueError as e:
            raise misc.UserError(f'{args.finetune}: {e}') from e
        print(f'loaded the encoder from {args.finetune}; not used: {len(ignored)} keys '
              f'({", ".join(sorted({k.split(".")[0] for k in ignored})) or "none"}); left at init: {missing}')
    return model


def main(args):
    setup(args, defaults=None)  # the architecture flags: resolve_arch (segmentation checkpoints and defaults)
    check_args(args)
    splits = dataset_splits(args.data_path, args.dataset) if os.path.isdir(args.data_path) else []
    args.eval_split = args.eval_split or ('test' if 'test' in splits else 'val')
    dataset_eval = SegmentationDataset(args.data_path, args.eval_split, args.dataset, EvalTransform(args.base_size))
    classes = dataset_eval.classes
    args.nb_classes = len(classes)
    if not args.eval:  # a bad label in the evaluation split is found now, not after training
        dataset_eval.check_labels()
    loader_eval = torch.utils.data.DataLoader(dataset_eval, batch_size=args.eval_batch_size, collate_fn=list,
                                              num_workers=args.num_workers,
                                              sampler=shard_sampler(len(dataset_eval), args.rank, args.world_size))
    print(f'{args.eval_split}: {len(dataset_eval)} images, {len(classes)} classes')
    model = misc.convert_sync_batchnorm(build_model(args, len(classes)), args)
    model.to(args.device)
    model_without_ddp = model
    figure = os.path.join(args.output_dir, 'predictions.png') if args.output_dir and misc.is_main_process() else None
    if args.eval:
        check_output_dir(figure and args.output_dir)  # the figure goes there
        if args.resume:
            load_exact(model, args.resume)
        evaluate(loader_eval, model, args, classes, figure, args.num_figure)
        return

    dataset_train = SegmentationDataset(args.data_path, 'train', args.dataset,
                                        TrainTransform(args.input_size, args.base_size, tuple(args.ratio_range)), args.subset)
    if dataset_train.classes != classes:
        raise misc.UserError('train and evaluation splits name different classes')
    loader_train = build_loader(dataset_train, args)
    args.iters_per_epoch = len(loader_train) if not args.max_steps_per_epoch else min(len(loader_train), args.max_steps_per_epoch)
    if args.iters_per_epoch == 0:
        raise misc.UserError(f'{len(dataset_train)} training images are fewer than one batch of {args.batch_size}')
    if args.max_iters:
        args.epochs = -(-args.max_iters // args.iters_per_epoch)
    args.total_iters = args.max_iters or args.epochs * args.iters_per_epoch
    print(f'train: {len(dataset_train)} images, {args.iters_per_epoch} iterations per epoch, {args.total_iters} in all')
    set_lr(args)
    model = misc.ddp(model, args)
    param_groups = param_groups_lrd(model_without_ddp, args.weight_decay, layer_decay=args.layer_decay,
                                    no_weight_decay_list=model_without_ddp.no_weight_decay())
    optimizer = misc.adamw(param_groups, args.device, lr=args.lr, betas=(0.9, 0.999))  # fused on CUDA
    loss_scaler = misc.LossScaler(args.device.type, enabled=args.amp == 'fp16')

    start_epoch = resume_training(args, model_without_ddp, optimizer, loss_scaler)
    log_writer = None
    if misc.is_main_process() and args.output_dir:
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir or args.output_dir)

    start_time, metrics = time.time(), None
    for epoch in range(start_epoch, args.epochs):
        loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, loader_train, optimizer, epoch, loss_scaler, args, log_writer)
        if args.output_dir:
            save_epoch({'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
                        'scaler': loss_scaler.state_dict(), 'rng': rng_state(), 'args': checkpoint_args(args)},
                       args.output_dir, args.save_freq, args.epochs)
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch}
        if epoch + 1 == args.epochs or (args.eval_freq and (epoch + 1) % args.eval_freq == 0):
            metrics = evaluate(loader_eval, model_without_ddp, args, classes,
                               figure if epoch + 1 == args.epochs else None, args.num_figure)
            log_stats.update(test_miou=metrics['miou'], test_aacc=metrics['aacc'], test_macc=metrics['macc'],
                             test_iou=metrics['iou'])
            if log_writer is not None:
                for k in ('miou', 'aacc', 'macc'):
                    log_writer.add_scalar(f'test/{k}', metrics[k], epoch)
        if log_writer is not None:
            log_writer.flush()
        if args.output_dir and misc.is_main_process():
            with open(os.path.join(args.output_dir, 'log.txt'), mode='a', encoding='utf-8') as f:
                f.write(json.dumps(log_stats) + '\n')
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return metrics


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    misc.run_main(main, args)
