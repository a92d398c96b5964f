"""SLURM launching through submitit, shared by submitit_pretrain.py, submitit_finetune.py, submitit_linprobe.py,
submitit_segmentation.py and submitit_detection.py: the script's own flags plus the cluster ones below.

    python submitit_pretrain.py --job_dir /path/to/jobs/%j --nodes 8 --ngpus 8 --model mae_vit_base_patch16 \
        --norm_pix_loss --batch_size 64 --blr 1.5e-4 --epochs 800 --warmup_epochs 40 --data_path /imagenet
    python submitit_pretrain.py --cluster local --job_dir jobs/%j --nodes 1 --ngpus 2 ...   # this machine

Each task gets its ranks from submitit's job environment (CUDA_VISIBLE_DEVICES is left to SLURM). On timeout
or preemption (SIGUSR2) submitit calls Trainer.checkpoint() on global rank 0 and requeues the job, which then
resumes from output_dir/checkpoint.pth (the last complete epoch, or where a SIGTERM stopped the run)."""
import copy
import importlib
import os
import re
import shutil
import signal
import sys
import threading

import util.misc as misc

ROOT = os.path.dirname(os.path.abspath(__file__))


def add_cluster_args(parser):
    g = parser.add_argument_group('cluster (submitit)')
    g.add_argument('--job_dir', default=None,
                   help='required: submitit logs and pickles, and output_dir unless --output_dir is given; '
                        '%%j becomes the job id (kept across requeues)')
    g.add_argument('--cluster', default='auto', choices=['auto', 'slurm', 'local'],
                   help='auto: SLURM where srun is found, else local (submitit LocalExecutor: this machine)')
    g.add_argument('--ngpus', default=8, type=int, help='GPUs, and so tasks (processes), per node')
    g.add_argument('--nodes', default=2, type=int, help='nodes to request')
    g.add_argument('--timeout', default=4320, type=int, help='minutes per job; at the end it requeues itself')
    g.add_argument('--partition', default=None, help='SLURM partition (default: the cluster\'s)')
    g.add_argument('--constraint', default=None, help='SLURM --constraint, e.g. volta32gb')
    g.add_argument('--comment', default=None, help='SLURM --comment')
    g.add_argument('--account', default=None, help='SLURM --account')
    g.add_argument('--qos', default=None, help='SLURM --qos')
    g.add_argument('--mem_gb', default=None, type=int, help='memory per node (default 40 * ngpus; 0: not asked)')
    g.add_argument('--cpus_per_task', default=10, type=int)
    parser.set_defaults(output_dir=None)  # None: job_dir
    return parser


class Trainer:
    """What each task runs. Pickled by submitit; holds the module name (imported in the task) and the parsed
    flags, which main() never sees directly (it fills in device, lr, ... and checkpoint() needs the originals)."""

    def __init__(self, module, args):
        self.module, self.args = module, args

    def __call__(self):
        import submitit
        env = submitit.JobEnvironment()
        a = self.args
        for k in ('output_dir', 'log_dir'):  # %j: the job id, the same in a requeued job
            if getattr(a, k, None):
                setattr(a, k, getattr(a, k).replace('%j', str(env.job_id)))
        mine = os.path.join(a.output_dir, 'checkpoint.pth')
        if os.path.isfile(mine) and not getattr(a, 'eval', False):
            a.resume = mine  # the job's own progress wins over a --resume given at submission
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        resuming = f', resuming from {a.resume}' if a.resume else ''
        print(f'{env}, pid {os.getpid()}; output_dir {a.output_dir}{resuming}', flush=True)
        if env.global_rank:
            _leave_after_signal()
        try:
            importlib.import_module(self.module).main(copy.deepcopy(a))
        finally:
            if misc.is_dist_avail_and_initialized():
                import torch.distributed
                torch.distributed.destroy_process_group()

    def checkpoint(self):
        """Called by submitit on global rank 0 at timeout or preemption: the same flags, output_dir fixed, so the
        requeued job finds output_dir/checkpoint.pth (__call__ points --resume at it)."""
        import submitit
        print(f'requeuing; the job will resume from {os.path.join(self.args.output_dir, "checkpoint.pth")}', flush=True)
        return submitit.helpers.DelayedSubmission(Trainer(self.module, self.args))


