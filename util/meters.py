"""Training metrics: scalars kept on their device and read every --print_freq steps (DeviceMeters, StepReader),
and the printed progress of an epoch (SmoothedValue, MetricLogger, as in facebookresearch/mae's util/misc)."""
import datetime
import math
import statistics
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from util.misc import NonFiniteLoss, get_world_size


class DeviceMeters:
    """Scalar metrics that stay on their device until read, so a training step never waits for the GPU.

    update() only queues detached tensors (or plain numbers); read() brings everything queued since the last
    read to the host in one device-to-host copy -- with reduce=True first averaged over the processes in one
    all-reduce -- and adds it to running totals:

        m = DeviceMeters()
        for step, (x, y) in enumerate(loader):
            ...
            m.update(loss=loss, acc1=acc1, n=x.shape[0])  # no host-device synchronisation
            if step % print_freq == 0:
                window = m.read()       # {'loss': [value of each update since the last read], ...}
        m.read()
        m.averages()                    # {'loss': n-weighted mean of everything read}, host only

    Values must be scalars (0-d or one element); `n` is the weight, not a name. With reduce=True every process
    must call read() at the same point with the same names and numbers of updates (a collective)."""

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
