"""Checkpoints in and out: this project's format, Hugging Face ViTMAE and timm.

    python main_convert.py --src vit-mae-base/ --dst mae_vit_base.pth --to mae          # HF folder -> ours
    python main_convert.py --src output_dir/checkpoint.pth --dst vit-mae-ours --to hf    # ours -> HF folder
    python main_convert.py --src mae_pretrain_vit_base.pth --dst vit_b.safetensors --to timm

The source format is told by its keys (util/convert.py): this project's or an official MAE/CrossMAE .pth, a
ViTMAEForPreTraining folder or .safetensors (hub or transformers >= 5 naming), a timm encoder .safetensors/.pth.
--to mae:  {'model': state_dict, 'args': {...}} that loads strictly into the factory named in args['model']
           (models_mae with a decoder: main_pretrain.py --resume trains on; models_vit for an encoder).
--to hf:   a folder with config.json and model.safetensors for transformers.ViTMAEForPreTraining.from_pretrained
           (MAE decoders only: ViTMAE has no CrossMAE decoder).
--to timm: the encoder as .safetensors (or .pth) for timm.create_model('vit_base_patch16_224', pretrained=True,
           pretrained_cfg_overlay=dict(file=...), num_classes=0) (the command prints the call for the model).
"""
import argparse
import os

import torch

import models_mae
import models_vit
import util.misc as misc
from main_pretrain import build_model
from main_pretrain import get_args_parser as pretrain_parser
from util import convert
from util.checkpoint import save_checkpoint

PRETRAIN_ARCH = ('model', 'input_size', 'norm_pix_loss', 'mask_ratio', 'decoder_depth', 'cross_mae', 'weight_fm',
                 'use_input', 'self_attn')


def get_args_parser():
    parser = argparse.ArgumentParser('Convert checkpoints: ours / official MAE, Hugging Face ViTMAE, timm',
                                     add_help=True)
    parser.add_argument('--src', required=True, help='checkpoint file, HF model folder or .safetensors')
    parser.add_argument('--dst', required=True, help='output: .pth (mae), folder (hf), .safetensors or .pth (timm)')
    parser.add_argument('--to', required=True, choices=['mae', 'hf', 'timm'])
    parser.add_argument('--norm_pix_loss', action='store_true',
                        help='record norm_pix_loss in the output (official MAE .pth files do not say; they used it)')
    parser.add_argument('--debug', action='store_true', help='show tracebacks for input errors')
    return parser


def factory_key(ck, has_decoder):
    """The CONFIGS key of models_mae (with a decoder) or models_vit that the checkpoint names or matches, or None."""
    configs = models_mae.CONFIGS if has_decoder else models_vit.CONFIGS
    name = ck['args'].get('model') or ''
    key = name.replace('mae_vit_', '', 1).replace('vit_', '', 1).replace('_dec512d8b', '')
    return key if key in configs else convert.match_config(ck['arch'], configs)


def with_heads(ck, key, has_decoder):
    """arch with num_heads (and decoder_num_heads) from the source, else from the factory; UserError if unknown."""
    arch = dict(ck['arch'])
    cfg = (models_mae.CONFIGS if has_decoder else models_vit.CONFIGS).get(key, {})
    for k in ('num_heads', 'decoder_num_heads') if has_decoder else ('num_heads',):
        arch[k] = arch.get(k) or cfg.get(k)
        if arch[k] is None:
            raise misc.UserError(f'cannot tell the number of attention heads ({k}) of a width-{arch["embed_dim"]}, '
                                 f'depth-{arch["depth"]} ViT: no factory has these sizes and the source does not say')
    return arch


def no_factory(src, arch, has_decoder):
    sizes = ', '.join(f'{k}={v}' for k, v in arch.items() if v is not None and k not in ('img_size', 'in_chans'))
    return misc.UserError(f'{src}: no factory in {"models_mae" if has_decoder else "models_vit"}.py has these sizes '
                          f'({sizes}); add one to its CONFIGS, or convert --to hf/timm')


