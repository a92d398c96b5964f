"""Checkpoint formats in and out: this project's keys (= official MAE / CrossMAE), Hugging Face ViTMAE, timm ViT.

Sources are told apart by their keys:
- 'hf': transformers' ViTMAEForPreTraining (or ViTMAEModel): a folder with config.json and model.safetensors
  (or pytorch_model.bin), or a .safetensors file. Keys as on the hub (vit.encoder.layer.N.attention.attention.query,
  intermediate.dense, ...), as transformers >= 5 names its modules (vit.layers.N.attention.q_proj, mlp.fc1, ...),
  or as its save_pretrained writes them (hub names, decoder layers as decoder.decoder_encoder.layer.N in 5.x).
- 'timm': a bare ViT encoder state_dict (.safetensors or .pth) with timm's keys (blocks.N.attn.qkv, ...).
- 'mae': everything else with this project's keys: {'model': ..., 'args': ...} files (ours, official MAE,
  CrossMAE, fine-tuned), or a bare state_dict with a decoder.
Reading needs torch, safetensors and json only; transformers is never imported here.
"""
import json
import math
import os
import re

import torch

from util.checkpoint import load_checkpoint, model_state
from util.misc import UserError

HF_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
MAE_LN_EPS = 1e-6  # the LayerNorm eps of MAE and of this project's factories

# this project's key (prefix) -> the hub's ViTMAEForPreTraining key (prefix)
HF_TOP = {'cls_token': 'vit.embeddings.cls_token', 'pos_embed': 'vit.embeddings.position_embeddings',
          'patch_embed.proj.': 'vit.embeddings.patch_embeddings.projection.', 'norm.': 'vit.layernorm.',
          'mask_token': 'decoder.mask_token', 'decoder_pos_embed': 'decoder.decoder_pos_embed',
          'decoder_embed.': 'decoder.decoder_embed.', 'decoder_norm.': 'decoder.decoder_norm.',
          'decoder_pred.': 'decoder.decoder_pred.'}
HF_BLOCKS = {'blocks': 'vit.encoder.layer', 'decoder_blocks': 'decoder.decoder_layers'}
HF_LAYER = {'attn.proj.': 'attention.output.dense.', 'mlp.fc1.': 'intermediate.dense.', 'mlp.fc2.': 'output.dense.',
            'norm1.': 'layernorm_before.', 'norm2.': 'layernorm_after.'}
HF_QKV = ('attention.attention.query.', 'attention.attention.key.', 'attention.attention.value.')
# what transformers >= 5 writes, per layer -> the hub's naming
HF5_LAYER = {'attention.q_proj.': HF_QKV[0], 'attention.k_proj.': HF_QKV[1], 'attention.v_proj.': HF_QKV[2],
             'attention.o_proj.': 'attention.output.dense.', 'mlp.fc1.': 'intermediate.dense.',
             'mlp.fc2.': 'output.dense.'}
HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act='gelu', layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                   qkv_bias=True, decoder_num_attention_heads=16, decoder_hidden_size=512,
                   decoder_num_hidden_layers=8, decoder_intermediate_size=2048, mask_ratio=0.75, norm_pix_loss=False)
# a ViT encoder in timm's (= this project's) keys (a linear probe's head.0/head.1 are folded first: fold_probe_head)
VIT_KEY = re.compile(r'^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|(norm|fc_norm)\.(weight|bias)'
                     r'|head\.[\w.]+|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$')
# this project's keys beyond the encoder: decoders (MAE, CrossMAE) and CMAE's branch
PRETRAIN_ONLY = ('decoder_', 'mask_token', 'dec_norms.', 'wfm.', 'target_', 'projector.', 'predictor.', 'feat_decoder')
CMAE_ONLY = ('target_', 'projector.', 'predictor.', 'feat_decoder')
TIMM_NAMES = {'tiny_patch16': 'vit_tiny_patch16_224', 'small_patch16': 'vit_small_patch16_224',
              'base_patch16': 'vit_base_patch16_224', 'large_patch16': 'vit_large_patch16_224',
              'huge_patch14': 'vit_huge_patch14_224'}


