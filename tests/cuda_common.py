"""What the CUDA test files share: the flag-restoring and exact-fp32 fixtures, the data fixture that skips where
a device machine has no test images, the half-precision tolerances, and small comparisons. Imported by
tests/test_cuda.py, tests/test_cuda_dense.py and tests/test_cuda_ddp.py (the fixtures by name, which is how pytest
finds them)."""
import argparse
import warnings

import pytest
import torch

# a half-precision step against fp32: loss and gradient tolerances (the reasons: tests/test_cuda.py's docstring)
TOL = {'bf16': dict(rtol=2e-2, atol=5e-3, cos=0.99), 'fp16': dict(rtol=5e-3, atol=2e-3, cos=0.999)}


def amp_args(amp):
    return argparse.Namespace(device=torch.device('cuda'), amp=amp)


def sdpa_as_math(q, k, v, attn_mask=None):
    """fp32 softmax(q k^T / sqrt(d) + bias) v from the same (bf16) inputs, returned in their dtype."""
    with torch.autocast('cuda', enabled=False):
        a = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)
        return ((a + attn_mask.float()).softmax(-1) @ v.float()).to(q.dtype)


@pytest.fixture(autouse=True)
def restore_cuda_flags():
    """The scripts turn TF32 and cuDNN autotuning on (misc.cuda_setup): every test leaves them as it found them."""
    prev = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    yield
    torch.set_float32_matmul_precision(prev[0])
    torch.backends.cudnn.benchmark = prev[1]


@pytest.fixture
def exact_fp32():
    """fp32 references without TF32 in matmuls. cuDNN convolutions (the patch embedding) keep their TF32 default:
    torch >= 2.9 refuses a mix of the legacy allow_tf32 flags with set_float32_matmul_precision, and the one
    convolution's rounding is far inside the tolerances of tests/test_cuda.py."""
    torch.set_float32_matmul_precision('highest')


@pytest.fixture
def data_path():
    """The test images; a device machine may not have them: the tests that read them are skipped there."""
    from conftest import DATA
    if not (DATA / 'train').is_dir():
        pytest.skip(f'test data not found at {DATA} (set MAE_TEST_DATA)')
    return str(DATA)


def close(a, b, rtol, atol):
    return abs(a - b) <= rtol * abs(b) + atol


def flat_grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def cuda_syncs(fn):
    """-> (fn(), the synchronising CUDA calls it made), as torch.cuda.set_sync_debug_mode('warn') reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return out, sync_warnings(caught)


SYNC_WARNING = 'called a synchronizing CUDA operation'  # c10/cuda's text for each synchronising call in 'warn' mode


def sync_warnings(caught):
    """caught warnings -> 'file:line' of each synchronising CUDA call. Only c10's own message counts: the first
    set_sync_debug_mode('warn') of a process also warns that the mode "is a prototype feature and does not yet
    detect all synchronizing operations" (torch 2.11), which is no synchronisation (it failed the first sync-count
    test on the H200)."""
    return [f'{w.filename}:{w.lineno}' for w in caught if SYNC_WARNING in str(w.message)]
