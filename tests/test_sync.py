"""No host reads of tensors on the training hot path: a training epoch reads its metrics once per --print_freq
window (the steps log_every prints) and once at the end, not once per step.

The counters patch the Python-level tensor reads (`item`, `tolist`, `__float__`, `__bool__`, `__int__`,
`__index__`): each of these waits for the device on CUDA. They run on CPU tensors here (no GPU), with the
optimizer the CUDA path uses (fused AdamW: the foreach one reads its CPU step counters with .item(), which on
CUDA costs no synchronisation but would hide ours in the count). Synchronisations inside C++ (e.g. a blocking
copy) are not visible here; tests/test_cuda.py::test_hot_path_has_no_cuda_sync checks those on a GPU with
torch.cuda.set_sync_debug_mode.

Measured with 20 steps and --print_freq 10: 3 reads after the change (at steps 0, 10 and 19), 48 `.item()`
before it (one per step for the loss, plus the CPU SmoothedValue medians at every print)."""
import argparse
import collections
import math

import pytest
import torch

import engine_finetune
import engine_pretrain
import models_cmae
import models_mae
import models_vit
import util.meters as meters
import util.misc as misc
from util.datasets import build_loader

READS = ('item', 'tolist', '__float__', '__bool__', '__int__', '__index__')
STEPS, PRINT_FREQ = 20, 10
WINDOWS = math.ceil(STEPS / PRINT_FREQ) + 1  # reads at steps 0, 10, 19


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two, and does not thrash on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class HostReads:
    """Counts Python-level host reads of tensors while active: `reads.count`, `reads.sites` (caller frames)."""

    def __init__(self, monkeypatch):
        self.count, self.sites, self.monkeypatch = 0, collections.Counter(), monkeypatch

    def __enter__(self):
        import sys
        for name in READS:
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, _name=name, **k):
                f = sys._getframe(1)
                self.count += 1
                self.sites[f'{_name} at {f.f_code.co_filename.rsplit("/", 1)[-1]}:{f.f_lineno}'] += 1
                return _orig(t, *a, **k)
            self.monkeypatch.setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        self.monkeypatch.undo()


def optimizer_for(model):
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)  # as on CUDA (misc.adamw)
    except (RuntimeError, TypeError):  # torch without fused CPU AdamW
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9)


def pretrain_args(**kw):
    base = dict(device=torch.device('cpu'), amp='none', accum_iter=1, max_steps_per_epoch=0, print_freq=PRINT_FREQ,
                no_step_log=False, clip_grad=None, mask_ratio=0.75, kept_mask_ratio=None, lr=1e-4, min_lr=0.,
                warmup_epochs=0, epochs=2, distributed=False)
    return argparse.Namespace(**{**base, **kw})