def check_fits(model, state, what):
    """Strict: same keys and shapes as `model` (built on the meta device)."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise misc.UserError(f'the converted weights do not fit {what}: missing {convert.few(missing)}, '
                             f'unexpected {convert.few(unexpected)}, shape mismatches {convert.few(shapes)}')


def to_mae(ck, args):
    state, has_decoder = ck['state'], 'decoder_pred.weight' in ck['state']
    key = factory_key(ck, has_decoder)
    if key is None:
        raise no_factory(args.src, ck['arch'], has_decoder)
    out, arch = dict(ck['args']), ck['arch']
    if has_decoder:
        out['model'] = out.get('model') or f'mae_vit_{key}'
        derived = dict(input_size=arch['img_size'], decoder_depth=arch['decoder_depth'], cross_mae=arch['cross_mae'],
                       weight_fm=arch.get('weight_fm', False), use_input=arch.get('use_input', False),
                       self_attn=arch.get('self_attn', False), norm_pix_loss=False)
        out.update({k: v for k, v in derived.items() if out.get(k) is None})
        out['norm_pix_loss'] = out['norm_pix_loss'] or args.norm_pix_loss
        out.setdefault('contrastive', any(k.startswith(convert.CMAE_ONLY) for k in state))
        cfg = pretrain_parser().parse_args([])
        for k, v in out.items():
            if hasattr(cfg, k) and v is not None:
                setattr(cfg, k, v)
        cfg.flash_attn, cfg.device, cfg.amp = False, torch.device('cpu'), 'none'
        with torch.device('meta'):
            model = build_model(cfg)
        check_fits(model, state, f'{cfg.model} (cross_mae={cfg.cross_mae}, weight_fm={cfg.weight_fm}, '
                                 f'decoder_depth={cfg.decoder_depth})')
    else:
        out['model'] = out.get('model') or f'vit_{key}'
        out.setdefault('input_size', arch['img_size'])
        out.setdefault('global_pool', 'fc_norm.weight' in state)
        out.setdefault('nb_classes', state['head.weight'].shape[0] if 'head.weight' in state else 0)
        with torch.device('meta'):
            model = models_vit.create_vit(out['model'], img_size=out['input_size'], num_classes=out['nb_classes'],
                                          global_pool=out['global_pool'])
        check_fits(model, state, f'{out["model"]} (global_pool={out["global_pool"]}, nb_classes={out["nb_classes"]})')
    out = {k: v for k, v in out.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    save_checkpoint({'model': state, 'args': out}, args.dst)
    print(f'wrote {args.dst}: {len(state)} tensors for {out["model"]} at {out["input_size"]} px'
          + (f' ({", ".join(f"{k}={out[k]}" for k in PRETRAIN_ARCH[2:] if k in out)})' if has_decoder else ''))


def to_hf(ck, args):
    state, arch = ck['state'], ck['arch']
    if 'decoder_pred.weight' not in state or arch.get('cross_mae'):
        raise misc.UserError(f'{args.src}: --to hf needs an MAE decoder (ViTMAEForPreTraining has '
                             f'{"no CrossMAE decoder" if arch.get("cross_mae") else "a decoder; this is an encoder"}); '
                             '--to timm exports the encoder')
    if os.path.isfile(args.dst):
        raise misc.UserError(f'--to hf writes a folder, but --dst {args.dst} is a file')
    dropped = [k for k in state if k.startswith(convert.CMAE_ONLY)]
    if dropped:
        print(f'dropped (no ViTMAE counterpart): {convert.dropped_summary(dropped)}')
    state = {k: v for k, v in state.items() if k not in dropped}
    arch = with_heads(ck, factory_key(ck, True), True)
    config = convert.hf_config(arch, ck['args'].get('mask_ratio', 0.75),
                               ck['args'].get('norm_pix_loss') or args.norm_pix_loss)
    try:
        hf = convert.mae_to_hf(state)
    except misc.UserError as e:
        raise misc.UserError(f'{args.src}: {e}') from e
    convert.save_hf_folder(hf, config, args.dst)
    print(f'wrote {args.dst}/config.json and model.safetensors ({len(hf)} tensors; width {arch["embed_dim"]}, '
          f'depth {arch["depth"]}, decoder {arch["decoder_embed_dim"]}/{arch["decoder_depth"]}, '
          f'layer_norm_eps {convert.MAE_LN_EPS:g}, norm_pix_loss {config["norm_pix_loss"]})')


def to_timm(ck, args):
    state, dropped = convert.mae_to_timm(ck['state'])
    if dropped:
        print(f'dropped (not part of the encoder): {convert.dropped_summary(dropped)}')
    if 'norm.weight' not in state and 'fc_norm.weight' not in state:
        d = state['cls_token'].shape[-1]
        state.update({'norm.weight': torch.ones(d), 'norm.bias': torch.zeros(d)})
        print('the source has no final norm (CrossMAE with weighted feature maps): '
              'wrote norm.weight = 1, norm.bias = 0')
    has_decoder = 'decoder_pred.weight' in ck['state']
    key = factory_key(ck, has_decoder)
    arch = with_heads(ck, key, has_decoder)
    meta = {'num_heads': str(arch['num_heads'])}
    if args.dst.endswith('.safetensors'):
        convert.save_safetensors(state, args.dst, meta)
    else:
        save_checkpoint(state, args.dst)
    name = convert.TIMM_NAMES.get(key, 'vit_base_patch16_224')
    std = dict(models_vit.CONFIGS.get(key, {}), img_size=224) if key in convert.TIMM_NAMES else {}
    kw = dict(img_size=arch['img_size'], patch_size=arch['patch_size'], embed_dim=arch['embed_dim'],
              depth=arch['depth'], num_heads=arch['num_heads'])
    extra = ''.join(f', {k}={v}' for k, v in kw.items() if std.get(k) != v)
    if 'fc_norm.weight' in state:
        extra += ", global_pool='avg'"
    print(f'wrote {args.dst}: {len(state)} encoder tensors; load with timm.create_model({name!r}, pretrained=True, '
          f'pretrained_cfg_overlay=dict(file={args.dst!r}), num_classes=0{extra})')
    if 'fc_norm.weight' not in state:
        print("  (features as this project's k-NN / probe take them, the mean of the normed patch tokens: add "
              "global_pool='avg', fc_norm=False)")


def main(args):
    misc.setup_for_distributed(True)
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise misc.UserError('--dst must differ from --src')
    ck = convert.load(args.src)
    for note in ck['notes']:
        print(f'{args.src}: {note}')
    if ck['format'] == 'mae':
        unknown = [k for k in ck['state'] if not (convert.VIT_KEY.match(k) or k.startswith(convert.PRETRAIN_ONLY))]
        if unknown:
            raise misc.UserError(f'{args.src}: cannot map {len(unknown)} keys, e.g. {convert.few(unknown)}')
    print(f'{args.src}: {ck["format"]} format, {len(ck["state"])} tensors')
    if os.path.dirname(os.path.abspath(args.dst)):
        os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    {'mae': to_mae, 'hf': to_hf, 'timm': to_timm}[args.to](ck, args)


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    misc.run_main(main, args)
