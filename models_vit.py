"""The ViT used for fine-tuning, linear probing and k-NN: timm's VisionTransformer with MAE's pooling.

`global_pool=True` (MAE's default): mean of the patch tokens (cls excluded) -> `fc_norm` -> head; the final
`norm` is then absent. `global_pool=False`: `norm(x)[:, 0]` (cls token) -> head. Encoder keys equal those of
`models_mae` factories of the same name (and timm's), so a pretrain checkpoint loads with
`util.pretrained.load_encoder`.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer


def vision_transformer(global_pool=True, **kwargs):
    """VisionTransformer with MAE's head conventions; kwargs go to timm (img_size, num_classes, drop_path_rate, ...)."""
    return VisionTransformer(global_pool='avg' if global_pool else 'token', fc_norm=None, **kwargs)


def forward_features_pooled(model, x, pool='avg'):
    """Frozen-feature extraction without masking. pool 'avg': mean of patch tokens (then fc_norm if present),
    'cls': norm(x)[:, 0] (norm if present). x: [N, C, H, W] -> [N, D]"""
    x = model.forward_features(x)  # timm applies `norm` (Identity when fc_norm is used)
    if pool == 'avg':
        return model.fc_norm(x[:, model.num_prefix_tokens:].mean(dim=1))
    return x[:, 0]


_LN = partial(nn.LayerNorm, eps=1e-6)
CONFIGS = {
    'tiny_patch16': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'small_patch16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'base_patch16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'large_patch16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    'huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    'pico_patch4': dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3),
    'micro_patch8': dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3),
}


def _factory(cfg):
    def build(**kwargs):
        return vision_transformer(**{**CONFIGS[cfg], 'mlp_ratio': 4, 'qkv_bias': True, 'norm_layer': _LN, **kwargs})
    build.__name__ = f'vit_{cfg}'
    return build


vit_tiny_patch16 = _factory('tiny_patch16')
vit_small_patch16 = _factory('small_patch16')
vit_base_patch16 = _factory('base_patch16')
vit_large_patch16 = _factory('large_patch16')
vit_huge_patch14 = _factory('huge_patch14')
vit_pico_patch4 = _factory('pico_patch4')
vit_micro_patch8 = _factory('micro_patch8')

MODELS = {name: fn for name, fn in dict(globals()).items() if name.startswith('vit_')}


def vit_for(mae_model_name):
    """The fine-tune factory name matching a pretrain one: 'mae_vit_base_patch16_dec512d8b' -> 'vit_base_patch16'."""
    return mae_model_name.replace('mae_', '', 1).replace('_dec512d8b', '')


def vit_name(name):
    """Accepts 'vit_base_patch16' or the pretrain name 'mae_vit_base_patch16(_dec512d8b)'; ValueError otherwise."""
    name = vit_for(name) if name.startswith('mae_') else name
    if name not in MODELS:
        raise ValueError(f'unknown --model {name!r}; choose from: {", ".join(MODELS)}')
    return name


def create_vit(name, **kwargs):
    """The fine-tune ViT of a (pretrain or fine-tune) factory name; kwargs go to the factory."""
    return MODELS[vit_name(name)](**kwargs)


@torch.no_grad()
def init_head(model, std):
    nn.init.trunc_normal_(model.head.weight, std=std)
    nn.init.zeros_(model.head.bias)
