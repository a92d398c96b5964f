"""Benchmarks stay runnable: bench_gpu.py's CPU smoke check (the GPU numbers need a GPU; BENCHMARKS.md)."""
import subprocess
import sys

from conftest import ROOT


def test_bench_gpu_cpu_smoke(data_path):
    out = subprocess.run([sys.executable, 'benchmarks/bench_gpu.py', '--device', 'cpu', '--steps', '2',
                          '--variants', 'mae,hf,cross25,cmae', '--data_path', data_path, '--loader_workers', '1'],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {line.split('|')[1].strip(): line for line in out.stdout.splitlines() if line.startswith('| ')}
    assert {'mae', 'hf', 'cross25', 'cmae'} <= rows.keys(), out.stdout
    assert 'loader (decode' in out.stdout and 'matmul rate' in out.stdout