def _leave_after_signal(grace_s=60):
    """Ranks > 0 ignore the requeue signal (submitit: only rank 0 requeues) and stop when a collective finds
    rank 0 gone; one blocked in an NCCL collective would wait for NCCL's timeout, so it leaves after grace_s."""
    import submitit
    sig = getattr(signal, 'SIG' + submitit.JobEnvironment.USR_SIG)
    previous = signal.getsignal(sig)

    def handler(signum, frame):
        if callable(previous):
            previous(signum, frame)
        timer = threading.Timer(grace_s, os._exit, args=(1,))
        timer.daemon = True  # a process that ends sooner is not held up
        timer.start()
    signal.signal(sig, handler)


def resolve_cluster(args):
    """-> 'slurm' or 'local', or a UserError for what cannot run."""
    if not args.job_dir:
        raise misc.UserError('--job_dir is required (submitit logs and, by default, output_dir; %j becomes the job id)')
    if args.nodes < 1 or args.ngpus < 1:
        raise misc.UserError(f'--nodes and --ngpus must be >= 1, got --nodes {args.nodes} --ngpus {args.ngpus}')
    has_slurm = shutil.which('srun') is not None
    cluster = args.cluster if args.cluster != 'auto' else ('slurm' if has_slurm else 'local')
    if cluster == 'slurm' and not has_slurm:
        raise misc.UserError('--cluster slurm: no SLURM here (srun not found); --cluster local runs on this machine')
    if cluster == 'local' and args.nodes > 1:
        raise misc.UserError(f'--nodes {args.nodes}: --cluster local runs on this machine only; use --nodes 1 '
                             '(several nodes: SLURM, or torchrun --nnodes on each)')
    return cluster


def submit(module, job_name, args):
    cluster = resolve_cluster(args)
    import submitit
    import torch
    args.job_dir = os.path.abspath(args.job_dir)
    args.output_dir = os.path.abspath(args.output_dir or args.job_dir)
    if args.log_dir:
        args.log_dir = os.path.abspath(args.log_dir)
    os.environ['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p])  # unpickling
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster=cluster, slurm_max_num_timeout=30)
    local_gpus = args.ngpus if torch.cuda.is_available() else 0  # CPU: tasks without GPUs
    mem = 40 * args.ngpus if args.mem_gb is None else args.mem_gb
    params = dict(name=job_name, nodes=args.nodes, tasks_per_node=args.ngpus, cpus_per_task=args.cpus_per_task,
                  gpus_per_node=args.ngpus if cluster == 'slurm' else local_gpus, timeout_min=args.timeout,
                  slurm_signal_delay_s=120, **({'mem_gb': mem} if mem else {}))
    for flag in ('partition', 'constraint', 'comment', 'account', 'qos'):
        if getattr(args, flag):
            params[f'slurm_{flag}'] = getattr(args, flag)
    executor.update_parameters(**params)
    job = executor.submit(Trainer(module, args))
    jid = str(job.job_id)
    print(f'submitted job {jid} ({cluster}, {args.nodes} x {args.ngpus} tasks): logs in '
          f'{args.job_dir.replace("%j", jid)}, output_dir {args.output_dir.replace("%j", jid)}', flush=True)
    if cluster == 'local':  # a workstation run: wait, and end the job with this process
        wait_local(job)


def wait_local(job):
    import submitit
    try:
        job.results()
    except KeyboardInterrupt:
        job.cancel()
        raise
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        trace = str(e).rsplit('\n-----', 1)[0]  # the task's traceback, then submitit's list of log paths
        last = [line.strip() for line in trace.splitlines() if line.strip()][-1:] or ['']
        reason = re.sub(r'^[\w.]+Error: ', '', last[0])  # without 'util.misc.UserError: '
        print(f'error: job {job.job_id} failed: {reason} (logs: {job.paths.folder})',
              file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        literal = str(job.paths.folder).replace(str(job.job_id), '%j')  # the controller makes it, unused
        if '%j' in literal and os.path.isdir(literal) and not os.listdir(literal):
            os.rmdir(literal)
    print(f'job {job.job_id} finished', flush=True)


def launch(module, job_name, argv=None):
    """The submitit_*.py entry point: `module`'s flags plus the cluster ones; bad input -> one line, exit 2."""
    parser = add_cluster_args(importlib.import_module(module).get_args_parser())
    args = parser.parse_args(argv)
    misc.run_main(lambda a: submit(module, job_name, a), args)