def few(keys, n=4):
    keys = list(keys)
    return f'{keys[:n]}' + (f' and {len(keys) - n} more' if len(keys) > n else '')


# ---------------------------------------------------------------- reading

def is_hf_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json')) and \
        any(os.path.isfile(os.path.join(path, f)) for f in HF_WEIGHTS)


def read_safetensors(path):
    """-> (state_dict, metadata dict)"""
    from safetensors import safe_open
    try:
        with safe_open(path, framework='pt') as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f'cannot read {path} as safetensors: {first}') from e


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {path}: {e}') from e


def read_raw(path):
    """A checkpoint file or HF folder as stored. -> (state_dict, stored args dict or None, HF config or None,
    safetensors metadata, wrapped: whether the state_dict sat inside {'model': ...})"""
    config, metadata = None, {}
    if os.path.isdir(path):
        if not is_hf_folder(path):
            raise UserError(f'{path} is a folder but not a Hugging Face model folder '
                            f'(config.json + {" or ".join(HF_WEIGHTS)})')
        config = read_json(os.path.join(path, 'config.json'))
        path = next(os.path.join(path, f) for f in HF_WEIGHTS if os.path.isfile(os.path.join(path, f)))
    if not os.path.isfile(path):
        raise UserError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        state, metadata = read_safetensors(path)
        return state, None, config, metadata, False
    ckpt = load_checkpoint(path)
    state = model_state(ckpt)
    args = ckpt.get('args') if isinstance(ckpt, dict) and state is not ckpt else None
    args = vars(args) if hasattr(args, '__dict__') else args
    return state, dict(args) if isinstance(args, dict) else None, config, metadata, state is not ckpt


def detect(state):
    """'hf', 'mae' (this project's keys, with or without a decoder) or None."""
    if any(k.startswith(('vit.', 'decoder.decoder_', 'embeddings.patch_embeddings.', 'encoder.layer.')) for k in state):
        return 'hf'
    if 'patch_embed.proj.weight' in state and any(k.startswith('blocks.') for k in state):
        return 'mae'
    return None


# ---------------------------------------------------------------- key maps

def hf_to_mae(state):
    """ViTMAEForPreTraining / ViTMAEModel weights (either naming) -> this project's keys; q, k, v are stacked into
    qkv. Raises UserError naming the keys it cannot map."""
    out, qkv, unknown = {}, {}, []
    to_ours = {hf: ours for ours, hf in HF_TOP.items()}
    for key, v in state.items():
        k = key if key.startswith(('vit.', 'decoder.')) else 'vit.' + key  # ViTMAEModel has no 'vit.' prefix
        k = re.sub(r'^vit\.layers\.', 'vit.encoder.layer.', k)  # transformers >= 5 (its modules)
        k = re.sub(r'^decoder\.decoder_encoder\.layer\.', 'decoder.decoder_layers.', k)  # its save_pretrained (5.x)
        m = re.match(r'^(vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)$', k)
        if m:
            rest = m[3]
            for new, hub in HF5_LAYER.items():
                if rest.startswith(new):
                    rest = hub + rest[len(new):]
                    break
            prefix = 'blocks' if m[1].startswith('vit') else 'decoder_blocks'
            for i, hub in enumerate(HF_QKV):
                if rest.startswith(hub) and rest[len(hub):] in ('weight', 'bias'):
                    qkv.setdefault(f'{prefix}.{m[2]}.attn.qkv.{rest[len(hub):]}', [None] * 3)[i] = v
                    break
            else:
                ours = next((o for o, h in HF_LAYER.items() if rest.startswith(h)), None)
                if ours is None or rest[len(HF_LAYER[ours]):] not in ('weight', 'bias'):
                    unknown.append(key)
                else:
                    out[f'{prefix}.{m[2]}.{ours}{rest[len(HF_LAYER[ours]):]}'] = v
            continue
        hub = next((h for h in to_ours if k == h or (h.endswith('.') and k.startswith(h))), None)
        if hub is None:
            unknown.append(key)
        else:
            out[to_ours[hub] + k[len(hub):]] = v
    for k, parts in qkv.items():
        if any(p is None for p in parts):
            unknown.append(k.replace('qkv', 'query/key/value'))
        else:
            out[k] = torch.cat(parts, dim=0)
    if unknown:
        raise UserError(f'cannot map {len(unknown)} keys to a ViTMAE encoder/decoder, e.g. {few(unknown)}')
    return out


