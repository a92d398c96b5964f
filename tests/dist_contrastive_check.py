"""Run under torchrun: InfoNCE negatives cover the global batch (checked against a local recomputation)."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_cmae  # noqa: E402
from util.dist_ops import all_gather_keep_local_grad  # noqa: E402

dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
n, c, tau = 4, 8, 0.07
qs = [torch.randn(n, c, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
ks = [torch.randn(n, c, generator=torch.Generator().manual_seed(20 + r)) for r in range(world)]
q = qs[rank].clone().requires_grad_(True)
k = ks[rank].clone().requires_grad_(True)
gathered = all_gather_keep_local_grad(k)
assert gathered.shape == (world * n, c)
assert torch.equal(gathered.detach(), torch.cat(ks))
model = models_cmae.cmae_model('mae_vit_pico_patch4', temperature=tau)
loss = model.contrastive_loss(q, k)
logits = F.normalize(qs[rank], dim=1) @ F.normalize(torch.cat(ks), dim=1).T / tau  # [n, world * n]
labels = torch.arange(n) + n * rank
expected = 2 * tau * F.cross_entropy(logits, labels)
assert torch.allclose(loss, expected, atol=1e-6), (loss, expected)
loss.backward()
assert q.grad is not None and k.grad is not None  # local part keeps its gradient
print(f'rank {rank}: logits over {world * n} keys OK', flush=True)
dist.destroy_process_group()
