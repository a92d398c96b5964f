"""Detection / instance segmentation transfer: ViTDet Mask R-CNN on a pretrained ViT, scored by COCO box / mask AP.

    # COCO 2017, ViT-B (ViTDet's recipe): 1024 px, batch 64 = 8 x 8 GPUs, 184375 iterations, lr 1e-4
    torchrun --nproc_per_node=8 main_detection.py --dataset coco --data_path /data/coco --model vit_base_patch16 \
        --finetune mae_pretrain_vit_base.pth --input_size 1024 --batch_size 8 --max_iters 184375 --lr 1e-4 \
        --weight_decay 0.1 --layer_decay 0.7 --drop_path 0.1 --warmup_iters 250 --rel_pos --output_dir runs/coco_b
    python main_detection.py --eval --resume runs/coco_b/checkpoint.pth --data_path /data/coco
"""
import argparse
import datetime
import json
import math
import os
import time

import models_det
import util.misc as misc
from engine_detection import evaluate, train_one_epoch
from util.checkpoint import check_output_dir, checkpoint_args, load_checkpoint, resume_path, rng_state, save_epoch
from util.det_datasets import CocoDetection, LargeScaleJitter, build_loader
from util.launch import resume_training, set_lr, setup
from util.lr_decay import param_groups_lrd
from util.pretrained import load_exact, read_checkpoint