def mae_to_hf(state):
    """This project's MAE keys -> ViTMAEForPreTraining keys as on the hub (transformers 4 and >= 5 read them).
    Raises UserError for keys ViTMAE has no place for (CrossMAE's decoder, CMAE's branch: drop those first)."""
    out, unknown = {}, []
    for k, v in state.items():
        m = re.match(r'^(blocks|decoder_blocks)\.(\d+)\.(.+)$', k)
        if m:
            pre, rest = f'{HF_BLOCKS[m[1]]}.{m[2]}.', m[3]
            if rest in ('attn.qkv.weight', 'attn.qkv.bias'):
                for hub, part in zip(HF_QKV, v.chunk(3, dim=0)):
                    out[pre + hub + rest.split('.')[-1]] = part
                continue
            ours = next((o for o in HF_LAYER if rest.startswith(o)), None)
            if ours is None:
                unknown.append(k)
            else:
                out[pre + HF_LAYER[ours] + rest[len(ours):]] = v
            continue
        ours = next((o for o in HF_TOP if k == o or (o.endswith('.') and k.startswith(o))), None)
        if ours is None:
            unknown.append(k)
        else:
            out[HF_TOP[ours] + k[len(ours):]] = v
    if unknown:
        raise UserError(f'no ViTMAEForPreTraining counterpart for {len(unknown)} keys, e.g. {few(unknown)}')
    return out


def mae_to_timm(state):
    """This project's keys -> the ViT encoder in timm's keys. -> (encoder state_dict, dropped keys)"""
    keep = {k: v for k, v in state.items() if VIT_KEY.match(k)}
    return keep, [k for k in state if k not in keep]


def fold_probe_head(state, eps=1e-6):
    """The linear probe's head, BatchNorm1d(affine=False, eps) + Linear (head.0.*, head.1.*), as the one Linear
    it computes (head.weight, head.bias): W' = W / sqrt(var + eps), b' = b - W' mean. Other states unchanged.
    -> (state, folded: bool)"""
    if 'head.0.running_var' not in state or 'head.1.weight' not in state:
        return state, False
    scale = (state['head.0.running_var'].double() + eps).rsqrt()
    w = state['head.1.weight'].double() * scale
    b = state['head.1.bias'].double() - w @ state['head.0.running_mean'].double()
    out = {k: v for k, v in state.items() if not k.startswith(('head.0.', 'head.1.'))}
    dtype = state['head.1.weight'].dtype
    out.update({'head.weight': w.to(dtype), 'head.bias': b.to(dtype)})
    return out, True


def dropped_summary(keys):
    """['decoder_blocks.0.norm1.weight', 'mask_token', ...] -> 'decoder_blocks.* (96), mask_token (1)'"""
    groups = {}
    for k in keys:
        g = k.split('.')[0] + ('.*' if '.' in k else '')
        groups[g] = groups.get(g, 0) + 1
    return ', '.join(f'{g} ({n})' for g, n in groups.items())


# ---------------------------------------------------------------- architecture

