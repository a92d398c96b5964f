"""CMAE (Huang et al., TPAMI 2023): MAE plus a contrastive branch with a momentum target encoder.

Online branch: the MAE/CrossMAE model of `models_mae` (masked online view -> pixel decoder -> pixel loss), plus a
feature decoder (its own embed, mask token, blocks, norm, Linear to D) whose output over all patch positions is
mean-pooled, a projector and a predictor.
Target branch: EMA copies of the encoder (whole target view, no masking, no final norm, mean of the patch
tokens) and of the projector; no gradients; `update_target(m)` after each optimizer step.
Loss: pixel_loss + weight * InfoNCE(predictor(online), target projection), temperature tau, negatives from
the global batch, scaled by 2 * tau as in MoCo v3.

Online keys are those of `MaskedAutoencoderViT`, so the encoder of a CMAE checkpoint loads like an MAE one.
"""
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed

from models_mae import CONFIGS, Block, MaskedAutoencoderViT
from util.dist_ops import all_gather_keep_local_grad, get_rank


def mlp_head(in_dim, hidden_dim, out_dim):
    """Linear -> BN -> ReLU -> Linear (no bias, no final BN)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False))


class TargetEncoder(nn.Module):
    """The encoder's parameters under the same names (patch_embed, cls_token, pos_embed, blocks), no norm."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_layer, qkv_bias,
                 **unused):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer) for _ in range(depth)])

    def forward(self, imgs):
        """imgs: [N, C, H, W] -> mean of the patch tokens [N, D] (cls excluded, no final norm)"""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x[:, 1:].mean(dim=1)


class ContrastiveMAE(MaskedAutoencoderViT):
    def __init__(self, feat_decoder_depth=2, proj_hidden_dim=1536, proj_dim=256, temperature=0.07,
                 contrastive_weight=1.0, **kwargs):
        super().__init__(**kwargs)
        cfg = {p.name: p.default for p in inspect.signature(MaskedAutoencoderViT.__init__).parameters.values()
               if p.default is not p.empty}
        cfg.update(kwargs)
        d, dd, heads = cfg['embed_dim'], cfg['decoder_embed_dim'], cfg['decoder_num_heads']
        norm_layer, mlp_ratio = cfg['norm_layer'], cfg['mlp_ratio']
        self.temperature, self.contrastive_weight = temperature, contrastive_weight
        # --- feature decoder (online)
        self.feat_decoder_embed = nn.Linear(d, dd)
        self.feat_decoder_mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.feat_decoder_blocks = nn.ModuleList([Block(dd, heads, mlp_ratio, True, norm_layer)
                                                  for _ in range(feat_decoder_depth)])
        self.feat_decoder_norm = norm_layer(dd)
        self.feat_decoder_pred = nn.Linear(dd, d)
        self.projector = mlp_head(d, proj_hidden_dim, proj_dim)
        self.predictor = mlp_head(proj_dim, proj_hidden_dim, proj_dim)
        for m in (self.feat_decoder_embed, self.feat_decoder_blocks, self.feat_decoder_norm, self.feat_decoder_pred,
                  self.projector, self.predictor):
            m.apply(self._init_weights)
        torch.nn.init.normal_(self.feat_decoder_mask_token, std=.02)
        # --- target branch: EMA copies, no gradients
        self.target_encoder = TargetEncoder(**cfg)
        self.target_projector = mlp_head(d, proj_hidden_dim, proj_dim)
        for t, o in self.target_pairs():
            t.data.copy_(o.data)
            t.requires_grad = False

    def target_pairs(self):
        """(target parameter, online parameter) for the target encoder and projector, matched by name."""
        online = dict(self.named_parameters())
        return [(t, online[n]) for n, t in self.target_encoder.named_parameters()] + \
               [(t, online['projector.' + n]) for n, t in self.target_projector.named_parameters()]

    @torch.no_grad()
    def update_target(self, m):
        """theta_t <- m * theta_t + (1 - m) * theta_online for the target encoder and projector (foreach: a few
        kernels for all tensors on CUDA, the same arithmetic as t.mul_(m).add_(o, alpha=1 - m))."""
        targets, online = zip(*[(t, o.detach()) for t, o in self.target_pairs()])
        torch._foreach_mul_(targets, m)
        torch._foreach_add_(targets, online, alpha=1 - m)

    def forward_feature_decoder(self, latent, ids_restore):
        """latent: [N, 1 + len_keep, D] -> mean over all patch positions of the decoded features [N, D]"""
        x = self.restore_tokens(self.feat_decoder_embed(latent), self.feat_decoder_mask_token, ids_restore)
        x = x + self.decoder_pos_embed
        for blk in self.feat_decoder_blocks:
            x = blk(x)
        x = self.feat_decoder_pred(self.feat_decoder_norm(x))
        return x[:, 1:].mean(dim=1)

    def contrastive_logits(self, q, k):
        """q [N, C], k [N, C] -> logits [N, world_size * N] against k gathered over the global batch, and the
        labels (each q's own k). In fp32 even under autocast: a bf16 matmul would round each logit by about
        2^-9 / tau."""
        with torch.autocast(q.device.type, enabled=False):
            q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
            k_all = all_gather_keep_local_grad(k)
            logits = q @ k_all.T / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * get_rank()
        return logits, labels

    def contrastive_loss(self, q, k):
        """InfoNCE of q [N, C] against k gathered over the global batch; 2 * tau * CE (MoCo v3); fp32."""
        logits, labels = self.contrastive_logits(q, k)
        with torch.autocast(q.device.type, enabled=False):
            return 2 * self.temperature * F.cross_entropy(logits, labels)

    def forward(self, imgs, target_imgs, mask_ratio=0.65, noise=None, kept_mask_ratio=None):
        """imgs: online view, target_imgs: shifted, color-augmented view, both [N, C, H, W].
        -> loss, pred, mask, {'loss_pixel', 'loss_contrastive'}"""
        loss_pixel, pred, mask, latent, ids_restore = self.forward_masked(imgs, mask_ratio, noise, kept_mask_ratio)
        tokens = latent[-1] if isinstance(latent, list) else latent  # weight_fm: the last block's raw output
        q = self.predictor(self.projector(self.forward_feature_decoder(tokens, ids_restore)))
        with torch.no_grad():
            k = self.target_projector(self.target_encoder(target_imgs))
        loss_con = self.contrastive_loss(q, k)
        loss = loss_pixel + self.contrastive_weight * loss_con
        return loss, pred, mask, {'loss_pixel': loss_pixel.detach(), 'loss_contrastive': loss_con.detach()}


def cmae_model(name, **kwargs):
    """'mae_vit_base_patch16' -> the ContrastiveMAE with that encoder and decoder configuration."""
    cfg = name.replace('mae_vit_', '').replace('_dec512d8b', '')
    return ContrastiveMAE(**{**CONFIGS[cfg], **kwargs})