def get_args_parser():
    parser = argparse.ArgumentParser('ViTDet Mask R-CNN detection on a ViT', add_help=True)
    # --- model (architecture flags left unset default to a resumed checkpoint's args)
    parser.add_argument('--model', default=None, help=f'encoder: {", ".join(models_det.CONFIGS)} (default '
                        'vit_base_patch16, or the --finetune checkpoint\'s)')
    parser.add_argument('--input_size', default=None, type=int, help='training crop and evaluation longer side (default 1024)')
    parser.add_argument('--finetune', default='', help='pretrained encoder (MAE, CrossMAE, CMAE, fine-tuned; HF, timm)')
    parser.add_argument('--pretrain_size', default=None, type=int, help='image size of the pos_embed grid (default: '
                        'the --finetune checkpoint\'s, else 224, 64 for micro, 32 for pico)')
    parser.add_argument('--window_size', default=None, type=int, help='attention window (default: the pretraining grid)')
    parser.add_argument('--global_blocks', default=None, type=int, nargs='*',
                        help='blocks with global attention (default 2 5 8 11 for depth 12, else evenly spaced)')
    parser.add_argument('--rel_pos', action='store_true', default=None, help='decomposed relative position (zero-init)')
    parser.add_argument('--fpn_channels', default=None, type=int, help='pyramid and head width (default 256)')
    parser.add_argument('--fc_dim', default=None, type=int, help='box head fc width (default 1024)')
    parser.add_argument('--anchor_sizes', default=None, type=int, nargs=5,
                        help='anchor size per level (default 32..512 x input_size / 1024)')
    parser.add_argument('--no_masks', action='store_true', default=None, help='Faster R-CNN: boxes only')
    parser.add_argument('--drop_path', default=0.1, type=float)
    # --- proposals and RoI sampling (torchvision's MaskRCNN arguments; those used at test time also default to
    #     a resumed checkpoint's)
    parser.add_argument('--rpn_pre_nms', default=None, type=int, nargs=2, help='proposals per level before NMS: '
                        'train, test (default 2000 1000)')
    parser.add_argument('--rpn_post_nms', default=None, type=int, nargs=2, help='proposals kept after NMS: train, '
                        'test (default 1000 1000)')
    parser.add_argument('--rpn_batch_size', default=256, type=int, help='anchors sampled per image')
    parser.add_argument('--roi_batch_size', default=512, type=int, help='RoIs sampled per image')
    parser.add_argument('--detections_per_img', default=None, type=int, help='default 100 (COCO\'s maxDets)')
    parser.add_argument('--score_thresh', default=None, type=float, help='test score threshold (default 0.05)')
    # --- optimization: AdamW, layer decay, linear warmup, x0.1 at 24/27 and 26/27 of the iterations
    parser.add_argument('--batch_size', default=1, type=int, help='per process (effective = batch_size * accum_iter * world)')
    parser.add_argument('--accum_iter', default=1, type=int, help='gradient accumulation steps')
    parser.add_argument('--epochs', default=100, type=int, help='ignored when --max_iters is set')
    parser.add_argument('--max_iters', default=0, type=int, help='> 0: train this many iterations (epochs follow)')
    parser.add_argument('--max_steps_per_epoch', default=0, type=int, help='> 0: cap the steps of each epoch')
    parser.add_argument('--lr', type=float, default=None, help='absolute lr (default: from blr)')
    parser.add_argument('--blr', type=float, default=4e-4, help='base lr: lr = blr * eff_batch / 256 (1e-4 at 64)')
    parser.add_argument('--warmup_iters', type=int, default=250)
    parser.add_argument('--warmup_factor', type=float, default=0.001)
    parser.add_argument('--layer_decay', type=float, default=0.7, help='lr scale layer_decay**(depth + 1 - layer_id)')
    parser.add_argument('--weight_decay', type=float, default=0.1)
    parser.add_argument('--clip_grad', type=float, default=None)
    # --- data: large-scale jitter (flip, rescale by U(scale_range) of input_size, crop)
    parser.add_argument('--dataset', default='coco', choices=['coco'], help='COCO-format folder (ours or 2017 layout)')
    parser.add_argument('--data_path', default='../shared/data/pennfudan', help='dataset root')
    parser.add_argument('--scale_range', default=[0.1, 2.0], type=float, nargs=2)
    parser.add_argument('--subset', default=0, type=int, help='> 0: the first N training images (by id)')
    parser.add_argument('--eval_subset', default=0, type=int, help='> 0: evaluate the first N val images (by id)')
    # --- evaluation
    parser.add_argument('--eval_batch_size', default=1, type=int)
    parser.add_argument('--eval_freq', default=0, type=int, help='evaluate every N epochs (0: at the end only)')
    parser.add_argument('--num_figure', default=4, type=int, help='images in predictions.png')
    parser.add_argument('--figure_score', default=0.5, type=float, help='score threshold of predictions.png')
    # --- run
    parser.add_argument('--output_dir', default='./output_dir')
    parser.add_argument('--log_dir', default=None, help='TensorBoard folder (default: output_dir)')
    parser.add_argument('--resume', default='', help='checkpoint of this model to resume or evaluate')
    parser.add_argument('--eval', action='store_true', help='only evaluate --resume and exit')
    parser.add_argument('--save_freq', default=20, type=int)
    parser.add_argument('--print_freq', default=20, type=int)
    misc.add_dist_args(parser)
    return parser


ARCH_DEFAULTS = dict(model='vit_base_patch16', input_size=1024, pretrain_size=None, window_size=None,
                     global_blocks=None, rel_pos=False, fpn_channels=256, fc_dim=1024, anchor_sizes=None, no_masks=False,
                     rpn_pre_nms=[2000, 1000], rpn_post_nms=[1000, 1000], detections_per_img=100, score_thresh=0.05)


