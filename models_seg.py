"""Semantic segmentation with a plain ViT encoder and an UperNet head (MAE / BEiT ADE20K transfer).

    image [N, 3, H, W] -> ViT (keys of models_vit: MAE, CrossMAE, CMAE, fine-tuned checkpoints load)
      -> patch tokens of 4 blocks, each [N, D, H/p, W/p]
      -> neck: x4 (two transposed convs), x2 (one), x1, x0.5 (max-pool): strides p/4, p/2, p, 2p
      -> UperNet: pyramid pooling (1, 2, 3, 6) on the coarsest level, FPN lateral + top-down paths,
         fusion conv, dropout, 1x1 classifier -> logits upsampled to [N, classes, H, W]
      (+ an auxiliary FCN head on the x1 level, used for the training loss only)

Any input size works: the image is padded to a multiple of the patch size, `pos_embed` (and the optional
relative position bias) are resized to the patch grid, and the logits are cropped back.
"""
from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_

from util.pos_embed import get_2d_sincos_pos_embed, resize_pos_embed

ENCODER_KEYS = ('cls_token', 'pos_embed', 'patch_embed.', 'blocks.')


def relative_position_index(gh, gw, device=None):
    """BEiT's index into the bias table for a (1 + gh*gw)-token sequence: [1 + L, 1 + L]. Patch pairs index
    their (dh, dw) offset; the last three rows of the table are cls->patch, patch->cls and cls->cls."""
    coords = torch.stack(torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device),
                                        indexing='ij')).flatten(1)  # [2, L]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [L, L, 2]
    num_rel = (2 * gh - 1) * (2 * gw - 1)
    index = torch.zeros(gh * gw + 1, gh * gw + 1, dtype=torch.long, device=device)
    index[1:, 1:] = (rel[..., 0] + gh - 1) * (2 * gw - 1) + rel[..., 1] + gw - 1
    index[0, 1:], index[1:, 0], index[0, 0] = num_rel, num_rel + 1, num_rel + 2
    return index


_INDEX_CACHE = OrderedDict()  # (gh, gw, device) -> index: shared by every block (and model) on that grid
_INDEX_CACHE_SIZE = 8  # whole-image evaluation meets many sizes: keep the most recent grids only


def cached_relative_position_index(gh, gw, device):
    """relative_position_index(gh, gw), built on `device` once per grid (the most recent few are kept)."""
    key = (gh, gw, torch.device(device))
    index = _INDEX_CACHE.get(key)
    if index is None:
        index = _INDEX_CACHE[key] = relative_position_index(gh, gw, device)
        while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
    else:
        _INDEX_CACHE.move_to_end(key)
    return index


class Attention(nn.Module):
    """Multi-head self-attention with timm's keys (qkv, proj) and an optional relative position bias
    (`relative_position_bias_table`, zero-initialised as in BEiT / MAE's ADE20K transfer)."""

    def __init__(self, dim, num_heads, qkv_bias=True, rel_pos_grid=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_grid = rel_pos_grid
        if rel_pos_grid is not None:
            gh, gw = rel_pos_grid
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * gh - 1) * (2 * gw - 1) + 3, num_heads))
            self.register_buffer('relative_position_index', relative_position_index(gh, gw), persistent=False)

    def relative_position_bias(self, grid):
        """-> [heads, 1 + L, 1 + L]; on another grid the offset table is resized (bicubic), as BEiT does."""
        table, (gh0, gw0) = self.relative_position_bias_table, self.rel_pos_grid
        if tuple(grid) == (gh0, gw0):
            index = self.relative_position_index
        else:
            gh, gw = grid
            patch = table[:-3].T.reshape(1, -1, 2 * gh0 - 1, 2 * gw0 - 1)
            patch = F.interpolate(patch, size=(2 * gh - 1, 2 * gw - 1), mode='bicubic', align_corners=False)
            table = torch.cat([patch.flatten(2)[0].T, table[-3:]])  # each forward: the table is a parameter
            index = cached_relative_position_index(gh, gw, table.device)  # depends on the grid only
        t = index.shape[0]
        return table[index.view(-1)].view(t, t, -1).permute(2, 0, 1)

    def forward(self, x, grid):
        """x: [N, T, D] -> [N, T, D]"""
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.rel_pos_grid is not None:
            bias = self.relative_position_bias(grid).to(q.dtype).unsqueeze(0)  # added to the attention logits
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block with the keys of timm's Block (norm1, attn, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=True, drop_path=0., norm_layer=nn.LayerNorm,
                 rel_pos_grid=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, rel_pos_grid=rel_pos_grid)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x, grid):
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def conv_bn_relu(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def resize(x, size):
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class Neck(nn.Module):
    """Single-scale ViT features -> a 4-level pyramid: x4 (two transposed convs), x2, x1, x0.5 (max-pool)."""

    def __init__(self, dim):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)

    def forward(self, feats):
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


