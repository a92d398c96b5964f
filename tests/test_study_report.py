"""The study's RESULTS.md writer on synthetic unit summaries: means, standard deviations, pooled noise and the
verdicts are computed from the numbers (the study itself is not run by the tests)."""
import json
import os
import statistics
import time
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import study  # noqa: E402
import study_plan  # noqa: E402
import study_report  # noqa: E402
import study_transfer  # noqa: E402

KNN = {'mae': [40.0, 41.0, 42.0], 'colormae_green': [40.5, 41.5, 42.5], 'crossmae_kept025': [41.0, 42.0, 43.0],
       'cmae': [45.0, 46.0, 47.0]}  # each std 1.0: pooled std 1.0
CURVES = ['--seg_curve', '360,900,1800', '--det_curve', '256,640,1280']  # the tests' curves (the study's: longer)


MACHINE = {'cpu': 'a CPU', 'boot_id': 'one boot'}


def unit(out, name, kind, method, seed, knn20, epochs=7, epoch_time=10.0, **more):
    log = [{'epoch': e, 'train_loss': 1.0 - 0.05 * e, 'epoch_time_s': epoch_time} for e in range(epochs)]
    more.setdefault('machine', MACHINE)
    s = {'unit': name, 'kind': kind, 'method': method, 'seed': seed, 'epochs': epochs, 'commands': [['x.py']],
         'pretrain_wall_s': epochs * epoch_time + 5, 'log': log, 'train_time_s': epochs * epoch_time,
         'knn_curve': [{'epoch': epochs, 'time_s': epochs * epoch_time, 'knn20': knn20, 'knn200': knn20 - 2,
                        'probe': knn20 + 10}], 'knn20': knn20, 'knn200': knn20 - 2, 'probe': knn20 + 10, **more}
    os.makedirs(out / name)
    (out / name / 'summary.json').write_text(json.dumps(s))


def seg_unit(out, cell, seed, miou, iters=360):
    d = out / 'seg' / f'{cell}-seed{seed}-it{iters}'
    os.makedirs(d)
    (d / 'summary.json').write_text(json.dumps({'task': 'seg', 'cell': cell, 'seed': seed, 'iters': iters,
                                                'miou': miou, 'aacc': 70.0, 'iou': [miou * 2, miou, 0.0],
                                                'wall_s': 100.0, 'command': ['s.py']}))


def det_unit(out, cell, seed, box, iters, **extra):
    d = out / 'det' / f'{cell}-seed{seed}-it{iters}'
    os.makedirs(d)
    (d / 'summary.json').write_text(json.dumps({'task': 'det', 'cell': cell, 'seed': seed, 'iters': iters,
                                                'box_ap': box, 'box_ap50': 2 * box, 'mask_ap': box / 2,
                                                'mask_ap50': box, 'wall_s': 50.0, 'command': ['d.py'], **extra}))


def det_report(tmp_path, out):
    """RESULTS.md written from the detection units under `out` (a one-class CamVid folder for the seg section)."""
    (tmp_path / 'camvid').mkdir()
    (tmp_path / 'camvid' / 'classes.txt').write_text('Sky\n')
    a = study.get_args([*CURVES, '--out_dir', str(out), '--results', str(tmp_path / 'R.md'), '--seg_data',
                        str(tmp_path / 'camvid')])
    study_report.write(a, str(tmp_path))
    return (tmp_path / 'R.md').read_text()


