"""Object detection / instance segmentation with a plain ViT: ViTDet (Li et al. 2022) on torchvision's Mask R-CNN.

    image [N, 3, H, W] (padded to the square input size by DetectionTransform)
      -> ViT (keys of models_vit, so MAE / CrossMAE / CMAE / fine-tuned checkpoints load): window attention in
         every block but a few global ones, the pretraining pos_embed resized to the grid, optional decomposed
         relative position; no cls token, no final norm -> [N, D, H/p, W/p]
      -> SimpleFeaturePyramid: x4, x2, x1, x0.5 of the last map, each 1x1 + 3x3 conv with LayerNorm to C
         channels (strides p/4, p/2, p, 2p), plus a stride-2 subsample of the last level for the RPN
      -> torchvision MaskRCNN (FasterRCNN with masks=False): RPN head of 2 convs, 4-conv + 1-fc box head and
         4-conv mask head with LayerNorm, RoIAlign with aligned=True (detectron2's ROIAlignV2)
"""
import math
from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, RPNHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from util.pos_embed import get_2d_sincos_pos_embed, resize_pos_embed

ENCODER_KEYS = ('pos_embed', 'patch_embed.', 'blocks.')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def window_partition(x, w):
    """x: [B, H, W, C] -> windows [B * nW, w, w, C], padded (Hp, Wp); zero padding at the bottom/right."""
    b, h, wd, c = x.shape
    ph, pw = -h % w, -wd % w
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, wd + pw
    x = x.view(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w, w, c), (hp, wp)


