"""Cluster launching on loopback: two torchrun agents as two nodes, submitit's LocalExecutor with a requeue
(SIGUSR2, as SLURM sends at timeout or preemption), and a torchrun elastic restart after a SIGKILLed worker.

The runs (the reference, the two-node pair, the submitit job, the elastic run) start together in one fixture
(each process spends a few seconds of CPU, mostly on imports) and train the same pico MAE on the same images
with the same seed, so each must end with the weights of the reference, torchrun --standalone
--nproc_per_node=2. The signals come from watcher threads once the first checkpoint
exists, leaving three of the four epochs to resume."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import submitit_launch
from conftest import PICO, ROOT, read_log

EPOCHS = 4
TRAIN = [*PICO, '--device', 'cpu', '--batch_size', 16, '--max_steps_per_epoch', 5, '--epochs', EPOCHS,
         '--lr', 1e-3, '--warmup_epochs', 1, '--vis_freq', 0]
TIMEOUT = 240  # seconds for any one run (30-50 s each here, all together on 2 shared cores)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
# torch >= 2.5 shares torchrun's rendezvous store with the workers and keeps it across restarts, so a restarted
# rank can read its peer's address from the failed attempt ("Gloo connectFullMesh failed ... Connection refused",
# pytorch#135712); a store of each attempt's own avoids that (README "Clusters")
FRESH_STORE = {'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run']


def copy_images(src, dst, per_class=16):
    """A node's own copy of the first images of each class (160 images: 5 steps of 2 x 16 per epoch)."""
    for c in sorted(os.listdir(src)):
        (dst / 'train' / c).mkdir(parents=True)
        for f in sorted(os.listdir(src / c))[:per_class]:
            shutil.copy(src / c / f, dst / 'train' / c / f)
    return dst


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def children():
    """{pid: [child pids]} from /proc."""
    kids = {}
    for d in filter(str.isdigit, os.listdir('/proc')):
        try:
            ppid = int(Path(f'/proc/{d}/stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid):
    kids, out, todo = children(), [], [pid]
    while todo:
        found = kids.get(todo.pop(), [])
        out += found
        todo += found
    return out


def proc_text(pid, what):
    try:
        return Path(f'/proc/{pid}/{what}').read_bytes().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


def proc_env(pid):
    try:
        return Path(f'/proc/{pid}/environ').read_bytes().decode(errors='replace').split('\0')
    except OSError:
        return []


class Run:
    """A process (its own session) with its output in a file; end() kills it and everything it started
    (torchrun's workers run in sessions of their own)."""

    def __init__(self, cmd, log, env=None):
        self.log = log
        with open(log, 'w') as f:
            self.p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env={**ENV, **(env or {})}, stdout=f,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self):
        try:
            rc = self.p.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = 'timed out'
        assert rc == 0, f'{self.p.args[:6]}... exited with {rc}:\n{self.text()[-4000:]}'
        return self.text()

    def text(self):
        return Path(self.log).read_text(errors='replace')

    def end(self):
        for pid in descendants(self.p.pid) + [self.p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:  # and whatever is left in its session (a task whose parent died)
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.p.wait()


def when_checkpointed(pattern, root, act, done):
    """Thread: once root/pattern (a checkpoint.pth, written atomically) exists, act(); its result goes to done."""
    def watch():
        end = time.time() + TIMEOUT
        while time.time() < end and not list(root.glob(pattern)):
            time.sleep(0.02)
        done.append(act() if list(root.glob(pattern)) else 'no checkpoint appeared')
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.fixture(scope='module')
def runs(data_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('cluster')
    src = Path(data_path) / 'train'
    data = [copy_images(src, tmp / 'data_node0'), copy_images(src, tmp / 'data_node1')]
    started, events = {}, {'preempted': [], 'killed': []}
    standalone = [*TORCHRUN, '--standalone', '--nproc_per_node=2']
    try:  # the two runs that start twice first: they take longest
        started['submitit'] = Run([sys.executable, 'submitit_pretrain.py', '--cluster', 'local', '--nodes', 1,
                                   '--ngpus', 2, '--timeout', 30, '--job_dir', tmp / 'sub' / 'job_%j', *TRAIN,
                                   '--data_path', data[0]], tmp / 'submitit.log')
        started['elastic'] = Run([*standalone, '--max_restarts=1', 'main_pretrain.py', *TRAIN, '--data_path', data[0],
                                  '--output_dir', tmp / 'elastic'], tmp / 'elastic.log', env=FRESH_STORE)
        started['ref'] = Run([*standalone, 'main_pretrain.py', *TRAIN, '--data_path', data[0],
                              '--output_dir', tmp / 'ref'], tmp / 'ref.log')
        rdzv = ['--nnodes=2', '--nproc_per_node=1', '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{free_port()}',
                '--rdzv_id=test_cluster', '--local_addr=127.0.0.1']
        for node in (0, 1):  # c10d rendezvous: which agent becomes node 0 is up to it
            started[f'node{node}'] = Run([*TORCHRUN, *rdzv, 'main_pretrain.py', *TRAIN, '--data_path', data[node],
                                          '--output_dir', tmp / f'out_node{node}'], tmp / f'node{node}.log')

        def preempt():  # SIGUSR2 to the job's tasks, as SLURM before a timeout (not to the local controller)
            tasks = [p for p in descendants(started['submitit'].p.pid)
                     if 'submitit.core._submit' in proc_text(p, 'cmdline')]
            for p in tasks:
                os.kill(p, signal.SIGUSR2)
            return len(tasks)

        def kill_rank1():
            workers = [p for p in descendants(started['elastic'].p.pid)
                       if 'main_pretrain.py' in proc_text(p, 'cmdline') and 'RANK=1' in proc_env(p)]
            for p in workers:
                os.kill(p, signal.SIGKILL)
            return len(workers)

        when_checkpointed('job_*/checkpoint.pth', tmp / 'sub', preempt, events['preempted'])
        when_checkpointed('checkpoint.pth', tmp / 'elastic', kill_rank1, events['killed'])
        yield tmp, started, events
    finally:
        for r in started.values():
            r.end()


def model_of(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_weights(path, ref_path):
    a, b = model_of(path), model_of(ref_path)
    assert a['epoch'] == b['epoch'] == EPOCHS - 1 and len(a['rank_states']) == 2
    for k in b['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k  # same reductions in the same order: bit-identical


@pytest.fixture(scope='module')
def reference(runs):
    tmp, started, _ = runs
    started['ref'].wait()
    return tmp / 'ref' / 'checkpoint.pth'


def test_two_torchrun_nodes_match_standalone(runs, reference):
    """Two --nnodes=2 agents (each its own data copy and --output_dir) end with the weights of --standalone;
    only global rank 0 writes: one of the two output folders holds everything, the other was never made."""
    tmp, started, _ = runs
    text = started['node0'].wait() + started['node1'].wait()
    assert 'distributed init (rank 0 of 2' in text and 'distributed init (rank 1 of 2' in text
    written = [d for d in (tmp / 'out_node0', tmp / 'out_node1') if d.exists()]
    assert len(written) == 1, written
    out = written[0]
    assert [r['epoch'] for r in read_log(out / 'log.txt')] == list(range(EPOCHS))  # one line per epoch
    assert len(list(out.glob('events.out.tfevents.*'))) == 1
    assert_same_weights(out / 'checkpoint.pth', reference)


def test_submitit_local_requeue_resumes(runs, reference):
    """--cluster local --ngpus 2: one job of two ranks; SIGUSR2 to its tasks mid-run requeues it (exit 144 on
    rank 0, the local controller starts the tasks again) and the requeued job resumes from checkpoint.pth."""
    tmp, started, events = runs
    started['submitit'].wait()
    assert events['preempted'] == [2], events
    (job,) = [d for d in (tmp / 'sub').glob('job_*') if (d / 'checkpoint.pth').exists()]
    logs = [(job / f'{job.name[4:]}_{t}_log.out').read_text() for t in (0, 1)]
    assert 'distributed init (rank 0 of 2' in logs[0] and 'distributed init (rank 1 of 2' in logs[1]
    assert logs[0].count('Starting with JobEnvironment') == 2  # the job ran twice: requeued
    assert 'requeuing' in logs[0] and f'resuming from {job / "checkpoint.pth"}' in logs[0]
    resumed = [line for line in logs[0].splitlines() if 'resumed from' in line]
    assert len(resumed) == 1 and f'{job / "checkpoint.pth"}: epoch ' in resumed[0]
    assert_same_weights(job / 'checkpoint.pth', reference)


def test_elastic_restart_after_sigkill_resumes(runs, reference):
    """torchrun --max_restarts 1: a SIGKILLed worker brings the group back, which resumes and finishes."""
    tmp, started, events = runs
    text = started['elastic'].wait()
    assert events['killed'] == [1], events
    assert 'resumed from' in text and 'checkpoint.pth: epoch ' in text
    assert_same_weights(tmp / 'elastic' / 'checkpoint.pth', reference)


@pytest.mark.parametrize('script', ['main_pretrain', 'main_finetune', 'main_linprobe', 'main_segmentation',
                                    'main_detection'])
def test_bad_cluster_input_gets_one_line(script, tmp_path, capsys):
    """Every launcher takes its script's flags; --nodes 2 with --cluster local and a missing --job_dir are one
    line on stderr and exit status 2, before anything is created."""
    cases = {'--cluster local runs on this machine only': ['--job_dir', tmp_path / 'j_%j', '--nodes', 2,
                                                           '--cluster', 'local'],
             '--job_dir is required': ['--nodes', 1, '--cluster', 'local']}
    if shutil.which('srun') is None:
        cases['--cluster slurm: no SLURM here'] = ['--job_dir', tmp_path / 'j_%j', '--nodes', 1, '--cluster', 'slurm']
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as e:
            submitit_launch.launch(script, 'test', [str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
    assert os.listdir(tmp_path) == []


def test_trainer_environment_and_requeue(tmp_path, monkeypatch):
    """In a task: ranks from submitit's job environment (CUDA_VISIBLE_DEVICES left alone), %j -> the job id, the
    job's own checkpoint.pth preferred over a --resume given at submission; main() gets a copy of the flags,
    so checkpoint() (on rank 0 at timeout/preemption) requeues the flags as submitted, with the same output_dir."""
    import argparse
    import types
    env = {'SUBMITIT_EXECUTOR': 'local', 'SUBMITIT_LOCAL_JOB_ID': '4242', 'SUBMITIT_LOCAL_NTASKS': '2',
           'SUBMITIT_LOCAL_GLOBALID': '0', 'SUBMITIT_LOCAL_LOCALID': '0', 'SUBMITIT_LOCAL_NODEID': '0',
           'SUBMITIT_LOCAL_JOB_NUM_NODES': '1', 'CUDA_VISIBLE_DEVICES': '3,5', 'MASTER_PORT': '29999'}
    for k in ('MASTER_ADDR', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE'):
        monkeypatch.setenv(k, 'stale')  # restored afterwards; export must overwrite them
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / 'job_4242').mkdir()
    (tmp_path / 'job_4242' / 'checkpoint.pth').write_bytes(b'')
    seen = []

    def main(args):
        seen.append((vars(args).copy(), {k: os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK',
                                                                     'CUDA_VISIBLE_DEVICES', 'MASTER_PORT')}))
        args.device = 'changed by main'
    monkeypatch.setitem(sys.modules, 'fake_main', types.SimpleNamespace(main=main))
    args = argparse.Namespace(output_dir=str(tmp_path / 'job_%j'), log_dir=None, resume='/elsewhere.pth',
                              device='auto', eval=False)
    trainer = submitit_launch.Trainer('fake_main', args)
    trainer()
    flags, environ = seen[0]
    assert flags['output_dir'] == str(tmp_path / 'job_4242')
    assert flags['resume'] == str(tmp_path / 'job_4242' / 'checkpoint.pth')
    assert environ == {'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': '0', 'CUDA_VISIBLE_DEVICES': '3,5',
                       'MASTER_PORT': '29999'}
    again = trainer.checkpoint().function
    assert again.module == 'fake_main' and again.args.device == 'auto'
    assert again.args.output_dir == str(tmp_path / 'job_4242')