@pytest.fixture
def results(tmp_path, request):
    out = tmp_path / 'runs'
    seg = getattr(request, 'param', {})  # cell -> mIoU per fine-tuning seed, or (iters, cell) -> ...
    for cell, values in seg.items():
        iters, cell = cell if isinstance(cell, tuple) else (360, cell)
        for seed, v in enumerate(values):
            seg_unit(out, cell, seed, v, iters)
    (tmp_path / 'camvid').mkdir()
    (tmp_path / 'camvid' / 'classes.txt').write_text('Sky\nRoad\nPole\n')
    for m, values in KNN.items():
        for seed, v in enumerate(values):
            unit(out, m if seed == 0 else f'{m}-seed{seed}', 'method', m, seed, v,
                 epoch_time=5.0 if m == 'crossmae_kept025' else 20.0 if m == 'cmae' else 10.0)
    unit(out, 'crossmae_kept025-eqtime', 'eqtime', 'crossmae_kept025', 0, 44.0, epochs=14, epoch_time=5.0,
         budget_note='n')
    unit(out, 'cmae-eqtime', 'eqtime', 'cmae', 0, 39.0, epochs=4, epoch_time=20.0, budget_note='n')
    unit(out, 'mae-long', 'long', 'mae', 0, 46.5, epochs=60, budget_note='n')
    for f, v in (('untrained', 30.0), ('pixels16', 36.0)):
        os.makedirs(out / f)
        (out / f / 'summary.json').write_text(json.dumps({'unit': f, 'kind': 'floor', 'method': f, 'seed': 0,
                                                          'commands': [], 'knn20': v, 'knn200': v, 'probe': v}))
    a = study.get_args([*CURVES, '--out_dir', str(out), '--results', str(tmp_path / 'RESULTS.md'),
                        '--seg_data', str(tmp_path / 'camvid')])
    study_report.write(a, str(tmp_path))
    return (tmp_path / 'RESULTS.md').read_text()


def test_seed_table_means_and_std(results):
    assert '| mae | 3 | 41.00 ± 1.00 | 40.00 / 41.00 / 42.00 |' in results
    assert '| cmae | 3 | 46.00 ± 1.00 |' in results
    assert '+5.00 (+5.0σ)' in results  # cmae's k-NN difference to MAE in pooled std
    assert 'k-NN std 1.00, probe std 1.00' in results


def test_verdicts_follow_the_noise(results):
    green = next(line for line in results.splitlines() if line.startswith('- **colormae_green**'))
    assert 'k-NN +0.50 (+0.5 pooled std, inside the noise)' in green and 'k-NN not resolved' in green
    cmae = next(line for line in results.splitlines() if line.startswith('- **cmae**'))
    assert 'k-NN agrees' in cmae
    assert 'k-NN at equal time contradicts it' in cmae  # 39 vs 41 at 2 pooled std
    cross = next(line for line in results.splitlines() if line.startswith('- **crossmae_kept025**'))
    assert '0.50× MAE' in cross and 'so the result agrees' in cross


@pytest.mark.parametrize('results', [{'mae': [25.0, 24.0], 'crossmae_kept025': [22.0, 21.0],
                                      'random': [23.0, 22.0]}], indirect=True)
def test_segmentation_section_and_a_mixed_crossmae_verdict(results):
    """CrossMAE no worse on k-NN/probe but worse on mIoU beyond the noise: the reading says both."""
    assert '| mae | 2 | 24.50 ± 0.71 | 25.00 / 24.00 |' in results
    assert 'pooled std over seeds: mIoU 0.71' in results
    assert '- mae (2 seeds): 24.50 mIoU, vs random init +2.00 (+2.8 pooled std, outside the noise).' in results
    cross = next(line for line in results.splitlines() if line.startswith('- **crossmae_kept025**'))
    assert ('CamVid mIoU at 360 iterations (short budget) -3.00 (-4.2 pooled std, outside the noise; std of '
            'fine-tuning seeds)') in cross
    assert 'agrees on k-NN, probe and does not on CamVid mIoU' in cross
    assert '| mae | 1 | 48.0 | 24.0 | 0.0 |' in results  # per-class table


def test_equal_time_and_long_cell(results):
    assert '| crossmae_kept025 | 14 | 70 | 70 | 42.00 | 44.00 |' in results
    assert '46.50% at\n10.0 min, target met' in results
    assert 'Units not run yet:' in results and 'seg:mae-seed0' in results


def test_pooled_std_and_noise_words():
    assert study_report.pooled_std([[1, 3], [2, 2, 2]]) == pytest.approx((statistics.variance([1, 3]) / 2) ** 0.5)
    assert study_report.verdict(3.0, 1.0) == 'agrees'
    assert study_report.verdict(-3.0, 1.0) == 'contradicts it'
    assert study_report.verdict(1.9, 1.0).startswith('not resolved')


