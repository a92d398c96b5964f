"""The study's RESULTS.md writer on synthetic unit summaries: means, standard deviations, pooled noise and the
verdicts are computed from the numbers (the study itself is not run by the tests)."""
import json
import os
import statistics
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import study  # noqa: E402
import study_plan  # noqa: E402
import study_report  # noqa: E402

KNN = {'mae': [40.0, 41.0, 42.0], 'colormae_green': [40.5, 41.5, 42.5], 'crossmae_kept025': [41.0, 42.0, 43.0],
       'cmae': [45.0, 46.0, 47.0]}  # each std 1.0: pooled std 1.0


def unit(out, name, kind, method, seed, knn20, epochs=7, epoch_time=10.0, **more):
    log = [{'epoch': e, 'train_loss': 1.0 - 0.05 * e, 'epoch_time_s': epoch_time} for e in range(epochs)]
    s = {'unit': name, 'kind': kind, 'method': method, 'seed': seed, 'epochs': epochs, 'commands': [['x.py']],
         'pretrain_wall_s': epochs * epoch_time + 5, 'log': log, 'train_time_s': epochs * epoch_time,
         'knn_curve': [{'epoch': epochs, 'time_s': epochs * epoch_time, 'knn20': knn20, 'knn200': knn20 - 2,
                        'probe': knn20 + 10}], 'knn20': knn20, 'knn200': knn20 - 2, 'probe': knn20 + 10, **more}
    os.makedirs(out / name)
    (out / name / 'summary.json').write_text(json.dumps(s))


def seg_unit(out, cell, seed, miou):
    d = out / 'seg' / f'{cell}-seed{seed}'
    os.makedirs(d)
    (d / 'summary.json').write_text(json.dumps({'cell': cell, 'seed': seed, 'miou': miou, 'aacc': 70.0,
                                                'iou': [miou * 2, miou, 0.0], 'wall_s': 100.0, 'command': ['s.py']}))


@pytest.fixture
def results(tmp_path, request):
    out = tmp_path / 'runs'
    seg = getattr(request, 'param', {})  # cell -> mIoU per fine-tuning seed
    for cell, values in seg.items():
        for seed, v in enumerate(values):
            seg_unit(out, cell, seed, v)
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
    a = study.get_args(['--out_dir', str(out), '--results', str(tmp_path / 'RESULTS.md'),
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
    assert 'pooled std of the mIoU over seeds 0.71' in results
    assert '- mae: 24.50 mIoU, vs random init +2.00 (+2.8 pooled std, outside the noise).' in results
    cross = next(line for line in results.splitlines() if line.startswith('- **crossmae_kept025**'))
    assert 'CamVid mIoU -3.00 (-4.2 pooled std, outside the noise; std of fine-tuning seeds)' in cross
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


def test_plan_units_parse():
    a = study.get_args([])
    units = study_plan.plan(a)
    assert units[:4] == study_plan.SEEDED and 'mae-long' in units and 'seg:random-seed1' in units
    assert {study_plan.parse_unit(u)[0] for u in units} == {'method', 'floor', 'scratch', 'eqtime', 'seg', 'long'}
    with pytest.raises(ValueError):
        study_plan.parse_unit('mae-seedX')


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