def resolve_arch(args):
    """Architecture (and test-time detector) flags not given: from the args stored in the checkpoint to resume
    (or evaluate), else --model and --pretrain_size from the --finetune checkpoint (its args, HF config or
    weights), else the defaults."""
    path, stored = resume_path(args), {}
    if path and any(getattr(args, k) is None for k in ARCH_DEFAULTS):
        ckpt = load_checkpoint(path)
        stored = ckpt.get('args') or {} if isinstance(ckpt, dict) else {}
        stored = stored if isinstance(stored, dict) else vars(stored)
    elif args.finetune:
        args.finetune_state, pretrained = read_checkpoint(args.finetune, models_det.CONFIGS, prefix='')
        name = (pretrained.get('model') or '').replace('mae_', '', 1).replace('_dec512d8b', '')
        stored = {'model': name} if name in models_det.CONFIGS else {}
        pe = args.finetune_state.get('pos_embed')
        if pe is not None and pe.ndim == 3 and math.isqrt(pe.shape[1] - 1) ** 2 == pe.shape[1] - 1:
            patch = args.finetune_state['patch_embed.proj.weight'].shape[-1]
            stored['pretrain_size'] = math.isqrt(pe.shape[1] - 1) * patch  # the checkpoint's own grid
    for k, default in ARCH_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, stored.get(k, default))
            print(f'--{k} {getattr(args, k)} ({"from the checkpoint" if k in stored else "default"})')


def check_args(args):
    resolve_arch(args)
    if args.model not in models_det.CONFIGS:
        raise misc.UserError(f'unknown --model {args.model!r}; choose from: {", ".join(models_det.CONFIGS)}')
    cfg = models_det.CONFIGS[args.model]
    patch = cfg['patch_size']
    if args.input_size % (2 * patch):
        raise misc.UserError(f'--input_size {args.input_size} must be a multiple of {2 * patch} (2 x patch size)')
    args.pretrain_size = args.pretrain_size or cfg['pretrain_img_size']  # stored concrete, for --eval
    args.window_size = args.window_size or args.pretrain_size // patch
    if args.global_blocks is None:
        args.global_blocks = list(models_det.default_global_blocks(cfg['depth']))
    if any(not 0 <= b < cfg['depth'] for b in args.global_blocks):
        raise misc.UserError(f'--global_blocks {args.global_blocks} must lie in [0, {cfg["depth"]})')
    if args.eval and not resume_path(args):
        raise misc.UserError('--eval needs --resume CKPT (a detection checkpoint; --finetune is a pretrained '
                             'encoder without trained heads)')
    lo, hi = args.scale_range
    if not 0 < lo <= hi:
        raise misc.UserError(f'--scale_range {lo} {hi}: need 0 < min <= max')


def build_model(args, num_classes):
    model = models_det.vitdet(
        args.model, num_classes, args.input_size, masks=not args.no_masks, fpn_channels=args.fpn_channels,
        fc_dim=args.fc_dim, anchor_sizes=args.anchor_sizes,
        backbone_kwargs=dict(window_size=args.window_size, global_blocks=args.global_blocks, rel_pos=args.rel_pos,
                             drop_path_rate=args.drop_path, pretrain_img_size=args.pretrain_size),
        rpn_pre_nms_top_n_train=args.rpn_pre_nms[0], rpn_pre_nms_top_n_test=args.rpn_pre_nms[1],
        rpn_post_nms_top_n_train=args.rpn_post_nms[0], rpn_post_nms_top_n_test=args.rpn_post_nms[1],
        rpn_batch_size_per_image=args.rpn_batch_size, box_batch_size_per_image=args.roi_batch_size,
        box_detections_per_img=args.detections_per_img, box_score_thresh=args.score_thresh)
    if args.finetune and not resume_path(args):
        state = vars(args).pop('finetune_state', None) or read_checkpoint(args.finetune)[0]  # also HF / timm files
        try:
            ignored, missing = models_det.load_pretrained(model.backbone.net, state)
        except ValueError as e:
            raise misc.UserError(f'{args.finetune}: {e}') from e
        print(f'loaded the encoder from {args.finetune}; not used: {len(ignored)} keys '
              f'({", ".join(sorted({k.split(".")[0] for k in ignored})) or "none"}); left at init: {missing}')
    vars(args).pop('finetune_state', None)
    return model