def batches(n=STEPS, views=1, batch=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(batch, 3, size, size, generator=g)  # noqa: E731
    return [([make() for _ in range(views)] if views > 1 else make(), torch.randint(10, (batch,), generator=g))
            for _ in range(n)]


class Recorder:
    def __init__(self):
        self.points = collections.defaultdict(list)

    def add_scalar(self, tag, value, step):
        self.points[tag].append((step, value))


def pico(variant):
    torch.manual_seed(0)
    if variant == 'cmae':
        return models_cmae.cmae_model('mae_vit_pico_patch4', proj_hidden_dim=32, proj_dim=16), 2, {}
    if variant == 'cross25':
        return models_mae.mae_vit_pico_patch4(cross_mae=True, weight_fm=True, use_input=True), 1, {'kept_mask_ratio': 0.25}
    return models_mae.mae_vit_pico_patch4(), 1, {}


@pytest.mark.parametrize('variant,clip,accum', [('mae', None, 1), ('cross25', 1.0, 2), ('cmae', None, 1)])
def test_pretrain_epoch_reads_once_per_print_window(monkeypatch, variant, clip, accum):
    model, views, extra = pico(variant)
    opt = optimizer_for(model)
    args = pretrain_args(clip_grad=clip, accum_iter=accum, **extra)
    after = (lambda e: model.update_target(0.99)) if variant == 'cmae' else None
    engine_pretrain.train_one_epoch(model, batches(4, views), opt, 0, misc.LossScaler(), pretrain_args(**extra),
                                    after_step=after)  # warm-up (lazy optimizer state)
    rec = Recorder()
    with HostReads(monkeypatch) as reads:
        stats, steps, interrupted = engine_pretrain.train_one_epoch(
            model, batches(STEPS, views), opt, 1, misc.LossScaler(), args, log_writer=rec, after_step=after,
            stop_flag=misc.StopFlag())
    assert reads.count <= WINDOWS, reads.sites  # measured: 3 (one .tolist() per read)
    assert steps == STEPS and not interrupted and math.isfinite(stats['loss'])
    xs = [x for x, _ in rec.points['train_loss']]
    assert len(xs) == STEPS // accum and xs == sorted(xs)  # one TensorBoard point per optimizer step
    if variant == 'cmae':
        assert {'train_loss_pixel', 'train_loss_contrastive', 'lr'} <= set(rec.points)


def test_finetune_epoch_and_evaluate_read_once_per_print_window(monkeypatch):
    torch.manual_seed(0)
    model = models_vit.vit_pico_patch4(num_classes=10)
    opt = optimizer_for(model)
    args = pretrain_args()
    crit = torch.nn.CrossEntropyLoss()
    engine_finetune.train_one_epoch(model, crit, batches(2), opt, 0, misc.LossScaler(), args)
    rec = Recorder()
    with HostReads(monkeypatch) as reads:
        stats = engine_finetune.train_one_epoch(model, crit, batches(STEPS), opt, 1, misc.LossScaler(), args,
                                                log_writer=rec)
    assert reads.count <= WINDOWS, reads.sites
    assert len(rec.points['loss']) == STEPS and math.isfinite(stats['loss'])
    with HostReads(monkeypatch) as reads:
        test = engine_finetune.evaluate(batches(STEPS), model, args)  # prints every 10 batches, reads there
    assert reads.count <= WINDOWS + 1, reads.sites  # + the end-of-evaluation read
    assert 0 <= test['acc1'] <= 100 and test['acc1'] <= test['acc5']


def test_linear_probe_epoch_reads_once_per_print_window(monkeypatch):
    """main_linprobe's setup: frozen encoder, BatchNorm + Linear head, LARS (its step reads nothing)."""
    from util.lars import LARS
    torch.manual_seed(0)
    model = models_vit.vit_pico_patch4(num_classes=10)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False), model.head)
    for n, p in model.named_parameters():
        p.requires_grad = n.startswith('head.')
    opt = LARS(model.head.parameters(), lr=0.1, weight_decay=0.)
    args, crit = pretrain_args(), torch.nn.CrossEntropyLoss()
    engine_finetune.train_one_epoch(model, crit, batches(2), opt, 0, misc.LossScaler(), args)
    with HostReads(monkeypatch) as reads:
        stats = engine_finetune.train_one_epoch(model, crit, batches(STEPS), opt, 1, misc.LossScaler(), args)
    assert reads.count <= WINDOWS, reads.sites
    assert math.isfinite(stats['loss'])


def test_segmentation_epoch_reads_once_per_print_window(monkeypatch):
    import engine_segmentation
    import models_seg
    torch.manual_seed(0)
    model = models_seg.UperNetViT(5, img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, channels=16,
                                  aux_channels=8)
    opt = optimizer_for(model)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2, 32, 32), generator=g))
            for _ in range(STEPS)]
    args = pretrain_args(iters_per_epoch=STEPS, total_iters=2 * STEPS, warmup_iters=2, poly_power=1.0, aux_weight=0.4)
    engine_segmentation.train_one_epoch(model, data[:2], opt, 0, misc.LossScaler(), args)
    rec = Recorder()
    with HostReads(monkeypatch) as reads:
        stats = engine_segmentation.train_one_epoch(model, data, opt, 1, misc.LossScaler(), args, log_writer=rec)
    assert reads.count <= WINDOWS, reads.sites
    assert len(rec.points['train/loss']) == STEPS and len(rec.points['train/loss_aux']) == STEPS
    assert math.isfinite(stats['loss']) and stats['loss_main'] < stats['loss']


class LossAt:
    """Wraps a model so that its loss is replaced by `value` at the given calls (0-based)."""

    def __init__(self, model, calls, value=float('nan')):
        self.model, self.calls, self.value, self.n, self.losses = model, calls, value, 0, []

    def __getattr__(self, name):
        return getattr(self.__dict__['model'], name)

    def __call__(self, *a, **k):
        out = self.model(*a, **k)
        loss = out[0] * self.value if self.n in self.calls else out[0]
        self.n += 1
        self.losses.append(loss.detach())
        return (loss, *out[1:])


def test_non_finite_loss_names_the_first_bad_step():
    model = LossAt(models_mae.mae_vit_pico_patch4(), calls={13, 15})
    opt = optimizer_for(model.model)
    with pytest.raises(misc.NonFiniteLoss, match=r'loss is nan at epoch 2, step 13 \(the first non-finite '
                                                              r'one of steps 11-19\)'):
        engine_pretrain.train_one_epoch(model, batches(), opt, 2, misc.LossScaler(), pretrain_args())


