"""End-to-end runs of the scripts on real data (Imagenette subset at 32 px) on the CPU."""
import pytest

import main_finetune
import main_pretrain
from conftest import PICO, read_log, run_script, torchrun


def test_pretrain_loss_falls_on_real_data(pico_pretrained):
    out = pico_pretrained
    log = read_log(out / 'log.txt')
    assert [r['epoch'] for r in log] == list(range(25))
    first, last = log[0]['train_loss'], log[-1]['train_loss']
    assert last < 0.6 * first, (first, last)  # 200 steps; measured about 2.5 -> 0.8
    assert {p.name for p in out.glob('checkpoint*.pth')} == {'checkpoint.pth', 'checkpoint-9.pth', 'checkpoint-19.pth',
                                                              'checkpoint-24.pth'}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next(out.glob('events.out.tfevents*'))))
    events.Reload()
    assert {'train_loss', 'lr'} <= set(events.Tags()['scalars'])
    assert set(events.Tags()['images']) == {'reconstruction', 'masks (white = visible)'}
    assert [e.step for e in events.Images('reconstruction')] == [0, 10, 20, 24]


@pytest.mark.parametrize('mask_type', ['white', 'red', 'blue', 'green', 'purple', 'block', 'block2x2'])
def test_every_mask_type_trains(data_path, tmp_path, mask_type):
    out = tmp_path / mask_type
    run_script(main_pretrain, [*PICO, '--data_path', data_path, '--subset', 256, '--batch_size', 32, '--epochs', 6,
                               '--warmup_epochs', 1, '--blr', 2e-3, '--max_steps_per_epoch', 6, '--norm_pix_loss',
                               '--mask_type', mask_type, '--output_dir', out])
    log = read_log(out / 'log.txt')
    assert log[-1]['train_loss'] < 0.9 * log[0]['train_loss'], log


def test_mask_schedule_switches_and_resumes(data_path, tmp_path, capsys):
    out = tmp_path / 'sched'
    common = [*PICO, '--data_path', data_path, '--subset', 64, '--batch_size', 32, '--warmup_epochs', 1,
              '--max_steps_per_epoch', 1, '--mask_type', 'green', '--mask_schedule', '1:blue,2:red', '--output_dir', out]
    run_script(main_pretrain, [*common, '--epochs', 2])
    assert 'epoch 1: mask type blue' in capsys.readouterr().out
    run_script(main_pretrain, [*common, '--epochs', 3])  # resumes at epoch 2 with red
    assert 'epoch 2: mask type red' in capsys.readouterr().out


def test_torchrun_pretrain_finetune_linprobe_eval(data_path, tmp_path):
    pre, ft, lp = tmp_path / 'pre', tmp_path / 'ft', tmp_path / 'lp'
    torchrun('main_pretrain.py', [*PICO, '--data_path', data_path, '--subset', 256, '--batch_size', 16, '--epochs', 2,
                                  '--warmup_epochs', 1, '--max_steps_per_epoch', 4, '--output_dir', pre])
    assert len(read_log(pre / 'log.txt')) == 2
    common = ['--model', 'vit_pico_patch4', '--input_size', 32, '--num_workers', 0, '--cache_data', '--data_path',
              data_path, '--subset', 256, '--val_subset', 200, '--nb_classes', 10, '--batch_size', 16, '--epochs', 1,
              '--warmup_epochs', 0, '--max_steps_per_epoch', 4, '--finetune', pre / 'checkpoint.pth', '--dist_eval']
    torchrun('main_finetune.py', [*common, '--output_dir', ft, '--mixup', 0.8, '--cutmix', 1.0])
    torchrun('main_linprobe.py', [*common, '--output_dir', lp])
    for d in (ft, lp):
        assert 'test_acc1' in read_log(d / 'log.txt')[0]
    res = torchrun('main_finetune.py', ['--eval', '--resume', ft / 'checkpoint.pth', '--model', 'vit_pico_patch4',
                                        '--input_size', 32, '--nb_classes', 10, '--data_path', data_path, '--val_subset', 200,
                                        '--num_workers', 0, '--batch_size', 50], nproc=1)
    lines = [line for line in res.stdout.splitlines() if '* Acc@1' in line]
    assert len(lines) == 1 and ' Acc@5 ' in lines[0] and ' loss ' in lines[0]


def test_crossmae_torchrun_and_finetune(data_path, tmp_path):
    pre, ft = tmp_path / 'pre', tmp_path / 'ft'
    torchrun('main_pretrain.py', [*PICO, '--data_path', data_path, '--subset', 256, '--batch_size', 32, '--epochs', 4,
                                  '--warmup_epochs', 1, '--blr', 2e-3, '--max_steps_per_epoch', 4, '--cross_mae',
                                  '--weight_fm', '--use_input', '--kept_mask_ratio', 0.25, '--mask_type', 'green',
                                  '--output_dir', pre])
    log = read_log(pre / 'log.txt')
    assert log[-1]['train_loss'] < log[0]['train_loss']
    run_script(main_finetune, ['--model', 'vit_pico_patch4', '--input_size', 32, '--num_workers', 0, '--cache_data',
                               '--data_path', data_path, '--subset', 64, '--val_subset', 50, '--nb_classes', 10,
                               '--batch_size', 16, '--epochs', 1, '--max_steps_per_epoch', 2, '--warmup_epochs', 0,
                               '--finetune', pre / 'checkpoint.pth', '--output_dir', ft, '--cls_token'])
    assert read_log(ft / 'log.txt')[0]['test_acc1'] >= 0
