"""One fine-tuning / linear-probing epoch, and evaluation (Acc@1, Acc@5, loss)."""
import itertools

import torch
from timm.utils import accuracy

import util.lr_sched as lr_sched
import util.misc as misc
from engine_pretrain import StepReader


def train_one_epoch(model, criterion, data_loader, optimizer, epoch, loss_scaler, args, mixup_fn=None,
                    log_writer=None):
    """One epoch; the loss stays on the device and is read every --print_freq steps and at the end of the epoch
    (engine_pretrain.StepReader: non-finite check, TensorBoard 'loss' and 'lr' per optimizer step)."""
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', misc.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    accum_iter, device = args.accum_iter, args.device
    total = min(len(data_loader), args.max_steps_per_epoch or len(data_loader))
    reader = StepReader(args, epoch, total, metric_logger, log_writer, tag_prefix='')
    optimizer.zero_grad()
    batches = itertools.islice(data_loader, total)
    for step, (samples, targets) in enumerate(metric_logger.log_every(batches, args.print_freq, f'Epoch: [{epoch}]', total)):
        if step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, step / total + epoch, args)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with misc.autocast(args):
            outputs = model(samples)
        loss = criterion(outputs.float(), targets)
        update = (step + 1) % accum_iter == 0
        loss_scaler(loss / accum_iter, optimizer, clip_grad=getattr(args, 'clip_grad', None),
                    parameters=[p for p in model.parameters() if p.requires_grad], update_grad=update)
        if update:
            optimizer.zero_grad()
        lr = max(g['lr'] for g in optimizer.param_groups)
        metric_logger.update(lr=lr)
        reader.record(step, lr, update, loss=loss.detach())
        if step % args.print_freq == 0 or step == total - 1:  # the read: the one host-device synchronisation
            reader.read()
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model, args):
    """Prints '* Acc@1 x Acc@5 y loss z' and returns the averages. The per-batch values stay on the device
    until log_every prints (every 10 batches) and the end."""
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = misc.MetricLogger(delimiter='  ')
    model.eval()
    for images, target in metric_logger.log_every(data_loader, 10, 'Test:'):
        images = images.to(args.device, non_blocking=True)
        target = target.to(args.device, non_blocking=True)
        with misc.autocast(args):
            output = model(images)
        output = output.float()
        loss = criterion(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        metric_logger.update(n=images.shape[0], loss=loss, acc1=acc1, acc5=acc5)  # queued on the device
    metric_logger.synchronize_between_processes()
    m = metric_logger.meters
    print(f"* Acc@1 {m['acc1'].global_avg:.3f} Acc@5 {m['acc5'].global_avg:.3f} loss {m['loss'].global_avg:.3f}")
    return {k: meter.global_avg for k, meter in m.items()}
