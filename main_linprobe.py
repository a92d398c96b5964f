"""Linear probing: a frozen encoder, BatchNorm(affine=False) + Linear head trained with LARS (MAE recipe).

    torchrun --nproc_per_node=8 main_linprobe.py --finetune mae_pretrain_vit_base.pth \
        --batch_size 512 --accum_iter 4 --blr 0.1 --epochs 90 --warmup_epochs 10 --dist_eval --data_path /imagenet
--model and --input_size default to the --finetune checkpoint's (HF ViTMAE and timm files are read too).
"""
import argparse

import torch

import util.misc as misc
import models_vit
from engine_finetune import fit
from util.datasets import build_classification_loaders, linprobe_transform
from util.launch import CLASSIFIER_DEFAULTS, add_classification_args, place, setup
from util.lars import LARS
from util.pretrained import load_encoder


def get_args_parser():
    parser = argparse.ArgumentParser('MAE linear probing for image classification', add_help=True)
    add_classification_args(parser, models_vit.MODELS, batch_size=512, epochs=90, blr=0.1, warmup_epochs=10)
    parser.add_argument('--weight_decay', type=float, default=0, help='weight decay (0 in the MAE recipe)')
    return parser


def main(args):
    setup(args, models_vit.CONFIGS, CLASSIFIER_DEFAULTS)
    loader_train, loader_val = build_classification_loaders(args, None if args.eval else linprobe_transform(args.input_size))
    model = models_vit.create_vit(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                                  global_pool=args.global_pool)
    if args.finetune and not args.eval:
        load_encoder(model, args.finetune)
    models_vit.init_head(model, std=0.01)
    # MoCo v3 / MAE: BatchNorm without affine before the linear head, which stays a linear classifier
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    model, model_without_ddp = place(model, args)
    optimizer = LARS(model_without_ddp.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    fit(args, model, model_without_ddp, optimizer, torch.nn.CrossEntropyLoss(), loader_train, loader_val)


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    misc.run_main(main, args)
