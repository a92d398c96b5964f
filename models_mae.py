"""Masked autoencoders: MAE (He et al. 2021) and CrossMAE (Fu et al. 2024) behind one decoder switch.

- MAE: self-attention decoder over all L + 1 tokens (mask tokens re-inserted), loss on every removed patch.
- CrossMAE (`cross_mae=True`): each patch to predict is a query (mask token + its position embedding) that
  cross-attends to the visible encoder tokens; with `kept_mask_ratio < mask_ratio` only part of the removed
  patches is predicted (partial reconstruction). `weight_fm` feeds block i of the decoder a learned mix of
  encoder feature maps.

Masking is driven by per-patch scores `noise [N, L]` (lowest kept), drawn uniformly when not given, so any
generator from `masking.py` can drive either decoder. State-dict keys match the official checkpoints.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed

from masking import num_keep
from util.pos_embed import get_2d_sincos_pos_embed

try:  # optional; used only where asked for, on CUDA with half precision
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None


def attention(q, k, v, backend='sdpa'):
    """q: [N, H, Lq, d], k, v: [N, H, Lk, d] -> [N, H, Lq, d]; softmax(q k^T / sqrt(d)) v by any backend.
    'flash' on CUDA in half precision: flash-attn's kernel when the package is installed, else SDPA held to
    its FlashAttention kernel (an error, not a silent fallback, where that kernel cannot run)."""
    if backend == 'flash' and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if flash_attn_func is not None:
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        if sdpa_kernel is not None:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
    if backend == 'math':  # explicit, for attention maps and reference checks
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads, self.backend = num_heads, 'sdpa'
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """x: [N, T, D] -> [N, T, D]"""
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attention(q, k, v, self.backend).transpose(1, 2).reshape(n, t, d)
        return self.proj(x)


class CrossAttention(nn.Module):
    """Queries from the decoder (width Dd) attend to encoder features (width D); kv holds k first, then v."""

    def __init__(self, encoder_dim, decoder_dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads, self.backend = num_heads, 'sdpa'
        self.q = nn.Linear(decoder_dim, decoder_dim, bias=qkv_bias)
        self.kv = nn.Linear(encoder_dim, decoder_dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(decoder_dim, decoder_dim)

    def forward(self, x, y):
        """x: [N, Tq, Dd] queries, y: [N, Tk, D] encoder features -> [N, Tq, Dd]"""
        n, tq, d = x.shape
        q = self.q(x).reshape(n, tq, self.num_heads, d // self.num_heads).transpose(1, 2)
        k, v = self.kv(y).reshape(n, y.shape[1], 2, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attention(q, k, v, self.backend).transpose(1, 2).reshape(n, tq, d)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block; keys norm1, attn.{qkv,proj}, norm2, mlp.{fc1,fc2} as in timm's ViT."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """CrossMAE decoder block: [x + SelfAttn(norm0(x))], x + CrossAttn(norm1(x), y), x + Mlp(norm2(x))."""

    def __init__(self, encoder_dim, decoder_dim, num_heads, mlp_ratio=4., qkv_bias=False,
                 norm_layer=nn.LayerNorm, self_attn=False):
        super().__init__()
        if self_attn:
            self.norm0 = norm_layer(decoder_dim)
            self.self_attn = Attention(decoder_dim, num_heads, qkv_bias)
        self.has_self_attn = self_attn
        self.norm1 = norm_layer(decoder_dim)
        self.cross_attn = CrossAttention(encoder_dim, decoder_dim, num_heads, qkv_bias)
        self.norm2 = norm_layer(decoder_dim)
        self.mlp = Mlp(decoder_dim, int(decoder_dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x, y):
        if self.has_self_attn:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class WeightedFeatureMaps(nn.Module):
    """Mixes k encoder feature maps into one per decoder block with `linear.weight [decoder_depth, k]`:
    mix_i = sum_j w[i, j] feats[j] (the original's Linear over a stacked [N, T, D, k], computed as one matmul
    over contiguous maps). feats: k x [N, T, D] -> [decoder_depth, N, T, D]"""

    def __init__(self, k, decoder_depth):
        super().__init__()
        self.linear = nn.Linear(k, decoder_depth, bias=False)

    def forward(self, feats):
        x = torch.stack(feats, dim=0)  # [k, N, T, D]
        return (self.linear.weight @ x.flatten(1)).view(-1, *x.shape[1:])


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT backbone; `cross_mae` switches to the CrossMAE decoder."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False, qkv_bias=True,
                 cross_mae=False, weight_fm=False, use_fm=(-1,), use_input=False, self_attn=False):
        super().__init__()
        if weight_fm and not cross_mae:
            raise ValueError('weight_fm needs cross_mae')
        self.cross_mae, self.weight_fm, self.use_input = cross_mae, weight_fm, use_input
        self.norm_pix_loss = norm_pix_loss

        # --- encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size, num_patches = self.patch_embed.grid_size, self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer) for _ in range(depth)])
        if not weight_fm:  # CrossMAE with weighted feature maps has no final norm
            self.norm = norm_layer(embed_dim)

        # --- decoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        if cross_mae:
            self.decoder_blocks = nn.ModuleList([
                CrossAttentionBlock(embed_dim, decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias,
                                    norm_layer, self_attn) for _ in range(decoder_depth)])
            if weight_fm:
                self.use_fm = list(range(depth)) if list(use_fm) == [-1] else sorted({i % depth for i in use_fm})
                self.wfm = WeightedFeatureMaps(len(self.use_fm) + int(use_input), decoder_depth)
                self.dec_norms = nn.ModuleList([norm_layer(embed_dim) for _ in range(decoder_depth)])
        else:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
            self.decoder_blocks = nn.ModuleList([
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias, norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self):
        self.pos_embed.data.copy_(torch.from_numpy(
            get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size, cls_token=True)).float().unsqueeze(0))
        self.decoder_pos_embed.data.copy_(torch.from_numpy(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # like a Linear on the flattened patch
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def set_attention_backend(self, backend):
        """'sdpa' (default), 'flash' (on CUDA in half precision: flash-attn, else SDPA's flash kernel; SDPA
        elsewhere) or 'math'."""
        for m in self.modules():
            if isinstance(m, (Attention, CrossAttention)):
                m.backend = backend

    @property
    def patch_size(self):
        return self.patch_embed.patch_size[0]

    def patchify(self, imgs):
        """imgs: [N, C, H, W] -> x: [N, L, p*p*C], patches row-major, each flattened as (row, col, channel)"""
        p, (h, w) = self.patch_size, self.grid_size
        n, c = imgs.shape[:2]
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum('nchpwq->nhwpqc', x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x):
        """x: [N, L, p*p*C] -> imgs: [N, C, H, W]"""
        p, (h, w) = self.patch_size, self.grid_size
        c = x.shape[-1] // (p * p)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def random_masking(self, x, mask_ratio, noise=None):
        """x: [N, L, D]; keeps the int(L * (1 - mask_ratio)) tokens of lowest noise (uniform if not given).
        -> x_masked [N, len_keep, D], mask [N, L] (1 = removed), ids_restore [N, L]"""
        n, length, d = x.shape
        len_keep = num_keep(length, mask_ratio)
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """-> latent, mask [N, L], ids_restore [N, L]. latent is [N, 1 + len_keep, D] (final-normed), or with
        weight_fm a list of feature maps (the masked input if use_input, then the raw outputs of use_fm blocks)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, x), dim=1)
        if self.weight_fm:
            feats = [x] if self.use_input else []
            for i, blk in enumerate(self.blocks[:self.blocks_used]):  # the later blocks feed nothing
                x = blk(x)
                if i in self.use_fm:
                    feats.append(x)
            return feats, mask, ids_restore
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    @property
    def blocks_used(self):
        """Encoder blocks the loss depends on: with weight_fm, those up to the last of use_fm. The parameters of
        the others get no gradient (under DDP: find_unused_parameters)."""
        return self.use_fm[-1] + 1 if self.weight_fm else len(self.blocks)

    @staticmethod
    def restore_tokens(x, mask_token, ids_restore):
        """x: [N, 1 + len_keep, Dd] -> [N, 1 + L, Dd]: mask tokens appended, patch tokens back in patch order."""
        n, _, dd = x.shape
        mask_tokens = mask_token.expand(n, ids_restore.shape[1] + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # unshuffle
        return torch.cat([x[:, :1, :], x_], dim=1)

    def forward_decoder(self, x, ids_restore):
        """MAE decoder. x: [N, 1 + len_keep, D] -> pred [N, L, p*p*C]"""
        x = self.restore_tokens(self.decoder_embed(x), self.mask_token, ids_restore) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # drop cls

    def forward_cross_decoder(self, latent, ids_restore, mask_ratio, kept_mask_ratio):
        """CrossMAE decoder. -> pred [N, L, p*p*C] (zeros where nothing is predicted), mask [N, L] (1 = predicted).
        In shuffle order: the first len_keep are visible, the next len_masked hidden but not predicted."""
        n, length = ids_restore.shape
        len_keep = num_keep(length, mask_ratio)
        len_masked = int(length * (mask_ratio - kept_mask_ratio))
        ids_pred = torch.argsort(ids_restore, dim=1)[:, len_keep + len_masked:].sort(dim=1).values
        pos = self.decoder_pos_embed[0, 1:, :][ids_pred]  # [N, n_pred, Dd], ascending patch order
        x = self.mask_token + pos
        if self.weight_fm:
            mixed = self.wfm(latent)  # [decoder_depth, N, T, D]
            for i, blk in enumerate(self.decoder_blocks):
                x = blk(x, self.dec_norms[i](mixed[i]))
        else:
            for blk in self.decoder_blocks:
                x = blk(x, latent)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, n_pred, p*p*C]
        pred = x.new_zeros(n, length, x.shape[-1]).scatter(1, ids_pred.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        mask = torch.zeros(n, length, device=x.device).scatter_(1, ids_pred, 1.)
        return pred, mask

    def forward_loss(self, imgs, pred, mask):
        """imgs: [N, C, H, W], pred: [N, L, p*p*C], mask: [N, L] (1 = counted) -> mean squared error"""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the original
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = (pred.float() - target) ** 2
        loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
        return (loss * mask).sum() / mask.sum().clamp_min(1)  # mean over counted patches; 0 when none

    def forward_masked(self, imgs, mask_ratio, noise=None, kept_mask_ratio=None):
        """Encode the visible patches, decode, pixel loss. -> loss, pred, mask, latent, ids_restore"""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if self.cross_mae:
            kept = mask_ratio if kept_mask_ratio is None else kept_mask_ratio
            pred, mask = self.forward_cross_decoder(latent, ids_restore, mask_ratio, kept)
        else:
            pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask, latent, ids_restore

    def forward(self, imgs, mask_ratio=0.75, noise=None, kept_mask_ratio=None):
        """imgs: [N, C, H, W]; noise: optional [N, L] scores (lowest kept). -> loss, pred [N, L, p*p*C], mask [N, L]"""
        return self.forward_masked(imgs, mask_ratio, noise, kept_mask_ratio)[:3]


# --- factories: standard sizes (decoder 512 wide, 8 deep, 16 heads unless overridden; ViT-S: 256 wide, 8 heads)
_LN = partial(nn.LayerNorm, eps=1e-6)
_DEC = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=_LN)
CONFIGS = {
    'tiny_patch16': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, **_DEC),
    # CrossMAE's ViT-S decoder is 256 wide with 8 heads (its published ViT-S checkpoints load strictly)
    'small_patch16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                          **{**_DEC, 'decoder_embed_dim': 256, 'decoder_num_heads': 8}),
    'base_patch16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DEC),
    'large_patch16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DEC),
    'huge_patch14': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DEC),
    # small models for 32-64 px images on a CPU
    'pico_patch4': dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64,
                        decoder_depth=2, decoder_num_heads=4, mlp_ratio=4, norm_layer=_LN),
    'micro_patch8': dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128,
                         decoder_depth=2, decoder_num_heads=4, mlp_ratio=4, norm_layer=_LN),
}


def _factory(cfg):
    def build(**kwargs):
        return MaskedAutoencoderViT(**{**CONFIGS[cfg], **kwargs})
    build.__name__ = f'mae_vit_{cfg}'
    return build


mae_vit_tiny_patch16 = _factory('tiny_patch16')
mae_vit_small_patch16 = _factory('small_patch16')
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b = _factory('base_patch16')
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b = _factory('large_patch16')
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b = _factory('huge_patch14')
mae_vit_pico_patch4 = _factory('pico_patch4')
mae_vit_micro_patch8 = _factory('micro_patch8')

MODELS = {name: fn for name, fn in dict(globals()).items() if name.startswith('mae_vit_')}
