"""Process setup (torchrun, SLURM or one process), rank-0 printing, metric logging and small helpers."""
import builtins
import datetime
import math
import os
import re
import statistics
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback (unless --debug)."""


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


_builtin_print = builtins.print


def setup_for_distributed(is_master):
    """Silence print() on all but rank 0 (force=True prints anyway)."""
    builtin_print = _builtin_print

    def print(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            now = datetime.datetime.now().time()
            builtin_print(f'[{now}]', *args, **kwargs)
    builtins.print = print


def init_distributed_mode(args):
    """Reads RANK/WORLD_SIZE/LOCAL_RANK (torchrun) or SLURM_PROCID; falls back to one process, no group.
    Sets args.rank, args.world_size, args.gpu, args.distributed and args.device (a torch.device)."""
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError('--device cuda was asked for but no CUDA device is available')
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank, args.world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    elif 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', 1)) > 1:
        args.rank, args.world_size = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        args.device = torch.device(args.device)
        setup_for_distributed(True)
        return
    args.distributed = True
    if args.device.startswith('cuda'):
        torch.cuda.set_device(args.gpu)
        args.device, backend = torch.device('cuda', args.gpu), 'nccl'
    else:
        args.device, backend = torch.device('cpu'), 'gloo'
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank)
    setup_for_distributed(args.rank == 0)
    print(f'| distributed init (rank {args.rank} of {args.world_size}, {backend})', force=True)


def autocast(args):
    """torch.autocast for --amp {none,bf16,fp16} on args.device."""
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    return torch.autocast(device_type=args.device.type, dtype=dtype, enabled=dtype is not None)


def resolve_amp(args):
    """--amp auto -> bf16 on CUDA, none (fp32) on CPU; on CUDA also applies the usual math settings (cuda_setup)."""
    if args.amp == 'auto':
        args.amp = 'bf16' if args.device.type == 'cuda' else 'none'
    cuda_setup(args.device)


def cuda_setup(device):
    """The field's standard CUDA settings (timm, MAE): TF32 tensor cores for fp32 matmuls (cuDNN convolutions
    already default to TF32) and cuDNN autotuning for the fixed input shapes. No-op off CUDA.
    set_float32_matmul_precision('high') is the one switch that stays valid across torch 2.x (torch >= 2.9
    refuses a mix of the legacy allow_tf32 flags and the new fp32_precision ones)."""
    if torch.device(device).type != 'cuda':
        return
    torch.set_float32_matmul_precision('high')
    torch.backends.cudnn.benchmark = True


def adamw(params, device, **kwargs):
    """torch.optim.AdamW, fused (one kernel per step for all parameters, and GradScaler steps without a host
    read of found_inf) when every parameter is a floating tensor on CUDA; the foreach default elsewhere."""
    groups = list(params)
    tensors = [p for g in groups for p in (g['params'] if isinstance(g, dict) else [g])]
    fused = torch.device(device).type == 'cuda' and all(p.is_cuda and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict with this run's implementation flags (fused, foreach, capturable) in place of
    the saved ones. A checkpoint from another device or a non-fused run must not switch the fused kernel off
    (GradScaler would then hand fused-only arguments to the foreach step), nor leave the step counters on the
    host: torch places each `state['step']` by the *saved* groups' flags -- on the parameter's device only for
    fused or capturable groups -- and CUDA's fused AdamW refuses CPU step tensors."""
    flags = [{k: g[k] for k in ('fused', 'foreach', 'capturable') if k in g} for g in optimizer.param_groups]
    if len(state['param_groups']) == len(flags):  # else load_state_dict says what does not match
        state = {**state, 'param_groups': [{**g, **f} for g, f in zip(state['param_groups'], flags)]}
    optimizer.load_state_dict(state)