def test_step_values_reach_tensorboard_and_the_stop_flag_is_seen_at_the_next_read():
    torch.manual_seed(0)
    model = LossAt(models_mae.mae_vit_pico_patch4(), calls=set(), value=1.)
    opt = optimizer_for(model.model)
    flag, rec = misc.StopFlag(), Recorder()

    def after_step(epoch_float):  # the signal arrives during step 3
        if model.n == 4:
            flag.set = True
    stats, steps, interrupted = engine_pretrain.train_one_epoch(
        model, batches(), opt, 0, misc.LossScaler(), pretrain_args(), log_writer=rec, stop_flag=flag,
        after_step=after_step)
    assert interrupted and steps == 11  # read at step 10 saw it; stopped after that step
    assert [v for _, v in rec.points['train_loss']] == pytest.approx([t.item() for t in model.losses])
    assert [x for x, _ in rec.points['train_loss']] == [int(s / STEPS * 1000) for s in range(11)]
    assert stats['loss'] == pytest.approx(sum(t.item() for t in model.losses) / 11)


def test_device_meters():
    m = meters.DeviceMeters()
    assert m.read() == {} and len(m) == 0
    m.update(loss=torch.tensor(2.0), acc=torch.tensor([50.0]), n=2)
    m.update(loss=torch.tensor(4.0, dtype=torch.bfloat16), acc=70, n=6)  # plain numbers are kept on the host
    assert len(m) == 2
    assert m.read() == {'loss': [2.0, 4.0], 'acc': [50.0, 70.0]}
    assert m.averages() == {'loss': pytest.approx(3.5), 'acc': pytest.approx(65.0)}
    assert m.read() == {}
    logger = meters.MetricLogger()
    logger.update(n=3, loss=torch.tensor(1.0))
    logger.update(lr=0.5)
    assert 'loss' not in logger.meters  # still queued on the device
    assert 'loss: 1.0000 (1.0000)' in str(logger)  # printing reads it
    assert logger.meters['loss'].count == 3


def test_persistent_workers_keep_augmentations_a_function_of_the_epoch():
    """Workers kept across epochs reseed per sample from (seed, rank, epoch, index): epoch 1 of a loader that ran
    epoch 0 equals epoch 1 of a fresh loader, as a run resumed at that epoch boundary needs."""
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(()), i

    args = argparse.Namespace(world_size=1, rank=0, seed=3, batch_size=4, num_workers=1, pin_mem=False,
                              device=torch.device('cpu'), prefetch_factor=2)
    first = build_loader(Noise(), args)
    assert first.persistent_workers and len(first.dataset) == 8
    epochs = []
    for e in range(2):
        first.sampler.set_epoch(e)
        epochs.append(torch.cat([x for x, _ in first]))
    fresh = build_loader(Noise(), args)
    fresh.sampler.set_epoch(1)
    assert torch.equal(torch.cat([x for x, _ in fresh]), epochs[1])
    assert not torch.equal(epochs[0], epochs[1])


class KeepsTrackOfItsOutputs(torch.nn.Module):
    """Wraps a pretraining model; at each forward notes which of the previous step's outputs are still alive."""

    def __init__(self, model):
        super().__init__()
        self.model, self.previous, self.alive = model, [], []

    def forward(self, *views, **kw):
        import weakref
        self.alive.append([name for name, ref in self.previous if ref() is not None])
        out = self.model(*views, **kw)
        self.previous = [('pred', weakref.ref(out[1])), ('mask', weakref.ref(out[2]))]
        return out


@pytest.mark.parametrize('variant', ['mae', 'cmae'])
def test_previous_step_outputs_are_freed_before_the_next_forward(variant):
    """The prediction (ViT-L, batch 256: about 230 MB in fp32 and bf16) is not kept alive into the next forward."""
    model, views, _ = pico(variant)
    spy = KeepsTrackOfItsOutputs(model)
    engine_pretrain.train_one_epoch(spy, batches(4, views), optimizer_for(model), 0, misc.LossScaler(), pretrain_args())
    assert spy.alive == [[]] * 4


def test_cuda_sync_count_ignores_the_prototype_notice():
    """tests/test_cuda.py counts the warnings of torch.cuda.set_sync_debug_mode('warn'). Only c10's per-call
    message is a synchronisation; the notice torch 2.11 gives once per process when the mode is first set (it
    says 'synchronizing' too) is not -- on the H200 it made the first counted epoch read as 4 syncs, not 3."""
    import warnings
    from cuda_common import sync_warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        warnings.warn('Synchronization debug mode is a prototype feature and does not yet detect all '
                      'synchronizing operations (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:140.)')
        warnings.warn('called a synchronizing CUDA operation (Triggered internally at '
                      '/pytorch/c10/cuda/CUDAFunctions.cpp:155.)')
    assert len(caught) == 2 and len(sync_warnings(caught)) == 1
