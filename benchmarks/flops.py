"""Analytic matmul FLOPs (2 per multiply-add) of one forward pass, per image. Training = 3x forward for the
parts that get gradients. LayerNorm, softmax, GELU and elementwise work are not counted."""


def vit_block(tokens, dim, mlp_ratio=4):
    return 2 * tokens * dim * dim * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * dim  # linears + qk^T and av


def cross_block(queries, keys, enc_dim, dim, mlp_ratio=4, self_attn=False):
    f = 2 * queries * dim * dim * 2 + 2 * keys * enc_dim * 2 * dim  # q, proj; kv
    f += 4 * queries * keys * dim + 2 * queries * dim * dim * 2 * mlp_ratio
    if self_attn:
        f += vit_block(queries, dim, 0)
    return f


def mae_forward(img_size, patch, dim, depth, dec_dim, dec_depth, mask_ratio=0.75, cross=False, kept_ratio=None,
                weight_fm=False, use_input=False, in_chans=3):
    """-> (encoder FLOPs, decoder FLOPs) of one forward pass for one image."""
    length = (img_size // patch) ** 2
    keep = int(length * (1 - mask_ratio))
    enc = 2 * length * patch * patch * in_chans * dim + depth * vit_block(keep + 1, dim)
    out = 2 * patch * patch * in_chans * dec_dim
    if not cross:
        dec = 2 * (keep + 1) * dim * dec_dim + dec_depth * vit_block(length + 1, dec_dim) + length * out
    else:
        kept = mask_ratio if kept_ratio is None else kept_ratio
        pred = length - keep - int(length * (mask_ratio - kept))
        dec = dec_depth * cross_block(pred, keep + 1, dim, dec_dim) + pred * out
        if weight_fm:
            dec += 2 * (keep + 1) * dim * (depth + int(use_input)) * dec_depth
    return enc, dec


def cmae_extra_forward(img_size, patch, dim, depth, dec_dim, feat_depth=2, mask_ratio=0.75, hidden=1536, proj=256):
    """-> (target-branch FLOPs (no backward), online extra FLOPs (feature decoder, projector, predictor))."""
    length = (img_size // patch) ** 2
    keep = int(length * (1 - mask_ratio))
    target = 2 * length * patch * patch * 3 * dim + depth * vit_block(length + 1, dim) + 2 * (dim * hidden + hidden * proj)
    online = 2 * (keep + 1) * dim * dec_dim + feat_depth * vit_block(length + 1, dec_dim) + 2 * (length + 1) * dec_dim * dim
    online += 2 * (dim * hidden + hidden * proj) + 2 * (proj * hidden + hidden * proj)
    return target, online
