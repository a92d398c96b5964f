"""What the fine-tuning-style scripts (fine-tuning, linear probing, segmentation, detection) do around their
training loop: process setup and seeds, the lr from the effective batch, the model on its device in DDP."""
import random

import numpy as np
import torch

import util.misc as misc
from util.checkpoint import check_output_dir, resume_path, set_rng_state
from util.pretrained import fill_from_checkpoint, load_exact

CLASSIFIER_DEFAULTS = {'model': 'vit_base_patch16', 'input_size': 224}  # when neither a flag nor the checkpoint says


def add_classification_args(parser, model_names, batch_size, epochs, blr, warmup_epochs):
    """Flags that fine-tuning and linear probing share."""
    parser.add_argument('--batch_size', default=batch_size, type=int,
                        help='batch size per process (effective batch = batch_size * accum_iter * world_size)')
    parser.add_argument('--epochs', default=epochs, type=int)
    parser.add_argument('--accum_iter', default=1, type=int, help='gradient accumulation steps')
    parser.add_argument('--max_steps_per_epoch', default=0, type=int, help='> 0: cap the steps of each epoch')
    parser.add_argument('--model', default=None, type=str, metavar='MODEL',
                        help=f'one of: {", ".join(model_names)} (or the mae_vit_* pretrain name); '
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


def setup(args, configs=None, defaults=None):
    """Process group, precision, --model/--input_size from the checkpoint (matched against `configs`, falling
    back to `defaults`; None: the caller resolves them), output folder and seeds: shared by fine-tuning,
    probing, segmentation and detection."""
    misc.init_distributed_mode(args)
    misc.resolve_amp(args)
    if defaults:
        fill_from_checkpoint(args, args.finetune if args.finetune and not args.eval else args.resume,
                             configs, defaults)
    check_output_dir(args.output_dir if misc.is_main_process() and not args.eval else '')
    print(', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    seed = args.seed + misc.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def set_lr(args):
    eff_batch = args.batch_size * args.accum_iter * misc.get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    print(f'base lr: {args.lr * 256 / eff_batch:.2e}, actual lr: {args.lr:.2e}, effective batch size: {eff_batch}')


def place(model, args):
    """Moves the model to the device, sets args.lr from blr and wraps the model in DDP when distributed.
    -> (model to train, model_without_ddp)"""
    model.to(args.device)
    print(f'model: {args.model}, {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.3f}M trainable')
    set_lr(args)
    wrapped = misc.ddp(model, args)
    if getattr(args, 'compile', False):  # after DDP, as main_pretrain; checkpoints use the bare model
        wrapped = torch.compile(wrapped)
    return wrapped, model


def resume_training(args, model_without_ddp, optimizer, loss_scaler):
    """Loads --resume (or output_dir/checkpoint.pth) into the model and, when training from a checkpoint that has
    them, the optimizer, the loss scaler and rank 0's RNG state. -> the epoch to start at (0: none to resume)."""
    path = resume_path(args)
    if not path:
        return 0
    ckpt, start = load_exact(model_without_ddp, path), 0
    if 'optimizer' in ckpt and not getattr(args, 'eval', False):
        misc.load_optimizer_state(optimizer, ckpt['optimizer'])
        loss_scaler.load_state_dict(ckpt.get('scaler'))
        start = ckpt['epoch'] + 1
        if 'rng' in ckpt and misc.get_rank() == 0:
            set_rng_state(ckpt['rng'])
    print(f'resumed from {path} at epoch {start}')
    return start