def window_unpartition(x, w, padded, size):
    """windows [B * nW, w, w, C] -> [B, H, W, C] (the padding cropped off)."""
    hp, wp = padded
    b = x.shape[0] // (hp * wp // w // w)
    x = x.view(b, hp // w, wp // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :size[0], :size[1]].contiguous()


def rel_pos_table(size, table):
    """table [2S - 1, d] (linearly resized to 2 * size - 1 rows when S differs) -> [size (q), size (k), d]."""
    if table.shape[0] != 2 * size - 1:
        table = F.interpolate(table.T[None], size=2 * size - 1, mode='linear', align_corners=False)[0].T
    idx = torch.arange(size, device=table.device)
    return table[idx[:, None] - idx[None, :] + size - 1]


def decomposed_rel_pos(q, rel_h, rel_w, size):
    """MViTv2's decomposed relative position: bias[(qh, qw), (kh, kw)] = q . Rh[qh - kh] + q . Rw[qw - kw].
    q: [B, heads, H*W, d] -> [B, heads, H*W, H*W], added to the (scaled) attention logits."""
    (h, w), (b, n, _, d) = size, q.shape
    r = q.reshape(b, n, h, w, d)
    bh = torch.einsum('bnhwc,hkc->bnhwk', r, rel_pos_table(h, rel_h).to(q.dtype))  # [B, n, H, W, kH]
    bw = torch.einsum('bnhwc,wkc->bnhwk', r, rel_pos_table(w, rel_w).to(q.dtype))  # [B, n, H, W, kW]
    return (bh[..., :, None] + bw[..., None, :]).reshape(b, n, h * w, h * w)


class Attention(nn.Module):
    """Multi-head self-attention on a [B, H, W, C] map with timm's keys (qkv, proj); rel_pos_size S adds the
    zero-initialised tables rel_pos_h, rel_pos_w [2S - 1, head_dim]."""

    def __init__(self, dim, num_heads, qkv_bias=True, rel_pos_size=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = rel_pos_size is not None
        if self.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, dim // num_heads))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, dim // num_heads))

    def forward(self, x):
        """x: [B, H, W, C] -> [B, H, W, C]"""
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(b, h, w, c))


class Block(nn.Module):
    """Pre-norm block (timm's keys). window_size > 0: attention within non-overlapping windows. The border
    windows are completed with zeros after norm1 and, as in detectron2's ViTDet, the padded tokens take part in
    the attention (no mask): official ViTDet weights see the numerics they were trained with."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=True, drop_path=0., norm_layer=nn.LayerNorm,
                 window_size=0, rel_pos_size=None):
        super().__init__()
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, rel_pos_size)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        """x: [B, H, W, C] -> [B, H, W, C]"""
        y, ws = self.norm1(x), self.window_size
        if ws:
            b, h, w, _ = x.shape
            y, padded = window_partition(y, ws)
            y = window_unpartition(self.attn(y), ws, padded, (h, w))
        else:
            y = self.attn(y)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """ViTDet's backbone: a plain ViT (models_vit keys: patch_embed, pos_embed [1, 1 + G, D] on the pretraining
    grid, blocks.*) whose blocks run on [B, H, W, C]; no cls token in the forward pass and no final norm."""

    def __init__(self, img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.,
                 qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=0.1, window_size=14,
                 global_blocks=(2, 5, 8, 11), rel_pos=False, pretrain_img_size=224):
        super().__init__()
        if any(not 0 <= i < depth for i in global_blocks):
            raise ValueError(f'global blocks {tuple(global_blocks)} must lie in [0, {depth})')
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim, output_fmt='NHWC', strict_img_size=False)
        self.pretrain_grid = (pretrain_img_size // patch_size,) * 2
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid[0] ** 2, embed_dim))  # cls row unused
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth rises with depth
        self.global_blocks = tuple(sorted(global_blocks))
        blocks = []
        for i in range(depth):
            ws = 0 if i in self.global_blocks else window_size
            size = (ws or img_size // patch_size) if rel_pos else None  # global blocks: the input's grid
            blocks.append(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_layer, ws, size))
        self.blocks = nn.ModuleList(blocks)
        self.initialize_weights()

    def initialize_weights(self):
        """Random init (what a checkpoint does not overwrite): sin-cos pos_embed, trunc-normal Linear layers."""
        pe = get_2d_sincos_pos_embed(self.embed_dim, self.pretrain_grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        """x: [N, 3, H, W], H and W multiples of the patch size -> [N, D, H/p, W/p]"""
        x = self.patch_embed(x)  # [N, h, w, D]
        h, w = x.shape[1:3]
        pos = resize_pos_embed(self.pos_embed, (h, w), 1, old_grid=self.pretrain_grid)[:, 1:]  # bicubic
        x = x + pos.reshape(1, h, w, -1)
        for blk in self.blocks:
            x = blk(x)
        return x.permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from the last map: scale 4 (deconv, LN, GELU, deconv), 2 (deconv), 1, 0.5 (max-pool),
    each then 1x1 conv + LN and 3x3 conv + LN to out_channels; 'pool' (stride-2 subsample of the coarsest)
    feeds the RPN only. Output: OrderedDict '0'..'3', 'pool', finest first, as torchvision's FPN."""

    def __init__(self, net, out_channels=256):
        super().__init__()
        self.net, self.out_channels, dim = net, out_channels, net.embed_dim
        ln = partial(LayerNorm2d, eps=1e-6)
        branches = [[nn.ConvTranspose2d(dim, dim // 2, 2, 2), ln(dim // 2), nn.GELU(),
                     nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)],
                    [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], [], [nn.MaxPool2d(2, 2)]]
        widths = [dim // 4, dim // 2, dim, dim]
        self.stages = nn.ModuleList(nn.Sequential(*b, nn.Conv2d(c, out_channels, 1, bias=False), ln(out_channels),
                                                  nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                                                  ln(out_channels)) for b, c in zip(branches, widths))
        p = net.patch_size
        self.strides = (p / 4, p / 2, p, 2 * p, 4 * p)
        for m in self.stages.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x):
        """x: [N, 3, H, W] -> {'0': [N, C, 4H/p, 4W/p], '1': 2x, '2': 1x, '3': 0.5x, 'pool': 0.25x}"""
        feat = self.net(x)
        out = OrderedDict((str(i), stage(feat)) for i, stage in enumerate(self.stages))
        out['pool'] = F.max_pool2d(out['3'], kernel_size=1, stride=2)
        return out