def arch_from_state(state):
    """Sizes read off this project's keys (the number of heads is not in the weights). -> dict of
    MaskedAutoencoderViT keyword arguments, num_heads None; decoder entries only when there is a decoder."""
    w = state['patch_embed.proj.weight']  # [D, C, p, p]
    depth = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.'))
    n_pos = state['pos_embed'].shape[1] - 1 if 'pos_embed' in state else 0
    g = math.isqrt(n_pos)
    arch = dict(img_size=g * w.shape[-1] if g * g == n_pos and n_pos else None, patch_size=w.shape[-1],
                in_chans=w.shape[1], embed_dim=w.shape[0], depth=depth, num_heads=None,
                mlp_ratio=state['blocks.0.mlp.fc1.weight'].shape[0] / w.shape[0])
    if 'decoder_pred.weight' in state:
        cross = any('.cross_attn.' in k for k in state)
        arch.update(decoder_embed_dim=state['decoder_pred.weight'].shape[1], decoder_num_heads=None,
                    decoder_depth=1 + max(int(k.split('.')[1]) for k in state if k.startswith('decoder_blocks.')),
                    cross_mae=cross)
        if cross:
            arch.update(weight_fm='wfm.linear.weight' in state, self_attn=any('.self_attn.' in k for k in state))
            if arch['weight_fm']:
                arch['use_input'] = state['wfm.linear.weight'].shape[1] == depth + 1
    return arch


def arch_from_hf_config(config):
    """A ViTMAEConfig (as a dict) -> (MaskedAutoencoderViT keyword arguments, mask_ratio, layer_norm_eps).
    Raises UserError for settings this project's ViT has no counterpart for."""
    c = {**HF_DEFAULTS, **config}
    size, patch = c['image_size'], c['patch_size']
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    patch = patch[0] if isinstance(patch, (list, tuple)) and len(set(patch)) == 1 else patch
    if not isinstance(size, int) or not isinstance(patch, int):
        raise UserError(f'non-square image_size {c["image_size"]} / patch_size {c["patch_size"]} in the HF config')
    ratio = c['intermediate_size'] / c['hidden_size']
    dec_ratio = c['decoder_intermediate_size'] / c['decoder_hidden_size']
    bad = [f'{k}={c[k]}' for k, ok in (('hidden_act', c['hidden_act'] == 'gelu'), ('qkv_bias', c['qkv_bias']),
                                        ('decoder_intermediate_size', ratio == dec_ratio)) if not ok]
    if bad:
        raise UserError(f'HF config has {", ".join(bad)}; this project\'s ViT uses exact GELU, qkv biases and one MLP '
                        'ratio for encoder and decoder')
    arch = dict(img_size=size, patch_size=patch, in_chans=c['num_channels'], embed_dim=c['hidden_size'],
                depth=c['num_hidden_layers'], num_heads=c['num_attention_heads'], mlp_ratio=ratio,
                decoder_embed_dim=c['decoder_hidden_size'], decoder_depth=c['decoder_num_hidden_layers'],
                decoder_num_heads=c['decoder_num_attention_heads'], norm_pix_loss=bool(c['norm_pix_loss']),
                cross_mae=False)
    return arch, c['mask_ratio'], c['layer_norm_eps']


def hf_config(arch, mask_ratio=0.75, norm_pix_loss=False):
    """MaskedAutoencoderViT sizes -> a ViTMAEConfig dict, with MAE's LayerNorm eps (1e-6)."""
    return {'architectures': ['ViTMAEForPreTraining'], 'model_type': 'vit_mae',
            'hidden_size': arch['embed_dim'], 'num_hidden_layers': arch['depth'],
            'num_attention_heads': arch['num_heads'], 'intermediate_size': int(arch['embed_dim'] * arch['mlp_ratio']),
            'hidden_act': 'gelu', 'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
            'initializer_range': 0.02, 'layer_norm_eps': MAE_LN_EPS, 'image_size': arch['img_size'],
            'patch_size': arch['patch_size'], 'num_channels': arch['in_chans'], 'qkv_bias': True,
            'decoder_num_attention_heads': arch['decoder_num_heads'], 'decoder_hidden_size': arch['decoder_embed_dim'],
            'decoder_num_hidden_layers': arch['decoder_depth'],
            'decoder_intermediate_size': int(arch['decoder_embed_dim'] * arch['mlp_ratio']),
            'mask_ratio': mask_ratio, 'norm_pix_loss': bool(norm_pix_loss)}


