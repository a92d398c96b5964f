"""Exact resume, pre-emption, atomic and safe checkpoints, clear errors on bad input, DDP equivalence."""
import argparse
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import main_finetune
import main_pretrain
import util.checkpoint as ckpt_util
import util.misc as misc
from conftest import PICO, ROOT, read_log, run_script, torchrun


def pretrain_args(data_path, out, *extra):
    return [*PICO, '--data_path', data_path, '--subset', 128, '--batch_size', 32, '--warmup_epochs', 1,
            '--max_steps_per_epoch', 3, '--output_dir', out, *extra]


def load_state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.parametrize('variant', [[], ['--mask_type', 'green', '--cross_mae', '--weight_fm', '--kept_mask_ratio', 0.5],
                                     ['--contrastive', '--mask_type', 'block2x2', '--momentum_cosine',
                                      '--proj_hidden_dim', 64, '--proj_dim', 16]])
def test_exact_resume_is_bit_identical(data_path, tmp_path, variant, monkeypatch):
    """A run of 3 epochs, and the same command stopped after epoch 1 and started again, end bit-identical."""
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    run_script(main_pretrain, [*pretrain_args(data_path, straight, *variant), '--epochs', 3])

    class Stop(Exception):
        pass
    real = main_pretrain.train_one_epoch

    def stop_at_epoch_1(model, loader, optimizer, epoch, *a, **k):
        if epoch == 1:
            raise Stop()
        return real(model, loader, optimizer, epoch, *a, **k)
    monkeypatch.setattr(main_pretrain, 'train_one_epoch', stop_at_epoch_1)
    with pytest.raises(Stop):
        run_script(main_pretrain, [*pretrain_args(data_path, resumed, *variant), '--epochs', 3])
    monkeypatch.undo()
    assert load_state(resumed / 'checkpoint.pth')['epoch'] == 0
    run_script(main_pretrain, [*pretrain_args(data_path, resumed, *variant), '--epochs', 3])  # same command, resumes
    a, b = load_state(straight / 'checkpoint.pth'), load_state(resumed / 'checkpoint.pth')
    assert a['epoch'] == b['epoch'] == 2
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert [r['epoch'] for r in read_log(resumed / 'log.txt')] == [0, 1, 2]


