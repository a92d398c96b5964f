"""Benchmarks stay runnable: bench_gpu.py's CPU smoke check and gpu_check.sh's CPU dry run (the GPU numbers need a
GPU; BENCHMARKS.md)."""
import os
import subprocess
import sys

from conftest import ROOT

# one thread: these check code paths, and on shared cores a second OpenMP thread stalls every small op
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def test_bench_gpu_cpu_smoke(data_path):
    out = subprocess.run([sys.executable, 'benchmarks/bench_gpu.py', '--device', 'cpu', '--steps', '2',
                          '--variants', 'mae,hf,cross25,cmae', '--data_path', data_path, '--loader_workers', '1'],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {line.split('|')[1].strip(): line for line in out.stdout.splitlines() if line.startswith('| ')}
    assert {'mae', 'hf', 'cross25', 'cmae'} <= rows.keys(), out.stdout
    assert 'loader (decode' in out.stdout and 'matmul rate' in out.stdout


def tables(text):
    """{heading after '## ': [first cell of each row below the table's header]} of a bench_gpu.py report."""
    out = {}
    for section in text.split('\n## ')[1:]:
        head, *lines = section.splitlines()
        out[head] = [line.split('|')[1].strip() for line in lines if line.startswith('| ')][1:]
    return out


def test_bench_gpu_leaves_out_a_failing_variant():
    out = subprocess.run([sys.executable, 'benchmarks/bench_gpu.py', '--device', 'cpu', '--steps', '1', '--batch_size',
                          '2', '--matmul_n', '256', '--variants', 'mae,mae+compile', '--compile_backend', 'no_such',
                          '--no_loader'], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert '# pico, attention sdpa: mae+compile failed and is left out: InvalidBackend' in out.stdout, out.stdout
    assert list(tables(out.stdout).values()) == [['mae']], out.stdout


def test_gpu_check_cpu_dry_run(data_path, tmp_path):
    out = tmp_path / 'gpu_check'
    env = {**os.environ, 'OUT': str(out), 'MAE_TEST_DATA': data_path}
    run = subprocess.run(['bash', 'benchmarks/gpu_check.sh', '--device', 'cpu'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = (out / 'summary.txt').read_text()
    steps = ['env', 'test_cuda', 'bench_pico_eager', 'bench_pico_compile_sdpa', 'bench_small_eager', 'gpu_state_after']
    for name in steps:
        assert f'\n{name}: rc 0, ' in summary, summary
        assert (out / f'{name}.txt').stat().st_size > 0, name
    assert 'torch 2.' in (out / 'env.txt').read_text()
    assert 'skipped' in (out / 'test_cuda.txt').read_text()  # every CUDA test skips on the CPU
    eager = (out / 'bench_pico_eager.txt').read_text()
    rows = tables(eager)
    assert [h.rsplit(': ', 1)[1] for h in rows if h.startswith('pico')] == ['sdpa', 'flash'], rows
    assert all(r == ['mae', 'hf', 'cross25', 'cmae'] for h, r in rows.items() if h.startswith('pico')), rows
    assert 'loader (decode' in eager and 'matmul rate' in eager
    assert list(tables((out / 'bench_pico_compile_sdpa.txt').read_text()).values()) == [
        ['mae', 'mae+compile', 'hf+compile']]
    small = tables((out / 'bench_small_eager.txt').read_text())
    assert list(small.values()) == [['mae', 'hf', 'cross25', 'cmae']], small