def test_plan_units_parse(tmp_path):
    a = study.get_args(['--out_dir', str(tmp_path)])  # no runs (not the checkout's study_runs/)
    units = study_plan.plan(a)
    assert units[:4] == study_plan.SEEDED and 'mae-long' in units and 'seg:random-seed1' in units
    assert len(set(units)) == len(units)
    assert {study_plan.parse_unit(u)[0] for u in units} == {'method', 'floor', 'scratch', 'eqtime', 'seg', 'det',
                                                             'long'}
    assert {'seg900:random-seed0', 'seg1800:mae-long-seed0', 'segc:colormae_green-seed1', 'det:mae-seed0',
            'det20480:random-seed0', 'det40960:random-seed0', 'detc:mae-seed1', 'seg7200:mae-long-seed0',
            'seg14400:random-seed0'} <= set(units)  # the study's default curves
    assert units.index('seg1800:mae-seed0') < units.index('segc:random-seed0')  # the curve before its use
    assert units.index('det20480:mae-seed0') < units.index('detc:random-seed1')
    assert study_transfer.parse('det640:mae-long-seed2', study_plan.CELLS) == ('det', 640, 'mae-long', 2)
    assert study_transfer.parse('segc:random-seed0', study_plan.CELLS) == ('seg', 'c', 'random', 0)
    for bad in ('mae-seedX', 'seg:nope-seed0', 'segx:mae-seed0', 'det:mae-seed'):
        with pytest.raises(ValueError):
            study_plan.parse_unit(bad)
    assert study_plan.unit_dir(a, 'segc:mae-seed0') is None  # no curve yet: no budget, not done
    assert study_plan.unit_dir(a, 'seg:mae-seed1').endswith(os.path.join('seg', 'mae-seed1-it360'))


@pytest.mark.parametrize('values, expect', [
    ({360: [20.0, 21.0], 900: [28.0], 1800: [29.0]}, 900),   # +1.0 after 900 < 2 sd (sd 0.71): converged at 900
    ({360: [20.0, 21.0], 900: [24.0], 1800: [29.0]}, 1800),  # still climbing: the longest, said NOT converged
    ({360: [20.0, 21.0], 900: [20.0], 1800: [20.5]}, 360),
    ({360: [20.0, 21.0], 900: [25.0], 1800: [20.0]}, 900),   # a later dip does not count as a gain
])
def test_converged_budget_from_the_curve(tmp_path, values, expect):
    a = study.get_args([*CURVES, '--out_dir', str(tmp_path)])
    for iters, vs in values.items():
        for seed, v in enumerate(vs):
            seg_unit(tmp_path, 'random', seed, v, iters)
    iters, how, settled = study_transfer.converged(a, 'seg')
    assert iters == expect
    still_gaining = expect == 1800 and values[1800][0] - values[900][0] >= 2 * 0.5 ** 0.5
    assert settled == ('NOT converged' not in how) == (not still_gaining)
    assert study_plan.unit_dir(a, 'segc:cmae-seed1').endswith(f'cmae-seed1-it{expect}')


def test_converged_budget_waits_for_curve_and_noise(tmp_path):
    a = study.get_args([*CURVES, '--out_dir', str(tmp_path)])
    seg_unit(tmp_path, 'random', 0, 20.0, 360)
    seg_unit(tmp_path, 'random', 0, 25.0, 900)
    assert study_transfer.converged(a, 'seg') == (None, 'random init not yet fine-tuned at 1800 iterations', False)
    seg_unit(tmp_path, 'random', 0, 26.0, 1800)
    assert study_transfer.converged(a, 'seg')[0] is None  # one seed everywhere: no noise yet
    seg_unit(tmp_path, 'mae', 1, 26.0, 1800)
    seg_unit(tmp_path, 'mae', 0, 24.0, 1800)  # sd from another cell's seeds: sqrt(2) -> 2 sd = 2.83
    assert study_transfer.converged(a, 'seg')[0] == 900


@pytest.mark.parametrize('at900, says', [
    (25.0, 'so far, random init mIoU by iterations (360: 20.50, 900: 25.00), it still gains beyond 2 pooled std (1.41) '
           'at every step'),
    (21.5, 'so far, random init mIoU by iterations (360: 20.50, 900: 21.50), it gains at most +1.00 from 360 '
           'iterations on, under 2 pooled std (1.41)'),
])
def test_converged_budget_reads_the_curve_run_so_far(tmp_path, at900, says):
    a = study.get_args([*CURVES, '--out_dir', str(tmp_path)])
    seg_unit(tmp_path, 'random', 0, 20.0, 360)
    seg_unit(tmp_path, 'random', 1, 21.0, 360)  # sd 0.71 -> 2 sd = 1.41
    seg_unit(tmp_path, 'random', 0, at900, 900)
    assert study_transfer.converged(a, 'seg') == (
        None, f'random init not yet fine-tuned at 1800 iterations; {says}', False)  # 1800 could still gain


