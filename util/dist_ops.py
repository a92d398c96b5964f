"""Cross-process tensor ops for model code; each is a no-op in a single process (no process group)."""
import torch
import torch.distributed as dist


def _active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank():
    return dist.get_rank() if _active() else 0


def all_gather_keep_local_grad(x):
    """x: [n, ...] on every process -> [world_size * n, ...] in rank order; gradients flow to the local part."""
    if not _active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)