def ddp(model, args):
    """The model in DistributedDataParallel when distributed (device_ids on CUDA), else as it is. A model whose
    later encoder blocks feed nothing (`blocks_used` < its depth: CrossMAE's --use_fm, segmentation's
    --out_indices) leaves their parameters without gradients, which DDP must be told of."""
    if not getattr(args, 'distributed', False):
        return model
    unused = getattr(model, 'blocks_used', len(getattr(model, 'blocks', []))) < len(getattr(model, 'blocks', []))
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[args.gpu] if torch.device(args.device).type == 'cuda' else None,
        find_unused_parameters=unused)


def convert_sync_batchnorm(model, args):
    """BatchNorm -> SyncBatchNorm under DDP on CUDA (statistics over the global batch, as the official CMAE /
    MoCo v3 heads and mmseg's decoders have them); unchanged otherwise (gloo has no SyncBatchNorm kernel)."""
    if getattr(args, 'distributed', False) and torch.device(args.device).type == 'cuda':
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def all_reduce_mean(x):
    """Mean of a Python number over processes."""
    if get_world_size() == 1:
        return x
    t = torch.tensor(x, dtype=torch.float64, device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(t)
    return (t / get_world_size()).item()


class DeviceMeters:
    """Scalar metrics that stay on their device until read, so a training step never waits for the GPU.

    update() only queues detached tensors (or plain numbers); read() brings everything queued since the last
    read to the host in one device-to-host copy -- with reduce=True first averaged over the processes in one
    all-reduce -- and adds it to running totals:

        meters = misc.DeviceMeters()
        for step, (x, y) in enumerate(loader):
            ...
            meters.update(loss=loss, acc1=acc1, n=x.shape[0])  # no host-device synchronisation
            if step % print_freq == 0:
                window = meters.read()       # {'loss': [value of each update since the last read], ...}
        meters.read()
        meters.averages()                    # {'loss': n-weighted mean of everything read}, host only

    Values must be scalars (0-d or one element); `n` is the weight, not a name. With reduce=True every process must call read() at the same
    point with the same names and numbers of updates (a collective)."""

    def __init__(self):
        self._queue = {}  # name -> ([tensor or float per update], [n per update])
        self.total, self.count = defaultdict(float), defaultdict(float)

    def __len__(self):
        """Updates queued since the last read (the longest of the names)."""
        return max((len(v) for v, _ in self._queue.values()), default=0)

    def update(self, n=1, **values):
        for k, v in values.items():
            vals, ns = self._queue.setdefault(k, ([], []))
            vals.append(v.detach() if isinstance(v, torch.Tensor) else float(v))
            ns.append(n)

    def read(self, reduce=False):
        """-> {name: [float per update since the last read]}; one device-to-host copy, no copy when nothing is
        queued on a device (and nothing to reduce)."""
        return {k: vals for k, (vals, _) in self._read(reduce).items()}

    def _read(self, reduce):
        queue, self._queue = self._queue, {}
        names = sorted(queue)  # the same order on every process
        flat = [v for k in names for v in queue[k][0]]
        on_device = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        on_host = [i for i, v in enumerate(flat) if not isinstance(v, torch.Tensor)]
        if reduce and get_world_size() > 1 and flat:  # everything through one all-reduce
            device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' \
                else torch.device('cpu')
            parts = [_stack64([flat[i] for i in on_device], device)] if on_device else []
            if on_host:  # plain numbers (e.g. a stop flag) ride along: one asynchronous copy
                parts.append(torch.tensor([flat[i] for i in on_host], dtype=torch.float64).to(device, non_blocking=True))
            t = torch.cat(parts)
            dist.all_reduce(t)
            order, values = on_device + on_host, (t / get_world_size()).tolist()  # the one synchronisation
        elif on_device:
            order = on_device
            values = _stack64([flat[i] for i in on_device], flat[on_device[0]].device).tolist()  # the one sync
        else:
            order, values = [], []
        for i, v in zip(order, values):
            flat[i] = v
        out, i = {}, 0
        for k in names:
            vals, ns = queue[k]
            out[k] = (flat[i:i + len(vals)], ns)
            i += len(vals)
            for v, n in zip(*out[k]):
                self.total[k] += v * n
                self.count[k] += n
        return out

    def averages(self):
        """-> {name: n-weighted mean of every value read so far} (host numbers; queued values are not included)."""
        return {k: self.total[k] / max(self.count[k], 1e-12) for k in self.total}


def _stack64(tensors, device):
    return torch.stack([t.reshape(()).to(device, torch.float64) for t in tensors])


class NonFiniteLoss(RuntimeError):
    """A loss that is nan or inf: the run stops with exit status 1, leaving the last checkpoint as it was."""


class StepReader:
    """Per-step scalars kept on the device and read every print_freq steps: the one host-device synchronisation
    of a training engine's hot path. Each read
    - checks the losses: a non-finite one raises NonFiniteLoss naming the first bad step, before anything is saved;
    - writes the per-step TensorBoard scalars: one point per optimizer step read, with that step's own value
      (averaged over the processes) at that step's x, so the curves are the same as with a read per step;
    - returns whether some process asked to stop (the stop flag rides in the same all-reduce).

    record(step, lr, update, loss=..., **more) queues one step (tensors stay on the device); read() brings the
    queued steps to the host in one copy (one all-reduce under DDP), feeds `metric_logger`, checks the losses,
    writes TensorBoard and returns True when some process asked to stop. Every process must read at the same
    steps under DDP."""

    def __init__(self, args, epoch, steps_per_epoch, metric_logger, log_writer=None, stop_flag=None,
                 tag_prefix='train_'):
        self.meters, self.steps = DeviceMeters(), []  # steps: (step, lr, update) of the queued steps
        self.reduce = getattr(args, 'distributed', False)
        self.epoch, self.steps_per_epoch, self.metric_logger = epoch, steps_per_epoch, metric_logger
        self.log_writer, self.stop_flag, self.tag_prefix = log_writer, stop_flag, tag_prefix

    def record(self, step, lr, update, **values):
        self.meters.update(**values)
        self.steps.append((step, lr, update))

    def read(self):
        if self.stop_flag is not None:  # a host number: it rides in the same all-reduce
            self.meters.update(stop=float(self.stop_flag.set))
        window = self.meters.read(reduce=self.reduce)
        stop = window.pop('stop', [0.])[-1] > 0
        steps, self.steps = self.steps, []
        for (step, _, _), value in zip(steps, window.get('loss', [])):
            if not math.isfinite(value):
                raise NonFiniteLoss(f'loss is {value} at epoch {self.epoch}, step {step} (the first non-finite one of '
                                    f'steps {steps[0][0]}-{steps[-1][0]}); stopping (the last checkpoint is left as it was)')
        for j in range(len(steps)):
            self.metric_logger.update(**{k: vals[j] for k, vals in window.items()})
        if self.log_writer is not None:
            for j, (step, lr, update) in enumerate(steps):
                if not update:
                    continue
                x = int((step / self.steps_per_epoch + self.epoch) * 1000)  # epoch_1000x: comparable across batch sizes
                for k, vals in window.items():
                    self.log_writer.add_scalar(self.tag_prefix + k, vals[j], x)
                self.log_writer.add_scalar('lr', lr, x)
        return stop


class SmoothedValue:
    """Tracks a series of host numbers; reports the median/average over a window and the global average."""

    def __init__(self, window_size=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.deque, self.total, self.count, self.fmt = deque(maxlen=window_size), 0.0, 0, fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        if get_world_size() == 1:
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64,
                         device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
        dist.barrier()
        dist.all_reduce(t)
        count, self.total = t.tolist()
        self.count = int(count)

    @property
    def median(self):
        return statistics.median(self.deque) if self.deque else float('nan')

    @property
    def avg(self):
        return sum(self.deque) / len(self.deque) if self.deque else float('nan')

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def value(self):
        return self.deque[-1] if self.deque else float('nan')

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named SmoothedValues. update() takes host numbers, and tensors, which are queued on their device (a
    DeviceMeters) and read in one transfer by flush() -- called by printing and by synchronize_between_processes,
    i.e. every print_freq steps of log_every -- so updating with tensors does not synchronise per step."""

    def __init__(self, delimiter='  '):
        self.meters, self.delimiter = defaultdict(SmoothedValue), delimiter
        self.pending = DeviceMeters()

    def update(self, n=1, **kwargs):
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                self.pending.update(n=n, **{k: v})
            else:
                self.meters[k].update(float(v), n)

    def flush(self, reduce=False):
        """Reads the queued tensors (one copy; reduce=True: averaged over the processes, a collective) into the
        meters. -> {name: [value per update]} of what was read."""
        window = self.pending._read(reduce)
        for k, (vals, ns) in window.items():
            for v, n in zip(vals, ns):
                self.meters[k].update(v, n)
        return {k: vals for k, (vals, _) in window.items()}

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __str__(self):
        self.flush()
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        self.flush()
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq, header='', total=None):
        """Yields from iterable, printing progress, ETA and timings every print_freq steps."""
        total = len(iterable) if total is None else total
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        width = len(str(total))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                print(f'{header} [{i:>{width}}/{total}]  eta: {eta}  {self}  time: {iter_time}  data: {data_time}')
            end = time.time()
        took = time.time() - start
        print(f'{header} Total time: {datetime.timedelta(seconds=int(took))} ({took / max(total, 1):.4f} s / it)')


def add_dist_args(parser):
    """Flags every script shares: device, precision and distributed setup."""
    parser.add_argument('--device', default='auto', help='auto (cuda if available), cuda or cpu')
    parser.add_argument('--amp', default='auto', choices=['auto', 'none', 'bf16', 'fp16'],
                        help='autocast dtype; auto = bf16 on CUDA, none (fp32) on CPU')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--num_workers', default=4, type=int)
    parser.add_argument('--prefetch_factor', default=2, type=int,
                        help='batches each loader worker prepares ahead (with --num_workers > 0; workers persist across epochs)')
    parser.add_argument('--pin_mem', action='store_true', default=True)
    parser.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('--debug', action='store_true', help='show tracebacks for input errors')
    return parser


def run_main(main, args):
    """Runs main(args). Input errors become one line on stderr and exit status 2, a non-finite loss exit
    status 1; tracebacks only with --debug."""
    try:
        main(args)
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        _fail(args, e, 2)
    except NonFiniteLoss as e:
        _fail(args, e, 1)
    finally:
        if is_dist_avail_and_initialized():
            dist.destroy_process_group()


def _fail(args, e, code):
    import sys
    if getattr(args, 'debug', False):
        raise e
    msg = str(e).strip() or type(e).__name__
    if 'Original Traceback' in msg:  # raised in a DataLoader worker: its last line says what happened
        msg = re.sub(r'^[\w.]+: ', '', msg.splitlines()[-1])  # without the 'util.misc.UserError: ' of the traceback
    _builtin_print(f'error: {msg}', file=sys.stderr, flush=True)
    sys.exit(code)


class LossScaler:
    """backward + (optional fp16 loss scaling) + optional grad clipping + optimizer step."""
    state_dict_key = 'amp_scaler'

    def __init__(self, device_type='cpu', enabled=False):
        self._scaler = torch.amp.GradScaler(device_type, enabled=enabled)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, update_grad=True):
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        norm = None
        if clip_grad is not None and parameters is not None:
            self._scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        if state_dict:
            self._scaler.load_state_dict(state_dict)


class StopFlag:
    """Set by SIGTERM/SIGINT handlers; `should_stop()` agrees across processes (all-reduce of the flag)."""

    def __init__(self):
        self.set = False

    def install(self):
        import signal

        def handler(signum, frame):
            print(f'received signal {signum}: finishing the current step, then saving a checkpoint', force=True)
            self.set = True
        signal.signal(signal.SIGTERM, handler)
        return self

    def should_stop(self, device):
        if get_world_size() == 1:
            return self.set
        t = torch.tensor([float(self.set)], device=device)
        dist.all_reduce(t)
        return bool(t.item() > 0)
