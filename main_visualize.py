"""Pictures of a trained model: reconstruction grids (MAE/CrossMAE/CMAE) and attention rollout overlays.

    python main_visualize.py --checkpoint output_dir/checkpoint.pth --out recon.png
    python main_visualize.py --checkpoint mae_visualize_vit_large.pth --model mae_vit_large_patch16 --input_size 224
    python main_visualize.py --rollout --checkpoint output_dir/checkpoint.pth --out rollout.png
The architecture comes from the args stored in our checkpoints (or an HF ViTMAE config, or the weights); flags
given here override it. HF ViTMAE folders/.safetensors and (for --rollout) timm encoder files are read too.
"""
import argparse

import torch

import masking
import models_mae
import models_vit
import util.misc as misc
from main_pretrain import build_model
from main_pretrain import get_args_parser as pretrain_parser
from util.datasets import balanced_subset, build_dataset, eval_transform
from util.pretrained import load_encoder, read_checkpoint
from util.rollout import attention_maps, rollout
from util.visualize import reconstruct, save_figure, to_pixels

ARCH = ('model', 'input_size', 'norm_pix_loss', 'cross_mae', 'weight_fm', 'use_fm', 'use_input', 'self_attn',
        'decoder_depth', 'mask_ratio', 'kept_mask_ratio')


def get_args_parser():
    parser = argparse.ArgumentParser('Reconstruction figures and attention rollout', add_help=True)
    parser.add_argument('--checkpoint', required=True,
                        help='pretrain checkpoint (ours, an official MAE/CrossMAE one, an HF ViTMAE folder/.safetensors)')
    parser.add_argument('--out', default='recon.png')
    parser.add_argument('--data_path', default='../shared/data/imagenette2-224')
    parser.add_argument('--split', default='val')
    parser.add_argument('--num_images', default=4, type=int)
    parser.add_argument('--mask_type', default='random', choices=masking.MASK_TYPES)
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--unnorm', default='visible', choices=['visible', 'own'],
                        help='norm_pix models: pixel statistics from the visible patches (default) or, as the '
                             'original demo, from each hidden patch itself (leaks the answer)')
    parser.add_argument('--rollout', action='store_true', help='attention rollout overlay instead (cls-token ViT)')
    parser.add_argument('--fuse', default='mean', choices=['mean', 'max', 'min'])
    parser.add_argument('--discard_ratio', default=0.9, type=float)
    # architecture overrides (default: what the checkpoint's args say)
    parser.add_argument('--model', default=None)
    parser.add_argument('--input_size', default=None, type=int)
    parser.add_argument('--norm_pix_loss', default=None, action='store_true')
    parser.add_argument('--cross_mae', default=None, action='store_true')
    parser.add_argument('--weight_fm', default=None, action='store_true')
    parser.add_argument('--use_input', default=None, action='store_true')
    parser.add_argument('--self_attn', default=None, action='store_true')
    parser.add_argument('--use_fm', default=None, type=int, nargs='+')
    parser.add_argument('--decoder_depth', default=None, type=int)
    parser.add_argument('--mask_ratio', default=None, type=float)
    parser.add_argument('--kept_mask_ratio', default=None, type=float)
    parser.add_argument('--debug', action='store_true')
    return parser


def architecture(args, stored):
    """Pretrain args: parser defaults, then the checkpoint's stored args, then flags given here."""
    cfg = pretrain_parser().parse_args([])
    stored = vars(stored) if isinstance(stored, argparse.Namespace) else (stored or {})
    for k in ARCH:
        if stored.get(k) is not None:
            setattr(cfg, k, stored[k])
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    if cfg.kept_mask_ratio is None or not cfg.cross_mae:
        cfg.kept_mask_ratio = cfg.mask_ratio
    cfg.contrastive, cfg.flash_attn, cfg.device, cfg.amp = False, False, torch.device('cpu'), 'none'
    return cfg


def load_images(args, size):
    ds = build_dataset(args.data_path, args.split, eval_transform(size))
    ds.samples = balanced_subset(ds.samples, len(ds.classes), args.num_images)
    return torch.stack([ds[i][0] for i in range(len(ds.samples))])


def reconstruction_figure(args):
    state, stored = read_checkpoint(args.checkpoint, models_mae.CONFIGS, prefix='mae_vit_')
    if 'decoder_pred.weight' not in state:
        raise misc.UserError(f'{args.checkpoint} holds an encoder only (no decoder to reconstruct with); '
                             'use --rollout')
    cfg = architecture(args, stored)
    model = build_model(cfg)
    state = {k: v for k, v in state.items()
             if not k.startswith(('target_', 'projector.', 'predictor.', 'feat_decoder'))}  # CMAE extras
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise misc.UserError(f'{args.checkpoint} does not fit {cfg.model} (cross_mae={cfg.cross_mae}, weight_fm='
                             f'{cfg.weight_fm}): {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}')
    imgs = load_images(args, cfg.input_size)
    torch.manual_seed(args.seed)
    gen = masking.MaskGenerator(args.mask_type, model.grid_size, cfg.mask_ratio, seed=args.seed)
    noise = gen(imgs.shape[0])
    panels = reconstruct(model, imgs, noise, cfg.mask_ratio, cfg.kept_mask_ratio, args.unnorm)
    stats = ('hidden patches un-normalized with their OWN statistics (leaks the answer)' if args.unnorm == 'own'
             else 'hidden patches un-normalized with visible-patch statistics') if cfg.norm_pix_loss else 'pixel targets'
    title = (f'{cfg.model} {"CrossMAE " if cfg.cross_mae else ""}mask {args.mask_type} {cfg.mask_ratio}'
             f'{f" (predicted {cfg.kept_mask_ratio})" if cfg.cross_mae else ""}, seed {args.seed}; {stats}')
    save_figure(panels, args.out, title)
    print(f'wrote {args.out}: {title}')
    return panels


def rollout_figure(args):
    state, stored = read_checkpoint(args.checkpoint, models_vit.CONFIGS)
    cfg = architecture(args, stored)  # flags given here take precedence
    name, size = cfg.model, cfg.input_size
    model = models_vit.create_vit(name, img_size=size, num_classes=0, global_pool=False)
    load_encoder(model, args.checkpoint, state)
    imgs = load_images(args, size)
    maps, _ = rollout(attention_maps(model.eval(), imgs), args.fuse, args.discard_ratio)
    g = model.patch_embed.grid_size
    heat = torch.nn.functional.interpolate(maps.view(-1, 1, *g), size=(size, size), mode='bilinear')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(imgs), 2, figsize=(4, 2 * len(imgs) + 0.4), squeeze=False)
    for i, img in enumerate(to_pixels(imgs)):
        axes[i, 0].imshow(img.permute(1, 2, 0).numpy())
        axes[i, 1].imshow(img.permute(1, 2, 0).numpy())
        axes[i, 1].imshow(heat[i, 0].numpy(), cmap='jet', alpha=0.5, vmin=0, vmax=1)
        for ax in axes[i]:
            ax.axis('off')
    fig.suptitle(f'attention rollout ({args.fuse}, discard {args.discard_ratio})', fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f'wrote {args.out}')
    return maps


def main(args):
    misc.setup_for_distributed(True)
    return rollout_figure(args) if args.rollout else reconstruction_figure(args)


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    misc.run_main(main, args)
