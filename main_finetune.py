"""End-to-end fine-tuning of a pretrained encoder (MAE recipe), and evaluation of a fine-tuned checkpoint.

    torchrun --nproc_per_node=8 main_finetune.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth \
        --batch_size 32 --accum_iter 4 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 \
        --mixup 0.8 --cutmix 1.0 --reprob 0.25 --epochs 100 --dist_eval --data_path /imagenet
    python main_finetune.py --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 --data_path /imagenet
"""
import argparse

import torch
from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
import util.misc as misc
from engine_finetune import fit
from util.datasets import build_classification_loaders, finetune_transform
from util.launch import CLASSIFIER_DEFAULTS, add_classification_args, place, setup
from util.lr_decay import param_groups_lrd
from util.pretrained import load_encoder

def get_args_parser():
    parser = argparse.ArgumentParser('MAE fine-tuning for image classification', add_help=True)
    add_classification_args(parser, models_vit.MODELS, batch_size=64, epochs=50, blr=1e-3, warmup_epochs=5)
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


def main(args):
    setup(args, models_vit.CONFIGS, CLASSIFIER_DEFAULTS)
    loader_train, loader_val = build_classification_loaders(args, None if args.eval else finetune_transform(args))
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
    fit(args, model, model_without_ddp, optimizer, criterion, loader_train, loader_val, mixup_fn)


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    misc.run_main(main, args)