def match_config(arch, configs):
    """The key of `configs` (a model file's CONFIGS) whose sizes equal arch's known ones (img_size and
    decoder_depth may differ), or None."""
    fields = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'decoder_embed_dim', 'decoder_num_heads', 'mlp_ratio')
    for name, cfg in configs.items():
        if all(arch.get(f) is None or f not in cfg or cfg[f] == arch[f] for f in fields) and \
                all(f in arch or not f.startswith('decoder') for f in cfg):
            return name
    return None


# ---------------------------------------------------------------- one entry point

def load(path):
    """Any checkpoint -> dict(state: this project's keys, format: 'mae' | 'hf' | 'timm', args: the stored args
    (ours) or those an HF config / timm file implies (input_size, norm_pix_loss, mask_ratio, decoder_depth,
    global_pool), arch: sizes (num_heads from the HF config or the file's metadata, else None), notes: lines
    worth printing). HF and timm weights are converted in memory."""
    state, args, config, metadata, wrapped = read_raw(path)
    fmt, notes = detect(state), []
    if fmt is None:
        raise UserError(f'{path}: cannot tell the format from its keys (not this project\'s/MAE\'s, HF ViTMAE or '
                        f'timm ViT), e.g. {few(state)}')
    if fmt == 'hf':
        try:
            state = hf_to_mae(state)
        except UserError as e:
            raise UserError(f'{path}: {e}') from e
        if config is None and os.path.isfile(os.path.join(os.path.dirname(path), 'config.json')):
            config = read_json(os.path.join(os.path.dirname(path), 'config.json'))
        if config is not None and config.get('model_type', 'vit_mae') == 'vit_mae':
            arch, mask_ratio, eps = arch_from_hf_config(config)
            if eps != MAE_LN_EPS:
                notes.append(f'HF config says layer_norm_eps={eps:g}; this project\'s models use MAE\'s {MAE_LN_EPS:g}')
            args = dict(mask_ratio=mask_ratio, norm_pix_loss=arch['norm_pix_loss'])
        else:
            arch, args = arch_from_state(state), {}
    else:
        state, folded = fold_probe_head(state)
        if folded:
            notes.append('linear-probe head (BatchNorm without affine + Linear) folded into one Linear head')
        arch = arch_from_state(state)
        timm = not wrapped and 'decoder_pred.weight' not in state
        if timm:
            fmt, unknown = 'timm', [k for k in state if not VIT_KEY.match(k)]
            if unknown:
                raise UserError(f'{path}: cannot map {len(unknown)} keys of this timm file to this project\'s ViT, '
                                f'e.g. {few(unknown)}')
            if metadata.get('num_heads', '').isdigit():
                arch['num_heads'] = int(metadata['num_heads'])
            args = dict(global_pool='fc_norm.weight' in state)
            if 'head.weight' in state:
                args['nb_classes'] = state['head.weight'].shape[0]
    if fmt != 'mae' or args is None:
        args = {**(args or {}), **({'input_size': arch['img_size']} if arch['img_size'] else {})}
        if 'decoder_depth' in arch:
            args['decoder_depth'] = arch['decoder_depth']
    return dict(state=state, format=fmt, args=args, arch=arch, notes=notes)


# ---------------------------------------------------------------- writing

def _replace_atomically(write, path):
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(state, path, metadata=None):
    """Atomic write (temp file, then rename); tensors are made contiguous and unshared."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    _replace_atomically(lambda p: save_file(tensors, p, metadata={'format': 'pt', **(metadata or {})}), path)


def save_hf_folder(state, config, folder):
    """folder/config.json + folder/model.safetensors (hub naming), each written atomically."""
    os.makedirs(folder, exist_ok=True)

    def write_json(p):
        with open(p, 'w') as f:
            json.dump(config, f, indent=2, sort_keys=True)
    save_safetensors(state, os.path.join(folder, 'model.safetensors'))  # weights first: a failed write leaves
    _replace_atomically(write_json, os.path.join(folder, 'config.json'))  # no new config beside old weights
