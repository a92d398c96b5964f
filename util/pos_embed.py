"""Fixed 2-D sine-cosine position embeddings and position-embedding resizing.

Half of the channels encode the column index (w), the other half the row index (h); each half is the
1-D code [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000**(i / (d/2)), computed in float64.
"""
import numpy as np
import torch
import torch.nn.functional as F


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """embed_dim: output width d (even); pos: positions of any shape -> [M, d]"""
    assert embed_dim % 2 == 0, 'sin-cos embedding needs an even width'
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.)
    omega = 1. / 10000 ** omega  # [d/2]
    out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)  # [M, d/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, d]


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """grid_size: int or (gh, gw) -> [gh*gw (+1), D] in row-major patch order; the cls row is zeros."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    assert embed_dim % 4 == 0, '2-D sin-cos embedding needs a width divisible by 4'
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # [gh, gw] each
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_w)  # first half: column index
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_h)  # second half: row index
    emb = np.concatenate([emb_w, emb_h], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def resize_pos_embed(pos_embed, new_grid, num_prefix_tokens=1, old_grid=None):
    """pos_embed: [1, T + G, D] on old_grid -> [1, T + gh*gw, D] (bicubic on the grid).

    The prefix (cls) rows are kept as they are. Without old_grid the old grid is taken as square.
    """
    gh, gw = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n_old, dim = grid.shape[1], grid.shape[2]
    if old_grid is None:
        if n_old == gh * gw:
            return pos_embed
        old = int(round(n_old ** 0.5))
        if old * old != n_old:
            raise ValueError(f'cannot resize a position embedding of {n_old} non-square grid positions')
        old_grid = (old, old)
    if tuple(old_grid) == (gh, gw):
        return pos_embed
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(gh, gw), mode='bicubic', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
