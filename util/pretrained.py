"""Reading any checkpoint this project (or the originals, Hugging Face ViTMAE, timm) writes, and filling a model.

The model files are not imported here: callers pass the model, or their CONFIGS to name an architecture.
"""
from util import convert
from util.checkpoint import load_checkpoint, model_state
from util.misc import UserError
from util.pos_embed import resize_pos_embed


def read_checkpoint(path, configs=None, prefix='vit_'):
    """Any checkpoint -> (state_dict in this project's keys, args dict).

    args: the stored ones (ours, official MAE/CrossMAE), else those the weights or the HF config imply
    (input_size, norm_pix_loss, mask_ratio, decoder_depth) plus 'model' = prefix + the key of `configs` (a model
    file's CONFIGS) with the same sizes, when one matches. HF and timm weights are converted in memory."""
    ck = convert.load(path)
    for note in ck['notes']:
        print(f'{path}: {note}')
    args = dict(ck['args'])
    if configs is not None and args.get('model') is None:
        name = convert.match_config(ck['arch'], configs)
        if name is not None:
            args['model'] = prefix + name
    return ck['state'], args


def fill_from_checkpoint(args, path, configs, defaults):
    """Each flag of `defaults` that was not given (None) is taken from the checkpoint's args (see
    read_checkpoint), else from `defaults`. defaults: e.g. {'model': 'vit_base_patch16', 'input_size': 224}"""
    unset = [k for k in defaults if getattr(args, k, None) is None]
    if not unset:
        return
    stored = read_checkpoint(path, configs)[1] if path else {}
    for k in unset:
        found = stored.get(k) is not None
        setattr(args, k, stored[k] if found else defaults[k])
        print(f'--{k} {getattr(args, k)} ({"from " + path if found else "default"})')


def load_pretrained(model, state_dict):
    """Load encoder weights from a pretrain (MAE/CrossMAE/CMAE) or fine-tuned state_dict into a timm ViT `model`.

    Drops decoder/contrastive keys, resizes `pos_embed` to the model's grid, drops a head of another shape.
    Raises ValueError naming the keys when shapes differ or encoder keys are missing.
    Returns the (missing_keys, unexpected_keys) of the load; missing may only be head/fc_norm/norm.
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith(convert.PRETRAIN_ONLY)}
    own = model.state_dict()
    if 'pos_embed' in sd and sd['pos_embed'].shape != own['pos_embed'].shape:
        sd['pos_embed'] = resize_pos_embed(sd['pos_embed'], model.patch_embed.grid_size, model.num_prefix_tokens)
    for k in ('head.weight', 'head.bias'):
        if k in sd and k in own and sd[k].shape != own[k].shape:
            del sd[k]  # another number of classes: the head is trained anew
    bad = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
           for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError('checkpoint does not fit this model (another architecture?); mismatched shapes:\n  '
                         + '\n  '.join(bad))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = ('head.', 'fc_norm.', 'norm.')  # CrossMAE checkpoints have no final norm
    hard_missing = [k for k in missing if not k.startswith(allowed)]
    if hard_missing:
        raise ValueError(f'checkpoint does not fit this model; {len(hard_missing)} encoder keys are missing, '
                         f'e.g. {hard_missing[:5]} (unexpected: {unexpected[:5]})')
    return missing, unexpected


def load_encoder(model, path, state=None):
    """Loads the encoder weights of checkpoint `path` (MAE, CrossMAE, CMAE pretrain, fine-tuned, HF ViTMAE, timm)
    into model (state: the checkpoint's state_dict when already read). Prints what was not loaded; raises
    UserError when the checkpoint is of another architecture."""
    state = read_checkpoint(path)[0] if state is None else state
    try:
        missing, unexpected = load_pretrained(model, state)
    except ValueError as e:
        raise UserError(f'{path}: {e}') from e
    print(f'loaded encoder from {path}; missing: {missing}; unexpected: {unexpected}')
    return missing, unexpected


def load_exact(model, path):
    """Loads a checkpoint written for exactly this model (strict); lists the mismatched keys otherwise."""
    ckpt = load_checkpoint(path)
    state = model_state(ckpt)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise UserError(f'{path} does not fit this model (another architecture?): missing {missing[:6]}, '
                        f'unexpected {unexpected[:6]}, shape mismatches {shapes[:6]}')
    model.load_state_dict(state)
    return ckpt