@pytest.mark.parametrize('results', [{'random': [20.0, 21.0], (900, 'random'): [28.0, 27.0], (1800, 'random'): [28.5],
                                      'mae': [24.0, 25.0], (900, 'mae'): [29.0, 30.0], (1800, 'mae'): [30.0],
                                      (900, 'cmae'): [31.0]}], indirect=True)
def test_segmentation_at_the_converged_budget(results):
    assert 'converged at 900 iterations' in results
    assert '| random | 20.50 (2 seeds) | 27.50 (2 seeds) | 28.50 |' in results  # the curve table
    assert '### 900 iterations (converged budget)' in results and '### 360 iterations (short budget)' in results
    assert '- cmae (1 seed): 31.00 mIoU, vs random init +3.50 (+4.9 pooled std, outside the noise); vs MAE +1.50 ' \
           '(+2.1 pooled std, outside the noise).' in results
    cmae = next(line for line in results.splitlines() if line.startswith('- **cmae**'))
    assert 'CamVid mIoU at 900 iterations (converged budget) +1.50' in cmae
    assert ('- CamVid at 900 fine-tuning iterations (random init converged there), `mae` (2 seeds) vs random init '
            '(2): mIoU 29.50 vs 27.50, +2.00 (+2.8 pooled std, outside the noise): beats random init beyond the '
            'noise on mIoU.') in results


def test_detection_section(tmp_path):
    out = tmp_path / 'runs'
    for cell, box in (('random', (2.0, 3.0)), ('mae-long', (8.0, 9.0))):
        for seed, v in enumerate(box):
            det_unit(out, cell, seed, v, 1280)
        det_unit(out, cell, 0, box[0] / 2, 256)
    det_unit(out, 'mae', 0, 2.5, 1280)  # random init's mean: inside the noise
    amd, intel = {'cpu': 'AMD EPYC', 'boot_id': 'a'}, {'cpu': 'Intel Xeon', 'boot_id': 'b'}
    det_unit(out, 'mae', 0, 1.0, 256, resumed=[{'machine': amd, 'from_epoch': 0}, {'machine': amd, 'from_epoch': 5},
                                               {'machine': intel, 'from_epoch': 7}])
    text = det_report(tmp_path, out)
    assert '## Detection transfer: Mask R-CNN on Penn-Fudan' in text
    assert '| mae-long | 2 | 8.50 ± 0.71 | 8.00 / 9.00 | 4.25 ± 0.35 | 4.00 / 4.50 |' in text
    assert ('- mae-long (2 seeds): 8.50 AP^box, vs random init +6.00 (+8.5 pooled std, outside the noise); vs MAE '
            '+6.00 (+8.5 pooled std, outside the noise).') in text
    assert 'random init not yet fine-tuned at 640 iterations' in text
    assert ('- `mae` at 256 it seed 0 ran in 3 parts, resumed from its checkpoint at epoch 5 on the same machine, '
            'epoch 7 on another machine (Intel Xeon).') in text
    assert '| mae | 1 | 2.50 | 2.50 | 1.25 | 1.25 |' in text and '± nan' not in text  # no std from one seed
    # the reading: at the longest budget random init has run (640 is missing), both AP against the pooled noise
    assert ('- Penn-Fudan at 1280 fine-tuning iterations (the longest budget random init has run so far: the '
            'converged one is not known yet), `mae-long` (2 seeds) vs random init (2): AP^box 8.50 vs 2.50, +6.00 '
            '(+8.5 pooled std, outside the noise); AP^mask 4.25 vs 1.25, +3.00 (+8.5 pooled std, outside the '
            'noise): beats random init beyond the noise on AP^box and AP^mask.') in text
    assert ('`mae` (1 seed) vs random init (2): AP^box 2.50 vs 2.50, +0.00 (+0.0 pooled std, inside the noise); '
            'AP^mask 1.25 vs 1.25, +0.00 (+0.0 pooled std, inside the noise): does NOT beat random init beyond the '
            'noise on AP^box and AP^mask.') in text
    assert (tmp_path / 'docs' / 'det_curve.png').exists()


