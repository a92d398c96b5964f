"""Attention rollout (Abnar & Zuidema 2020) for cls-token ViTs, with explicit attention maps.

Works on any model whose blocks have `norm1` and `attn.{qkv, num_heads}` (timm's ViT and models_mae's).
"""
import torch


@torch.no_grad()
def attention_maps(model, x):
    """x: [N, C, H, W] -> list over layers of softmax attention [N, heads, T, T] (explicit math)."""
    tokens = model.patch_embed(x)
    cls = model.cls_token.expand(tokens.shape[0], -1, -1)
    tokens = torch.cat([cls, tokens], dim=1) + model.pos_embed
    maps = []
    for blk in model.blocks:
        h = blk.norm1(tokens)
        n, t, d = h.shape
        heads = blk.attn.num_heads
        q, k, _ = blk.attn.qkv(h).reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        maps.append(((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1))
        tokens = blk(tokens)
    return maps


def rollout(maps, fuse='mean', discard_ratio=0.9):
    """maps: list of [N, heads, T, T] -> (cls map over patches [N, T-1] scaled to [0, 1], per-layer matrices).
    Per layer: fuse heads, zero the lowest discard_ratio of entries (cls->cls kept), (A + I) / 2, rows to sum 1,
    then multiply the layers."""
    result, layers = None, []
    for a in maps:
        a = {'mean': a.mean(1), 'max': a.max(1).values, 'min': a.min(1).values}[fuse]  # [N, T, T]
        n, t, _ = a.shape
        flat = a.reshape(n, -1).clone()
        k = int(flat.shape[1] * discard_ratio)
        if k:
            flat.scatter_(1, flat.topk(k, dim=1, largest=False).indices, 0.)
            flat[:, 0] = a.reshape(n, -1)[:, 0]  # keep cls -> cls
        a = flat.view(n, t, t)
        a = (a + torch.eye(t, device=a.device)) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        layers.append(a)
        result = a if result is None else a @ result
    cls_map = result[:, 0, 1:]
    lo, hi = cls_map.min(1, keepdim=True).values, cls_map.max(1, keepdim=True).values
    return (cls_map - lo) / (hi - lo).clamp_min(1e-12), layers
