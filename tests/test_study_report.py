"""The study's RESULTS.md writer on synthetic unit summaries: means, standard deviations, pooled noise and the
verdicts are computed from the numbers (the study itself is not run by the tests). The transfer columns' budget
and reading: tests/test_study_transfer.py."""
import json
import os
import statistics

import pytest

from study_common import CURVES, seg_unit, unit  # first: it puts benchmarks/ on the path
import study  # noqa: E402
import study_plan  # noqa: E402
import study_report  # noqa: E402
import study_transfer  # noqa: E402

KNN = {'mae': [40.0, 41.0, 42.0], 'colormae_green': [40.5, 41.5, 42.5], 'crossmae_kept025': [41.0, 42.0, 43.0],
       'cmae': [45.0, 46.0, 47.0]}  # each std 1.0: pooled std 1.0


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
            'seg14400:random-seed0', 'seg28800:random-seed0'} <= set(units)  # the study's default curves
    assert units.index('seg1800:mae-seed0') < units.index('segc:random-seed0')  # the curve before its use
    assert units.index('det20480:mae-seed0') < units.index('detc:random-seed1')
    assert study_transfer.parse('det640:mae-long-seed2', study_plan.CELLS) == ('det', 640, 'mae-long', 2)
    assert study_transfer.parse('segc:random-seed0', study_plan.CELLS) == ('seg', 'c', 'random', 0)
    for bad in ('mae-seedX', 'seg:nope-seed0', 'segx:mae-seed0', 'det:mae-seed'):
        with pytest.raises(ValueError):
            study_plan.parse_unit(bad)
    assert study_plan.unit_dir(a, 'segc:mae-seed0') is None  # no curve yet: no budget, not done
    assert study_plan.unit_dir(a, 'seg:mae-seed1').endswith(os.path.join('seg', 'mae-seed1-it360'))








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