def start(argv, **kw):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    return subprocess.Popen([sys.executable, str(ROOT / 'main_pretrain.py'), *map(str, argv)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_for(pred, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_mid_epoch_then_same_command_resumes(data_path, tmp_path):
    out = tmp_path / 'kill'
    argv = [*pretrain_args(data_path, out), '--epochs', 3, '--max_steps_per_epoch', 40, '--subset', 1280,
            '--print_freq', 1]
    p = start(argv)
    assert wait_for(lambda: (out / 'log.txt').exists())  # epoch 0 is complete and checkpointed
    time.sleep(1.0)  # now inside epoch 1
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert load_state(out / 'checkpoint.pth')['epoch'] == 0
    p = start(argv)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 0, text[-3000:]
    assert 'resumed from' in text and 'epoch 1, step 0' in text
    assert [r['epoch'] for r in read_log(out / 'log.txt')] == [0, 1, 2]


def test_sigterm_saves_and_exits_cleanly(data_path, tmp_path):
    out = tmp_path / 'term'
    argv = [*pretrain_args(data_path, out), '--epochs', 2, '--max_steps_per_epoch', 40, '--subset', 1280,
            '--print_freq', 1]
    p = start(argv)
    assert wait_for(lambda: (out / 'log.txt').exists())
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    text = p.communicate(timeout=120)[0]
    assert p.returncode == 0, text[-3000:]
    state = load_state(out / 'checkpoint.pth')
    assert state['epoch'] == 1 and 0 < state['step_in_epoch'] < 40
    p = start(argv)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and f"epoch 1, step {state['step_in_epoch']}" in text, text[-3000:]
    assert [r['epoch'] for r in read_log(out / 'log.txt')] == [0, 1]


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    ckpt_util.save_checkpoint({'model': {'w': torch.ones(3)}, 'epoch': 1}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def broken_save(obj, f, *a, **k):
        f.write(b'partial garbage')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        ckpt_util.save_checkpoint({'model': {'w': torch.zeros(3)}, 'epoch': 2}, str(path))
    monkeypatch.undo()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert ckpt_util.load_checkpoint(str(path))['epoch'] == 1
    assert os.listdir(tmp_path) == ['checkpoint.pth']


class Evil:
    def __reduce__(self):
        return (os.system, (f'touch {os.environ["EVIL_MARK"]}',))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    mark = tmp_path / 'pwned'
    monkeypatch.setenv('EVIL_MARK', str(mark))
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'model': {}, 'x': Evil()}, f)
    torch.save({'model': {'w': torch.ones(1)}, 'x': Evil()}, tmp_path / 'evil2.pth')
    for p in (path, tmp_path / 'evil2.pth'):
        with pytest.raises(misc.UserError, match='refusing to load'):
            ckpt_util.load_checkpoint(str(p))
    assert not mark.exists()


def test_official_style_checkpoint_with_namespace_loads(data_path, tmp_path):
    import models_mae
    model = models_mae.mae_vit_pico_patch4()
    path = tmp_path / 'mae_pretrain_official.pth'
    torch.save({'model': model.state_dict(), 'args': argparse.Namespace(model='mae_vit_pico_patch4', blr=1.5e-4)}, path)
    state = ckpt_util.load_checkpoint(str(path))
    models_mae.mae_vit_pico_patch4().load_state_dict(state['model'], strict=True)
    run_script(main_finetune, ['--model', 'vit_pico_patch4', '--input_size', 32, '--num_workers', 0, '--cache_data',
                               '--data_path', data_path, '--subset', 32, '--val_subset', 20, '--nb_classes', 10,
                               '--batch_size', 16, '--epochs', 1, '--max_steps_per_epoch', 1, '--warmup_epochs', 0,
                               '--finetune', path, '--output_dir', tmp_path / 'ft'])


def make_folder(root, n=4, corrupt=0, gray=0):
    for cls in ('a', 'b'):
        d = root / 'train' / cls
        d.mkdir(parents=True)
        for i in range(n):
            Image.new('RGB', (40, 40), (i * 40, 10, 200)).save(d / f'{i}.jpg')
        for i in range(gray):
            Image.new('L', (40, 40), 128).save(d / f'g{i}.png')
        for i in range(corrupt):
            data = (d / '0.jpg').read_bytes()
            (d / f'bad{i}.jpg').write_bytes(data[:len(data) // 3])
    return root


def bad_input_cases(data_path, tmp_path):
    ok = make_folder(tmp_path / 'ok')
    (tmp_path / 'no_train').mkdir()
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    (tmp_path / 'afile').write_text('x')
    other = tmp_path / 'other.pth'
    import models_mae
    torch.save({'model': models_mae.mae_vit_micro_patch8().state_dict()}, other)
    base = ['--model', 'mae_vit_pico_patch4', '--input_size', 32, '--num_workers', 0, '--batch_size', 4,
            '--epochs', 1, '--output_dir', tmp_path / 'out']
    return {
        'missing data_path': ([*base, '--data_path', tmp_path / 'nope'], 'is not a folder'),
        'no train/': ([*base, '--data_path', tmp_path / 'no_train'], 'has no train/ folder'),
        'no class folders': ([*base, '--data_path', tmp_path / 'empty'], 'has no class folders'),
        'input_size': ([*base, '--data_path', ok, '--input_size', 30], 'not divisible by the patch size'),
        'mask_ratio': ([*base, '--data_path', ok, '--mask_ratio', 1.0], '--mask_ratio must be in [0, 1)'),
        'kept > mask': ([*base, '--data_path', ok, '--cross_mae', '--kept_mask_ratio', 0.9], '--kept_mask_ratio must be'),
        'unknown model': ([*base, '--data_path', ok, '--model', 'mae_vit_gigantic'], 'unknown --model'),
        'foreign checkpoint': ([*base, '--data_path', ok, '--resume', other], 'does not fit this model'),
        'unwritable output_dir': ([*base, '--data_path', ok, '--output_dir', tmp_path / 'afile' / 'out'], 'is not writable'),
        'missing checkpoint': ([*base, '--data_path', ok, '--resume', tmp_path / 'none.pth'], 'checkpoint not found'),
    }


def test_bad_input_gets_one_clear_line(data_path, tmp_path, capsys):
    for name, (argv, message) in bad_input_cases(data_path, tmp_path).items():
        args = main_pretrain.get_args_parser().parse_args([str(a) for a in argv])
        with pytest.raises(SystemExit) as e:
            misc.run_main(main_pretrain.main, args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, name
        assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], (name, err)


def test_bad_input_exit_code_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'main_pretrain.py'), '--data_path', str(tmp_path / 'nope')],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith('error: --data_path')


def test_corrupt_and_grey_images(tmp_path, capsys):
    root = make_folder(tmp_path / 'mixed', n=4, corrupt=1, gray=1)
    run_script(main_pretrain, ['--model', 'mae_vit_pico_patch4', '--input_size', 32, '--num_workers', 0,
                               '--batch_size', 4, '--epochs', 1, '--data_path', root, '--output_dir', tmp_path / 'o'])
    err = capsys.readouterr().err
    assert 'skipping unreadable image' in err and 'bad0.jpg' in err
    assert len(read_log(tmp_path / 'o' / 'log.txt')) == 1


def test_non_finite_loss_stops_and_keeps_the_checkpoint(data_path, tmp_path, capsys):
    out = tmp_path / 'nan'
    run_script(main_pretrain, [*pretrain_args(data_path, out), '--epochs', 1])
    digest = hashlib.sha256((out / 'checkpoint.pth').read_bytes()).hexdigest()
    args = main_pretrain.get_args_parser().parse_args([str(a) for a in [*pretrain_args(data_path, out), '--epochs', 2,
                                                                         '--lr', 1e30, '--warmup_epochs', 0]])
    with pytest.raises(SystemExit) as e:
        misc.run_main(main_pretrain.main, args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert 'error: loss is' in err and 'at epoch 1, step' in err
    assert hashlib.sha256((out / 'checkpoint.pth').read_bytes()).hexdigest() == digest


# fp32 rounding, not one CPU's: a sum of K terms computed in fp32 is off by at most K * eps (eps = 2**-23 = 1.2e-7)
# relative to the sum of the terms' magnitudes, about sqrt(K) * eps when the roundings' signs vary. The longest
# reductions here (a weight's gradient over 16 images x 65 tokens) have K ~ 1e3: worst case 1.2e-4, typically 4e-6.
# Measured between one and two processes, each under AVX-512, AVX2 and the no-SIMD kernels
# (ATEN_CPU_CAPABILITY=default): at most 6e-7 for the gradients, 5e-6 for the SGD weights, 1.4e-7 for the losses.
# A DDP bug is of order 1: a wrong world size doubles every gradient, a skipped all-reduce leaves each rank half
# the batch.
GRAD_RTOL = 1e-4  # the worst-case bound above
LOSS_RTOL = 1e-5  # a loss averages ~4e4 squared errors: its rounding is far below the gradients'


def ddp_mismatches(one, two, run='sgd'):
    """What differs beyond fp32 rounding between ddp_check.py in one process (`one`) and in two (`two[run]`):
    the first step's gradients per tensor (in norm) and SGD's final weights, which are the initial ones minus lr
    times the summed gradients, so they may differ by lr * GRAD_RTOL * sum_t |g_t| plus one rounding of the
    weight per step (4 eps |w|). AdamW's weights are not compared: see ddp_check.py."""
    bad, ref, got = [], one['sgd'], two[run]
    for k, g in ref['grad0'].items():
        if (got['grad0'][k] - g).norm() > GRAD_RTOL * g.norm():
            bad.append(f'gradient of {k}')
    for k, w in ref['model'].items():
        moved = sum(n[k] for n in ref['grad_norms']) if k in ref['grad0'] else 0.
        tol = GRAD_RTOL * ref['lr'] * moved + len(ref['grad_norms']) * 2 ** -23 * w.norm()
        if (got['model'][k] - w).norm() > tol:
            bad.append(f'weight {k}')
    return bad


def test_ddp_equivalence(data_path, tmp_path):
    """One process with batch 16 and two with batch 8 each (same samples, masks and initial weights) give the
    same loss at every AdamW step, the same first-step gradients and the same weights after SGD steps, up to
    fp32 rounding; DDP with a wrong world size in its average (a sum) is caught by the same comparison."""
    one, two = tmp_path / 'one.pth', tmp_path / 'two.pth'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, str(ROOT / 'tests' / 'ddp_check.py'), str(one), data_path], check=True, env=env,
                   cwd=ROOT, capture_output=True)
    torchrun('tests/ddp_check.py', [two, data_path])
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert len(a['adamw']['losses']) == len(b['adamw']['losses']) == 4
    for step, (la, lb) in enumerate(zip(a['adamw']['losses'], b['adamw']['losses'])):
        assert abs(la - lb) <= LOSS_RTOL * abs(la), (step, la, lb)
    # the losses after the first step follow the optimizer's updates (same first step, then apart from SGD's)
    assert a['adamw']['losses'][0] == a['sgd']['losses'][0]
    assert all(abs(la - ls) > 1e-3 for la, ls in zip(a['adamw']['losses'][1:], a['sgd']['losses'][1:]))
    for k, g in a['adamw']['grad0'].items():  # AdamW's first step sees the gradients SGD's does
        assert torch.equal(g, a['sgd']['grad0'][k]) and torch.equal(b['adamw']['grad0'][k], b['sgd']['grad0'][k]), k
    moved = min((a['sgd']['model'][k] - a['init'][k]).norm() / a['init'][k].norm().clamp_min(1e-12)
                for k in a['sgd']['grad0'])
    assert moved > 10 * GRAD_RTOL  # every tensor moved by more than ten times the tolerance
    assert ddp_mismatches(a, b) == []
    broken = ddp_mismatches(a, b, run='broken')
    assert len(broken) == 2 * len(a['sgd']['grad0']), broken  # every gradient and every trained weight differs


def test_randaugment_posterize_at_magnitude_10_does_not_stop_fine_tuning():
    """timm's 'rand-m9-mstd0.5-inc1' asks PIL for posterize(bits=0) now and then, which PIL >= 10 refuses."""
    import random
    from util.datasets import finetune_transform
    args = argparse.Namespace(input_size=32, color_jitter=None, aa='rand-m9-mstd0.5-inc1', reprob=0.25,
                              remode='pixel', recount=1)
    t = finetune_transform(args)
    img = Image.new('RGB', (40, 40), (100, 50, 20))
    torch.manual_seed(0)
    random.seed(0)
    for _ in range(3000):  # with these seeds the bare timm transform raises within these draws
        assert t(img).shape == (3, 32, 32)


def test_two_process_resume_is_bit_identical(data_path, tmp_path):
    """Every process stores and restores its own RNG and mask streams (a constant lr keeps the schedule
    independent of --epochs, so a 2-epoch run continued to 3 equals a 3-epoch run)."""
    common = [*PICO, '--data_path', data_path, '--subset', 128, '--batch_size', 16, '--max_steps_per_epoch', 2,
              '--lr', 1e-3, '--min_lr', 1e-3, '--warmup_epochs', 0, '--mask_type', 'green', '--vis_freq', 0]
    torchrun('main_pretrain.py', [*common, '--epochs', 3, '--output_dir', tmp_path / 'a'])
    torchrun('main_pretrain.py', [*common, '--epochs', 2, '--output_dir', tmp_path / 'b'])
    torchrun('main_pretrain.py', [*common, '--epochs', 3, '--output_dir', tmp_path / 'b'])
    a, b = load_state(tmp_path / 'a' / 'checkpoint.pth'), load_state(tmp_path / 'b' / 'checkpoint.pth')
    assert len(b['rank_states']) == 2
    assert not torch.equal(b['rank_states'][0]['mask_gen']['rng_state'], b['rank_states'][1]['mask_gen']['rng_state'])
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