def test_device_flag_reaches_the_scripts(tmp_path, monkeypatch):
    """study.py --device cuda hands --device cuda to every script it runs (here: pretraining, not run)."""
    a = study.get_args(['--device', 'cuda', '--out_dir', str(tmp_path)])
    commands = []
    monkeypatch.setattr(study, 'run', lambda cmd, log: commands.append(cmd) or 1.0)
    study.pretrain(a, 'crossmae_kept025', str(tmp_path / 'u'), seed=2, epochs=9)
    cmd = commands[0]
    assert cmd[cmd.index('--device') + 1] == 'cuda' and cmd[cmd.index('--seed') + 1] == '2'
    assert cmd[cmd.index('--epochs') + 1] == '9' and cmd[cmd.index('--kept_mask_ratio') + 1] == '0.25'
    assert study.device_args(study.get_args([])) == []  # auto: the commands stay as they were


def test_long_cell_is_read_within_its_minutes():
    """mae-long's k-NN 'at 60 minutes' is its last point inside the measured minutes, not a later one."""
    a = study.get_args(['--long_minutes', '10'])
    long = {'knn_curve': [{'time_s': t, 'knn20': v} for t, v in ((300, 40.0), (590, 44.0), (620, 46.0))]}
    assert study_report.long_point(a, long)['knn20'] == 44.0
    assert study_report.long_point(study.get_args(['--long_minutes', '4']), long)['knn20'] == 40.0


@pytest.mark.parametrize('task', ['seg', 'det'])
def test_transfer_unit_reads_its_run_and_remakes_a_missing_checkpoint(tmp_path, monkeypatch, task):
    """A transfer unit at the converged budget: the command gets that budget and the cell's checkpoint; a cell
    whose summary is present but whose checkpoint is not (a new machine) is pretrained again first."""
    a = study.get_args([*CURVES, '--out_dir', str(tmp_path), '--results', str(tmp_path / 'R.md')])
    for iters, v in ((360, 20.0), (900, 25.0), (1800, 25.5)) if task == 'seg' else ((256, 2.0), (640, 5.0),
                                                                                       (1280, 5.1)):
        write_run = seg_unit if task == 'seg' else det_unit
        write_run(tmp_path, 'random', 0, v, iters)
        write_run(tmp_path, 'random', 1, v + 0.5, iters)
    unit(tmp_path / 'gone', 'mae', 'method', 'mae', 0, 40.0,  # its summary; the checkpoint-6.pth it names: absent
         root='/old', commands=[['main_pretrain.py', '--data_path', '/old/../data', '--output_dir', '/old/runs/mae']])
    os.rename(tmp_path / 'gone' / 'mae', tmp_path / 'mae')
    (tmp_path / 'mae' / 'checkpoint-3.pth').write_bytes(b'a stale checkpoint of an interrupted run')
    commands, knns = [], []

    def run(cmd, log):
        commands.append(cmd)
        out = cmd[cmd.index('--output_dir') + 1]
        last = ({'test_miou': 30.0, 'test_aacc': 80.0, 'test_macc': 40.0, 'test_iou': [1.0]} if task == 'seg' else
                {'test_bbox_AP': 7.0, 'test_bbox_AP50': 20.0, 'test_bbox_stats': [7.0] * 12, 'test_segm_AP': 6.0,
                 'test_segm_AP50': 18.0, 'test_segm_stats': [6.0] * 12})
        if cmd[0] == 'main_pretrain.py':  # the command of record, run again
            last = {'train_loss': 0.5, 'epoch_time_s': 9.0}
            # while it runs, the summary of record stays in place and the old checkpoints are gone
            assert json.load(open(tmp_path / 'mae' / 'summary.json'))['knn20'] == 40.0
            assert not (tmp_path / 'mae' / 'checkpoint-3.pth').exists()
        (tmp_path / out / 'log.txt').write_text(json.dumps({'epoch': 0, **last}) + '\n')
        return 12.0

    def knn(a, ckpts, out, log):
        knns.append(ckpts)
        return [{'knn20': 41.5, 'knn200': 39.0, 'probe': 50.0}], ['main_knn.py']
    monkeypatch.setattr(study, 'run', run)
    monkeypatch.setattr(study, 'knn', knn)
    s = study.transfer(a, task, 'c', 'mae', 1)
    conv = 900 if task == 'seg' else 640
    assert s['iters'] == conv and s['seed'] == 1
    assert commands[0] == ['main_pretrain.py', '--data_path', study.ROOT + '/../data', '--output_dir',
                           str(tmp_path / 'mae')]  # the command of record, in this checkout
    assert knns == [[str(tmp_path / 'mae' / 'checkpoint-6.pth')]]  # the final checkpoint only
    cmd = commands[1]
    assert cmd[cmd.index('--max_iters') + 1] == str(conv) and cmd[cmd.index('--seed') + 1] == '1'
    assert cmd[cmd.index('--finetune') + 1] == os.path.join(str(tmp_path), 'mae', 'checkpoint-6.pth')
    assert s == json.load(open(tmp_path / task / f'mae-seed1-it{conv}' / 'summary.json'))
    assert (s['miou'], s['iou']) == (30.0, [1.0]) if task == 'seg' else (s['box_ap'], s['mask_ap50']) == (7.0, 18.0)
    assert study_plan.is_done(a, f'{task}c:mae-seed1') and not study_plan.is_done(a, f'{task}c:mae-seed0')
    # the summary of record stays, the re-made run lies beside it, and the transfer run and the report say so
    assert json.load(open(tmp_path / 'mae' / 'summary.json'))['knn20'] == 40.0
    assert json.load(open(tmp_path / 'mae' / 'remade' / 'summary.json'))['knn20'] == 41.5
    assert s['remade_from']['knn20'] == 41.5 and s['remade_from']['epochs'] == 7
    line, = study_transfer.remade_lines(a, study_transfer.load(a, task))
    assert f'{conv} it seed 1' in line and '41.50% vs 40.00%' in line


