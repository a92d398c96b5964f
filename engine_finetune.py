"""One fine-tuning / linear-probing epoch, and evaluation (Acc@1, Acc@5, loss)."""
import itertools
import math

import torch
from timm.utils import accuracy

import util.lr_sched as lr_sched
import util.misc as misc
from engine_pretrain import NonFiniteLoss


def train_one_epoch(model, criterion, data_loader, optimizer, epoch, loss_scaler, args, mixup_fn=None,
                    log_writer=None):
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', misc.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    accum_iter, device = args.accum_iter, args.device
    total = min(len(data_loader), args.max_steps_per_epoch or len(data_loader))
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
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f'loss is {loss_value} at epoch {epoch}, step {step}; stopping')
        update = (step + 1) % accum_iter == 0
        loss_scaler(loss / accum_iter, optimizer, clip_grad=getattr(args, 'clip_grad', None),
                    parameters=[p for p in model.parameters() if p.requires_grad], update_grad=update)
        if update:
            optimizer.zero_grad()
        lr = max(g['lr'] for g in optimizer.param_groups)
        metric_logger.update(loss=loss_value, lr=lr)
        if update:
            loss_reduced = misc.all_reduce_mean(loss_value)
            if log_writer is not None:
                epoch_1000x = int((step / total + epoch) * 1000)
                log_writer.add_scalar('loss', loss_reduced, epoch_1000x)
                log_writer.add_scalar('lr', lr, epoch_1000x)
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model, args):
    """Prints '* Acc@1 x Acc@5 y loss z' and returns the averages."""
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
        n = images.shape[0]
        metric_logger.meters['loss'].update(loss.item(), n)
        metric_logger.meters['acc1'].update(acc1.item(), n)
        metric_logger.meters['acc5'].update(acc5.item(), n)
    metric_logger.synchronize_between_processes()
    m = metric_logger.meters
    print(f"* Acc@1 {m['acc1'].global_avg:.3f} Acc@5 {m['acc5'].global_avg:.3f} loss {m['loss'].global_avg:.3f}")
    return {k: meter.global_avg for k, meter in m.items()}