def param_groups(model, args):
    """The ViT: layer-wise lr decay (param_groups_lrd; no weight decay on pos_embed and 1-D parameters);
    pyramid, RPN and heads: lr scale 1, no weight decay on 1-D parameters (biases, norms)."""
    groups = param_groups_lrd(model.backbone.net, args.weight_decay, layer_decay=args.layer_decay,
                              no_weight_decay_list=('pos_embed',))
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith('backbone.net.') and p.requires_grad]
    groups.append({'params': [p for n, p in rest if p.ndim > 1], 'weight_decay': args.weight_decay, 'lr_scale': 1.})
    groups.append({'params': [p for n, p in rest if p.ndim <= 1], 'weight_decay': 0., 'lr_scale': 1.})
    return groups


def main(args):
    setup(args, defaults=None)  # the architecture flags: resolve_arch (detection checkpoints and defaults)
    check_args(args)
    dataset_val = CocoDetection(args.data_path, 'val', train=False, subset=args.eval_subset)
    dataset_train = None
    if not args.eval:  # every annotation checked before the model is built
        dataset_train = CocoDetection(args.data_path, 'train', train=True, masks=not args.no_masks, subset=args.subset,
                                      transform=LargeScaleJitter(args.input_size, args.scale_range))
        if dataset_train.label_to_cat != dataset_val.label_to_cat:
            raise misc.UserError(f'{dataset_train.ann_file} and {dataset_val.ann_file} list different categories')
    loader_val = build_loader(dataset_val, args, train=False)
    print(f'val: {len(dataset_val)} images, {len(dataset_val.classes)} classes')
    model = build_model(args, len(dataset_val.classes))
    model = misc.convert_sync_batchnorm(model, args)  # none of ViTDet's norms is a BatchNorm: kept for others
    model.to(args.device)
    model_without_ddp = model
    out = args.output_dir if args.output_dir and misc.is_main_process() else None
    figure = os.path.join(out, 'predictions.png') if out else None
    results = os.path.join(out, 'coco_instances_results.json') if out else None
    if args.eval:
        check_output_dir(out)
        load_exact(model, resume_path(args))
        return evaluate(model, loader_val, dataset_val, args, results, figure, args.num_figure)

    loader_train = build_loader(dataset_train, args, train=True)
    args.iters_per_epoch = len(loader_train) if not args.max_steps_per_epoch else min(len(loader_train), args.max_steps_per_epoch)
    if args.iters_per_epoch == 0:
        raise misc.UserError(f'{len(dataset_train)} training images are fewer than one batch of {args.batch_size} '
                             f'per process')
    if args.max_iters:
        args.epochs = -(-args.max_iters // args.iters_per_epoch)
    args.total_iters = args.max_iters or args.epochs * args.iters_per_epoch  # loader steps (accum_iter per update)
    print(f'train: {len(dataset_train)} images, {args.iters_per_epoch} iterations per epoch, {args.total_iters} in all')
    set_lr(args)
    model = misc.ddp(model, args)
    optimizer = misc.adamw(param_groups(model_without_ddp, args), args.device, lr=args.lr, betas=(0.9, 0.999))
    loss_scaler = misc.LossScaler(args.device.type, enabled=args.amp == 'fp16')

    start_epoch = resume_training(args, model_without_ddp, optimizer, loss_scaler)
    log_writer = None
    if out:
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
            last = epoch + 1 == args.epochs
            metrics = evaluate(model_without_ddp, loader_val, dataset_val, args, results if last else None,
                               figure if last else None, args.num_figure)
            for t, m in metrics.items():
                log_stats.update({f'test_{t}_AP': m['stats'][0], f'test_{t}_AP50': m['stats'][1], f'test_{t}_stats': m['stats']})
                if log_writer is not None:
                    log_writer.add_scalar(f'test/{t}_AP', m['stats'][0], epoch)
                    log_writer.add_scalar(f'test/{t}_AP50', m['stats'][1], epoch)
        if log_writer is not None:
            log_writer.flush()
        if out:
            with open(os.path.join(out, 'log.txt'), mode='a', encoding='utf-8') as f:
                f.write(json.dumps(log_stats) + '\n')
    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return metrics


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    misc.run_main(main, args)