def test_each_remake_of_a_cell_gets_its_own_line(tmp_path):
    """Two machines re-made `mae` (each rounds in its own way): the runs are named under the re-make they
    fine-tuned from, one line each; runs from the run of record are not named."""
    a = study.get_args(['--out_dir', str(tmp_path)])
    (tmp_path / 'mae').mkdir()
    (tmp_path / 'mae' / 'summary.json').write_text(json.dumps({'knn20': 40.0}))
    made = {'09:04': {'remade_at': '09:04', 'knn20': 40.0, 'epochs': 7},
            '15:02': {'remade_at': '15:02', 'knn20': 40.1, 'epochs': 7}}
    runs = [{'cell': 'mae', 'seed': 0, 'iters': 1280, 'remade_from': made['09:04']},
            {'cell': 'mae', 'seed': 0, 'iters': 640, 'remade_from': made['15:02']},
            {'cell': 'mae', 'seed': 1, 'iters': 1280, 'remade_from': made['15:02']},
            {'cell': 'mae', 'seed': 0, 'iters': 256},
            {'cell': 'random', 'seed': 0, 'iters': 1280}]
    first, second = study_transfer.remade_lines(a, runs)
    assert 'runs at 1280 it seed 0 fine-tune' in first and 're-made on 09:04' in first and '40.00% vs 40.00%' in first
    assert 'runs at 640 it seed 0, 1280 it seed 1 fine-tune' in second and '40.10% vs 40.00%' in second
    assert '256' not in first + second


def test_reading_falls_back_to_the_longest_budget_both_have_run(tmp_path):
    """mae-long is not yet fine-tuned at the claims' budget (1280): its line reads it against random init at 640,
    the longest budget where both have run, and says so; a cell with no common budget gets no line."""
    a = study.get_args(['--out_dir', str(tmp_path), '--det_curve', '640,1280'])
    runs = [{'cell': 'random', 'seed': 0, 'iters': 640, 'box_ap': 2.0, 'mask_ap': 1.0},
            {'cell': 'random', 'seed': 0, 'iters': 1280, 'box_ap': 10.0, 'mask_ap': 6.0},
            {'cell': 'random', 'seed': 1, 'iters': 1280, 'box_ap': 11.0, 'mask_ap': 7.0},
            {'cell': 'mae-long', 'seed': 0, 'iters': 640, 'box_ap': 9.0, 'mask_ap': 5.0}]
    line, = study_transfer.headline(a, 'det', runs)
    assert line.startswith('- Penn-Fudan at 640 fine-tuning iterations (the longest budget where both have run: '
                           '`mae-long` is not yet fine-tuned at 1280), `mae-long` (1 seed) vs random init (1): '
                           'AP^box 9.00 vs 2.00, +7.00 (+9.9 pooled std, outside the noise)'), line