class UPerHead(nn.Module):
    """UperNet (Xiao et al. 2018): pyramid pooling on the coarsest level, FPN on the others, all levels fused."""

    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels[-1], channels, 1))
                                         for s in pool_scales)
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp(self, x):
        pooled = [resize(m(x), x.shape[2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, feats):
        """feats: 4 levels, finest first -> logits at the finest level's size"""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)] + [self.psp(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [resize(x, outs[0].shape[2:]) for x in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """Auxiliary head: conv-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels, channels, num_classes, dropout=0.1):
        super().__init__()
        self.convs = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


def default_out_indices(depth):
    """Blocks whose outputs feed the neck: 3, 5, 7, 11 for depth 12 (the BEiT/MAE configs), else evenly spaced."""
    return (3, 5, 7, 11) if depth == 12 else tuple(depth * (k + 1) // 4 - 1 for k in range(4))


class UperNetViT(nn.Module):
    """ViT encoder (parameters at the top level, named as in models_vit) + neck + UperNet (+ auxiliary FCN)."""

    def __init__(self, num_classes, img_size=512, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4., qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=0.1,
                 out_indices=None, rel_pos_bias=False, channels=768, aux_channels=256, aux_head=True):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth rises with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_layer,
                                          self.grid if rel_pos_bias else None) for i in range(depth))
        self.out_indices = tuple(out_indices) if out_indices else default_out_indices(depth)
        ok = len(self.out_indices) == 4 and all(0 <= i < depth for i in self.out_indices)
        if not ok or list(self.out_indices) != sorted(set(self.out_indices)):
            raise ValueError(f'out_indices must be 4 increasing block indices in [0, {depth}), got {self.out_indices}')
        self.neck = Neck(embed_dim)
        self.decode_head = UPerHead([embed_dim] * 4, channels, num_classes)
        self.auxiliary_head = FCNHead(embed_dim, aux_channels, num_classes) if aux_head else None
        self.initialize_weights()

    def initialize_weights(self):
        """Random init (what a checkpoint does not overwrite): sin-cos pos_embed, trunc-normal Linear layers,
        Kaiming convs, the classifiers N(0, 0.01)."""
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid, True))
                                  .float().unsqueeze(0))
        trunc_normal_(self.cls_token, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and m is not self.patch_embed.proj:
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        for head in (self.decode_head, self.auxiliary_head):
            if head is not None:
                nn.init.normal_(head.conv_seg.weight, std=0.01)
                nn.init.zeros_(head.conv_seg.bias)

    def forward_features(self, x):
        """x: [N, 3, H, W], H and W multiples of the patch size -> 4 x [N, D, H/p, W/p] (raw block outputs)."""
        n, _, h, w = x.shape
        grid = (h // self.patch_size, w // self.patch_size)
        pos = resize_pos_embed(self.pos_embed, grid, 1, old_grid=self.grid)
        x = self.patch_embed(x) + pos[:, 1:]
        x = torch.cat([(self.cls_token + pos[:, :1]).expand(n, -1, -1), x], dim=1)
        feats = []
        for i, blk in enumerate(self.blocks[:self.blocks_used]):  # the later blocks feed nothing
            x = blk(x, grid)
            if i in self.out_indices:
                feats.append(x[:, 1:].transpose(1, 2).reshape(n, -1, *grid))  # transpose before reshape
        return feats

    @property
    def blocks_used(self):
        """Blocks up to the last of out_indices: the parameters of the others get no gradient (under DDP:
        find_unused_parameters)."""
        return self.out_indices[-1] + 1

    def forward(self, x, with_aux=False):
        """x: [N, 3, H, W] -> logits [N, classes, H, W] (and the auxiliary logits with with_aux=True)"""
        h, w = x.shape[2:]
        p = self.patch_size
        x = F.pad(x, (0, -w % p, 0, -h % p))  # right/bottom to a multiple of the patch size
        pyramid = self.neck(self.forward_features(x))
        out = resize(self.decode_head(pyramid), x.shape[2:])[:, :, :h, :w]
        if not with_aux or self.auxiliary_head is None:
            return out
        return out, resize(self.auxiliary_head(pyramid[2]), x.shape[2:])[:, :, :h, :w]

    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'} | {n for n, _ in self.named_parameters() if 'relative_position_bias' in n}


def load_pretrained(model, state_dict):
    """Load the ViT encoder of any checkpoint with models_vit keys (MAE/CrossMAE/CMAE pretraining, fine-tuned
    classifiers) into `model`; `pos_embed` is resized to the model's grid. Decoder, head and norm keys are
    ignored; relative position bias tables absent from the checkpoint stay zero.
    Raises ValueError naming the keys when the checkpoint is another architecture. -> (ignored, missing)"""
    sd = {k: v for k, v in state_dict.items() if k.startswith(ENCODER_KEYS)}
    if not sd:
        raise ValueError(f'no ViT encoder keys ({", ".join(ENCODER_KEYS)}...) in the checkpoint; '
                         f'first keys: {list(state_dict)[:5]}')
    own = model.state_dict()
    pe = sd.get('pos_embed')
    if pe is not None and pe.ndim == 3 and pe.shape[-1] == own['pos_embed'].shape[-1] and pe.shape != own['pos_embed'].shape:
        sd['pos_embed'] = resize_pos_embed(pe, model.grid, 1)
    unexpected = [k for k in sd if k not in own]
    bad = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in sd.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k.startswith(ENCODER_KEYS) and k not in sd]
    hard_missing = [k for k in missing if 'relative_position_bias_table' not in k]
    if unexpected or bad or hard_missing:
        raise ValueError('checkpoint encoder does not fit this model (another architecture?): '
                         + '; '.join(f'{what} {keys[:3]}' for what, keys in
                                     (('shapes (checkpoint vs model)', bad), ('unexpected', unexpected),
                                      ('missing', hard_missing)) if keys))
    model.load_state_dict(sd, strict=False)
    return sorted(set(state_dict) - set(sd)), missing


_LN = partial(nn.LayerNorm, eps=1e-6)
CONFIGS = {  # the encoders of models_vit, by the same names
    'vit_tiny_patch16': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'vit_small_patch16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'vit_base_patch16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'vit_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    'vit_huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    'vit_pico_patch4': dict(patch_size=4, embed_dim=96, depth=4, num_heads=3),
    'vit_micro_patch8': dict(patch_size=8, embed_dim=192, depth=6, num_heads=3),
}


def upernet_vit(name, num_classes, **kwargs):
    """UperNet on the encoder `name` (a models_vit factory name); kwargs: img_size (the crop), channels,
    aux_channels, aux_head, rel_pos_bias, out_indices, drop_path_rate."""
    return UperNetViT(num_classes, **{**CONFIGS[name], 'mlp_ratio': 4, 'qkv_bias': True, 'norm_layer': _LN, **kwargs})