class RoIAlignV2(MultiScaleRoIAlign):
    """MultiScaleRoIAlign with the level strides given (not inferred from the first batch) and detectron2's
    ROIAlignV2 sampling: aligned=True (pixel centres at +0.5), adaptive sampling ratio (0)."""

    def __init__(self, featmap_names, output_size, strides):
        super().__init__(featmap_names, output_size, sampling_ratio=0)
        self.scales = [1. / s for s in strides]
        levels = [round(math.log2(s)) for s in strides]
        self.map_levels = LevelMapper(levels[0], levels[-1])  # FPN's rule: 224 px -> level 4 (stride 16)

    def forward(self, x, boxes, image_shapes):
        feats = [x[k] for k in self.featmap_names]
        levels = self.map_levels(boxes)
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for lvl, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == lvl)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale, sampling_ratio=0, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out


def resize_image(img, size):
    """img: [3, h, w] -> [3, *size], bilinear with antialiasing (the same resize as util.det_datasets' jitter)."""
    return F.interpolate(img[None], size=size, mode='bilinear', align_corners=False, antialias=True)[0]


class DetectionTransform(GeneralizedRCNNTransform):
    """Normalizes and batches. Training images come at their final size (large-scale jitter in the data
    pipeline), so they are not resized; evaluation images are resized so that the longer side is input_size
    (detections are mapped back to the original image by postprocess). Batches are zero-padded (after
    normalisation: the mean colour) to the square input_size, as detectron2's square padding."""

    def __init__(self, input_size, size_divisible):
        super().__init__(input_size, input_size, list(IMAGENET_MEAN), list(IMAGENET_STD), size_divisible)
        self.input_size = input_size

    def resize(self, image, target=None):
        if self.training:
            return image, target
        h, w = image.shape[-2:]
        s = self.input_size / max(h, w)
        return resize_image(image, (max(round(h * s), 1), max(round(w * s), 1))), target

    def batch_images(self, images, size_divisible=32):
        d = size_divisible
        h = max([self.input_size] + [img.shape[1] for img in images])
        w = max([self.input_size] + [img.shape[2] for img in images])
        out = images[0].new_zeros(len(images), 3, -(-h // d) * d, -(-w // d) * d)
        for o, img in zip(out, images):
            o[:, :img.shape[1], :img.shape[2]].copy_(img)
        return out


def default_global_blocks(depth):
    """ViTDet's: 2, 5, 8, 11 for depth 12 (5, 11, 17, 23 for 24; 7, 15, 23, 31 for 32): the last block of each
    of min(4, depth // 3) equal parts -- 2, 5 for depth 6, 3 for depth 4."""
    n = max(1, min(4, depth // 3))
    return tuple(depth * (k + 1) // n - 1 for k in range(n))


_LN = partial(nn.LayerNorm, eps=1e-6)
CONFIGS = {  # the encoders of models_vit, by the same names, with their pretraining image size
    'vit_tiny_patch16': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, pretrain_img_size=224),
    'vit_small_patch16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, pretrain_img_size=224),
    'vit_base_patch16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pretrain_img_size=224),
    'vit_large_patch16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, pretrain_img_size=224),
    'vit_huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, pretrain_img_size=224),
    'vit_pico_patch4': dict(patch_size=4, embed_dim=96, depth=4, num_heads=3, pretrain_img_size=32),
    'vit_micro_patch8': dict(patch_size=8, embed_dim=192, depth=6, num_heads=3, pretrain_img_size=64),
}


def vit_backbone(name, input_size, window_size=None, global_blocks=None, rel_pos=False, drop_path_rate=0.1,
                 pretrain_img_size=None, **overrides):
    """The ViT of `name` (CONFIGS) for input_size images; window_size defaults to the pretraining grid (the
    paper's rule), global_blocks to default_global_blocks(depth)."""
    cfg = {**CONFIGS[name], **overrides}
    if pretrain_img_size:
        cfg['pretrain_img_size'] = pretrain_img_size
    window = window_size or cfg['pretrain_img_size'] // cfg['patch_size']
    blocks = default_global_blocks(cfg['depth']) if global_blocks is None else global_blocks
    return ViT(img_size=input_size, mlp_ratio=4, qkv_bias=True, norm_layer=_LN, drop_path_rate=drop_path_rate,
               window_size=window, global_blocks=blocks, rel_pos=rel_pos, **cfg)


def vitdet(name, num_classes, input_size, masks=True, fpn_channels=256, fc_dim=1024, anchor_sizes=None,
           backbone_kwargs=None, **detector_kwargs):
    """Mask R-CNN (masks=False: Faster R-CNN) on ViTDet's backbone and pyramid. num_classes: object classes
    (the background is added). anchor_sizes: one per level, default ViTDet's 32..512 scaled by input_size/1024.
    detector_kwargs go to torchvision's MaskRCNN / FasterRCNN (rpn_*, box_* settings)."""
    backbone = SimpleFeaturePyramid(vit_backbone(name, input_size, **(backbone_kwargs or {})), fpn_channels)
    c, strides = fpn_channels, backbone.strides
    if anchor_sizes is None:
        anchor_sizes = [max(round(a * input_size / 1024), 1) for a in (32, 64, 128, 256, 512)]
    anchors = AnchorGenerator(tuple((int(a),) for a in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    ln = partial(LayerNorm2d, eps=1e-6)
    names = ['0', '1', '2', '3']
    kwargs = dict(rpn_anchor_generator=anchors, rpn_head=RPNHead(c, 3, conv_depth=2),
                  box_roi_pool=RoIAlignV2(names, 7, strides[:4]),
                  box_head=FastRCNNConvFCHead((c, 7, 7), [c] * 4, [fc_dim], norm_layer=ln),
                  box_predictor=FastRCNNPredictor(fc_dim, num_classes + 1),
                  **{'rpn_pre_nms_top_n_train': 2000, 'rpn_pre_nms_top_n_test': 1000, 'rpn_post_nms_top_n_train': 1000,
                     'rpn_post_nms_top_n_test': 1000, **detector_kwargs})  # ViTDet's proposal counts by default
    if masks:
        model = MaskRCNN(backbone, None, mask_roi_pool=RoIAlignV2(names, 14, strides[:4]),
                         mask_head=MaskRCNNHeads(c, [c] * 4, 1, norm_layer=ln),
                         mask_predictor=MaskRCNNPredictor(c, c, num_classes + 1), **kwargs)
    else:
        model = FasterRCNN(backbone, None, **kwargs)
    model.transform = DetectionTransform(input_size, size_divisible=2 * backbone.net.patch_size)
    return model


def load_pretrained(vit, state_dict):
    """Load the encoder of any checkpoint with models_vit keys (MAE/CrossMAE/CMAE pretraining, fine-tuned
    classifiers) into the ViT `vit`; pos_embed is resized to its pretraining grid. cls_token, norm, head and
    decoder keys are not used; rel_pos tables stay zero. Raises ValueError naming the keys when the checkpoint
    is another architecture. -> (ignored keys, missing keys)"""
    sd = {k: v for k, v in state_dict.items() if k.startswith(ENCODER_KEYS)}
    if not sd:
        raise ValueError(f'no ViT encoder keys ({", ".join(ENCODER_KEYS)}...) in the checkpoint; '
                         f'first keys: {list(state_dict)[:5]}')
    own = vit.state_dict()
    pe = sd.get('pos_embed')
    if pe is not None and pe.ndim == 3 and pe.shape[-1] == own['pos_embed'].shape[-1] and pe.shape != own['pos_embed'].shape:
        sd['pos_embed'] = resize_pos_embed(pe, vit.pretrain_grid, 1)
    unexpected = [k for k in sd if k not in own]
    bad = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in sd.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in sd]
    hard_missing = [k for k in missing if '.rel_pos_' not in k]
    if unexpected or bad or hard_missing:
        raise ValueError('checkpoint encoder does not fit this model (another architecture?): '
                         + '; '.join(f'{what} {keys[:3]}' for what, keys in
                                     (('shapes (checkpoint vs model)', bad), ('unexpected', unexpected),
                                      ('missing', hard_missing)) if keys))
    vit.load_state_dict(sd, strict=False)
    return sorted(set(state_dict) - set(sd)), missing