def test_pretraining_time_is_compared_on_one_machine_only():
    """A method's time per epoch is read against MAE-random's timed on the same machine (its re-made run
    included); a summary without a machine, or MAE timed only elsewhere, gives no ratio."""
    here, there = {'cpu': 'EPYC', 'boot_id': 'b1'}, {'cpu': 'EPYC', 'boot_id': 'b2'}

    def run(t, m=None):
        return {'log': [{'epoch_time_s': t}, {'epoch_time_s': t + 3}], **({'machine': m} if m else {})}
    mae_record, mae_remade = run(55.0, there), run(80.0, here)
    assert study_report.time_ratio([run(73.0, here)], [mae_record]) is None
    assert study_report.time_ratio([run(73.0, here)], [mae_record, mae_remade]) == pytest.approx(73.0 / 80.0)
    assert study_report.time_ratio([run(73.0)], [run(55.0)]) is None
    assert study_plan.same_machine(run(1.0, here), run(2.0, dict(here)))
    m = study_plan.machine()
    assert m['cpu'] and m['boot_id'] and m == study_plan.machine()
    # CrossMAE's claim is "no worse for less": with no epoch time beside MAE's, the reading does not decide it
    seeds = {m: [{**run(t, there if m == 'mae' else here), 'knn20': 40.0, 'probe': 50.0}]
             for m, t in (('mae', 55.0), ('crossmae_kept025', 40.0))}
    line, = study_report.claims_reading({}, seeds, 1.0, 1.0, {}, 1.0)
    assert 'not compared' in line and 'so the result is not resolved' in line
    line, = study_report.claims_reading({}, seeds, 1.0, 1.0, {}, 1.0, mae_remade=run(80.0, here))
    assert '0.50× MAE' in line and 'so the result agrees' in line


def test_equal_time_budget_pairs_epoch_times_of_one_machine(tmp_path, monkeypatch):
    """An eqtime unit's epochs = 7 x MAE's s/epoch / the method's, both timed on one machine (this one first):
    MAE's record from another machine is not divided by the method's time here."""
    a = study.get_args(['--out_dir', str(tmp_path)])
    other, here = {'cpu': 'fast CPU', 'boot_id': '1'}, {'cpu': 'slow CPU', 'boot_id': '2'}
    unit(tmp_path, 'mae', 'method', 'mae', 0, 40.0, epoch_time=10.0, machine=other)
    unit(tmp_path, 'cmae', 'method', 'cmae', 0, 40.0, epoch_time=28.0, machine=here)
    with pytest.raises(RuntimeError, match='timed on one machine'):
        study.budget(a, 'eqtime', 'cmae')  # 7 x 10 / 28 would mix two machines
    unit(tmp_path, 'mae/remade', 'method', 'mae', 0, 40.0, epoch_time=14.0, machine=here)
    monkeypatch.setattr(study, 'machine', lambda: here)
    epochs, _, _, note = study.budget(a, 'eqtime', 'cmae')
    assert epochs == round(7 * 14.0 / 28.0) and 'both on slow CPU' in note
    unit(tmp_path, 'cmae-seed1', 'method', 'cmae', 1, 40.0, epoch_time=9.0, machine=other)  # a pair there too
    assert study.budget(a, 'eqtime', 'cmae')[0] == 4  # this machine's pair first
    monkeypatch.setattr(study, 'machine', lambda: {'cpu': 'third', 'boot_id': '3'})
    assert study.budget(a, 'eqtime', 'cmae')[0] == round(7 * 10.0 / 9.0)  # else one pair, not a mix


