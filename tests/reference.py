"""Independent reference math for MAE and CrossMAE, written from SPEC.md (not from the model code).

Everything runs in float64 on a state_dict; attention is an explicit softmax; position embeddings are
rebuilt from the sin-cos formula; patches are cut out with explicit slicing.
"""
import math

import torch


def sincos_table(dim, gh, gw):
    """[1 + gh*gw, dim]: cls row zeros; channels [0, dim/2) encode the column w, [dim/2, dim) the row h."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)
    rows = []
    for h in range(gh):
        for w in range(gw):
            rows.append((w, h))
    ws = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    hs = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    table = torch.cat([one_d(dim // 2, ws), one_d(dim // 2, hs)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])


def patches(imgs, p):
    """[N, C, H, W] -> [N, L, p*p*C] by slicing each patch, flattened in (row, col, channel) order."""
    n, c, hh, ww = imgs.shape
    out = []
    for i in range(hh // p):
        for j in range(ww // p):
            out.append(imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(n, -1))
    return torch.stack(out, dim=1)


def layer_norm(x, sd, key, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[key + '.weight'] + sd[key + '.bias']


def linear(x, sd, key):
    y = x @ sd[key + '.weight'].T
    return y + sd[key + '.bias'] if key + '.bias' in sd else y


def softmax_attention(q, k, v):
    """q: [N, H, Tq, d], k, v: [N, H, Tk, d]"""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores - scores.max(-1, keepdim=True).values
    w = scores.exp()
    return (w / w.sum(-1, keepdim=True)) @ v


def heads(x, h):
    n, t, d = x.shape
    return x.reshape(n, t, h, d // h).transpose(1, 2)


def merge(x):
    n, h, t, d = x.shape
    return x.transpose(1, 2).reshape(n, t, h * d)


def self_attention(x, sd, key, h):
    qkv = linear(x, sd, key + '.qkv')
    d = x.shape[-1]
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    return linear(merge(softmax_attention(heads(q, h), heads(k, h), heads(v, h))), sd, key + '.proj')


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def mlp(x, sd, key):
    return linear(gelu(linear(x, sd, key + '.fc1')), sd, key + '.fc2')


def vit_block(x, sd, key, h):
    x = x + self_attention(layer_norm(x, sd, key + '.norm1'), sd, key + '.attn', h)
    return x + mlp(layer_norm(x, sd, key + '.norm2'), sd, key + '.mlp')


def target_of(imgs, p, norm_pix):
    t = patches(imgs, p)
    if norm_pix:
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).sum(-1, keepdim=True) / (t.shape[-1] - 1)  # unbiased
        t = (t - mean) / torch.sqrt(var + 1e-6)
    return t


def encode(sd, imgs, ids_keep, p, heads_, depth, collect=None):
    """-> tokens after the blocks (no final norm), and the collected feature maps if asked."""
    n = imgs.shape[0]
    gh, gw = imgs.shape[2] // p, imgs.shape[3] // p
    dim = sd['cls_token'].shape[-1]
    pos = sincos_table(dim, gh, gw)
    w = sd['patch_embed.proj.weight'].reshape(dim, -1)  # [D, C*p*p] in (channel, row, col) order
    pt = torch.stack([imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(n, -1)
                      for i in range(gh) for j in range(gw)], dim=1)
    x = pt @ w.T + sd['patch_embed.proj.bias'] + pos[1:]
    x = torch.stack([x[b, ids_keep[b]] for b in range(n)])
    x = torch.cat([(sd['cls_token'][0] + pos[:1]).expand(n, 1, dim), x], dim=1)
    feats = [x] if collect is not None and collect.get('use_input') else []
    for i in range(depth):
        x = vit_block(x, sd, f'blocks.{i}', heads_)
        if collect is not None and i in collect['use_fm']:
            feats.append(x)
    return x, feats


def mae_reference(sd, imgs, noise, mask_ratio, p, heads_, dec_heads, norm_pix):
    """-> loss, pred [N, L, p*p*C], mask [N, L] following SPEC §1.2."""
    sd = {k: v.double() for k, v in sd.items()}
    imgs = imgs.double()
    n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids = torch.argsort(noise, dim=1)
    ids_keep = ids[:, :len_keep]
    mask = torch.ones(n, length, dtype=torch.float64)
    for b in range(n):
        mask[b, ids_keep[b]] = 0
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    ddepth = len({k.split('.')[1] for k in sd if k.startswith('decoder_blocks.')})
    x, _ = encode(sd, imgs, ids_keep, p, heads_, depth)
    x = layer_norm(x, sd, 'norm')
    y = linear(x, sd, 'decoder_embed')
    dd = y.shape[-1]
    full = sd['mask_token'][0].expand(n, length, dd).clone()
    for b in range(n):
        full[b, ids_keep[b]] = y[b, 1:]
    gh, gw = imgs.shape[2] // p, imgs.shape[3] // p
    z = torch.cat([y[:, :1], full], dim=1) + sincos_table(dd, gh, gw)
    for i in range(ddepth):
        z = vit_block(z, sd, f'decoder_blocks.{i}', dec_heads)
    pred = linear(layer_norm(z, sd, 'decoder_norm'), sd, 'decoder_pred')[:, 1:]
    per_patch = ((pred - target_of(imgs, p, norm_pix)) ** 2).mean(-1)
    loss = (per_patch * mask).sum() / mask.sum()
    return loss, pred, mask


def crossmae_reference(sd, imgs, noise, mask_ratio, kept_mask_ratio, p, heads_, dec_heads, norm_pix,
                       use_input, weight_fm, self_attn=False):
    """-> loss, mask of predicted patches [N, L], pred rows [N, n_pred, p*p*C] following SPEC §2."""
    sd = {k: v.double() for k, v in sd.items()}
    imgs = imgs.double()
    n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    len_masked = int(length * (mask_ratio - kept_mask_ratio))
    ids = torch.argsort(noise, dim=1)
    ids_keep = ids[:, :len_keep]
    ids_pred = torch.sort(ids[:, len_keep + len_masked:], dim=1).values
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    ddepth = len({k.split('.')[1] for k in sd if k.startswith('decoder_blocks.')})
    x, feats = encode(sd, imgs, ids_keep, p, heads_, depth, dict(use_input=use_input, use_fm=set(range(depth))))
    gh, gw = imgs.shape[2] // p, imgs.shape[3] // p
    dd = sd['mask_token'].shape[-1]
    pos = sincos_table(dd, gh, gw)
    q = sd['mask_token'][0] + torch.stack([pos[1 + ids_pred[b]] for b in range(n)])
    for i in range(ddepth):
        key = f'decoder_blocks.{i}'
        if weight_fm:
            wmix = sd['wfm.linear.weight'][i]  # [k]
            y = sum(wmix[j] * feats[j] for j in range(len(feats)))
            y = layer_norm(y, sd, f'dec_norms.{i}')
        else:
            y = layer_norm(x, sd, 'norm')
        if self_attn:
            q = q + self_attention(layer_norm(q, sd, key + '.norm0'), sd, key + '.self_attn', dec_heads)
        h = layer_norm(q, sd, key + '.norm1')
        qq = linear(h, sd, key + '.cross_attn.q')
        kv = linear(y, sd, key + '.cross_attn.kv')
        k, v = kv[..., :dd], kv[..., dd:]
        att = merge(softmax_attention(heads(qq, dec_heads), heads(k, dec_heads), heads(v, dec_heads)))
        q = q + linear(att, sd, key + '.cross_attn.proj')
        q = q + mlp(layer_norm(q, sd, key + '.norm2'), sd, key + '.mlp')
    pred = linear(layer_norm(q, sd, 'decoder_norm'), sd, 'decoder_pred')
    target = target_of(imgs, p, norm_pix)
    target = torch.stack([target[b, ids_pred[b]] for b in range(n)])
    loss = ((pred - target) ** 2).mean()
    mask = torch.zeros(n, length, dtype=torch.float64)
    for b in range(n):
        mask[b, ids_pred[b]] = 1
    return loss, pred, mask