def test_transfer_unit_stopped_part_way_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A det unit stopped at a session's end (started.json and checkpoint.pth there, no summary) runs its command
    again without clearing its folder, so that main_detection resumes; the summary adds up the kept wall-clock and
    names each part's machine. Another command (another budget, say) starts afresh."""
    a = study.get_args([*CURVES, '--out_dir', str(tmp_path)])
    out = tmp_path / 'det' / 'random-seed0-it256'
    cleared = []

    def run(cmd, log, stop_after=None):
        cleared.append(not (out / 'log.txt').exists())
        with open(out / 'log.txt', 'a') as f:
            for e in range(2):
                f.write(json.dumps({'epoch': e, 'train_loss': 1.0}) + '\n')
        if stop_after:  # killed: epoch 1's checkpoint is the last one written
            (out / 'checkpoint.pth').write_bytes(b'epoch 1')
            os.utime(out / 'checkpoint.pth', (time.time() + 30, time.time() + 30))
            raise KeyboardInterrupt
        with open(out / 'log.txt', 'a') as f:
            f.write(json.dumps({'epoch': 2, 'test_bbox_AP': 7.0, 'test_bbox_AP50': 20.0,
                                'test_bbox_stats': [7.0] * 12}) + '\n')
        return 100.0
    monkeypatch.setattr(study, 'run', lambda cmd, log: run(cmd, log, stop_after=True))
    with pytest.raises(KeyboardInterrupt):
        study.transfer(a, 'det', 256, 'random', 0)
    started = json.load(open(out / 'started.json'))
    assert len(started['parts']) == 1 and not (out / 'summary.json').exists()
    monkeypatch.setattr(study, 'run', run)
    monkeypatch.setattr(study, 'machine', lambda: {'cpu': 'another CPU', 'boot_id': '2'})
    s = study.transfer(a, 'det', 256, 'random', 0)
    assert cleared == [True, False]  # the second part found the first one's files
    assert s['box_ap'] == 7.0 and 130.0 <= s['wall_s'] <= 140.0  # 30 s kept (to the checkpoint) + 100 s
    assert [p['from_epoch'] for p in s['resumed']] == [0, 2] and s['resumed'][1]['machine']['cpu'] == 'another CPU'
    s2 = study.transfer(a, 'det', 256, 'random', 0)  # a finished unit run again (--force): afresh
    assert cleared[-1] is True and 'resumed' not in s2


def test_detection_section_keeps_the_longest_budget_both_have_run(tmp_path):
    """Random init alone has run at the claims' budget (1280): the table at 640, where it and `mae-long` have both
    run, stays in the section, named as such, with its comparison."""
    out = tmp_path / 'runs'
    det_unit(out, 'random', 0, 1.0, 256)
    for seed, v in enumerate((2.0, 3.0)):
        det_unit(out, 'random', seed, v, 640)
    det_unit(out, 'mae-long', 0, 9.0, 640)
    det_unit(out, 'random', 0, 20.0, 1280)  # still gains beyond the noise: 1280 is used, not converged
    text = det_report(tmp_path, out)
    both = text.index('### 640 iterations (longest budget where random init and a pretrained cell have both run)')
    claims = text.index("### 1280 iterations (the claims' budget: random init NOT converged, longest budget of "
                        "the curve)")
    assert both < text.index('- mae-long (1 seed): 9.00 AP^box, vs random init +6.50', both) < claims
    assert '- No random init or MAE run at this budget to compare with yet.' in text[claims:]


def test_detection_section_keeps_the_longest_budget_both_have_two_seeds(tmp_path):
    """Both have two seeds at 640 but one each at 1280 (the longest budget both have run): the 640 table, whose
    comparison is read against the noise of two seeds each, keeps its own section, named as such."""
    out = tmp_path / 'runs'
    det_unit(out, 'random', 0, 1.0, 256)
    for seed, (r, m) in enumerate(((2.0, 9.0), (3.0, 10.0))):
        det_unit(out, 'random', seed, r, 640)
        det_unit(out, 'mae-long', seed, m, 640)
    det_unit(out, 'random', 0, 20.0, 1280)
    det_unit(out, 'mae-long', 0, 21.0, 1280)
    text = det_report(tmp_path, out)
    seeded = text.index('### 640 iterations (longest budget where random init and a pretrained cell both have two '
                        'seeds or more)')
    both = text.index('### 1280 iterations (')
    assert seeded < text.index('- mae-long (2 seeds): 9.50 AP^box, vs random init +7.00', seeded) < both
    assert "the claims' budget" in text[both:text.index('\n', both)]  # both have run at 1280: the claims' table
