"""Layer-wise learning-rate decay (ELECTRA/BEiT style) for fine-tuning a ViT."""


def get_layer_id_for_vit(name, num_layers):
    """0 for the embeddings, k + 1 for blocks.k, num_layers for everything after the blocks."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return num_layers


def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=('pos_embed', 'cls_token'), layer_decay=.75):
    """Parameter groups with lr_scale = layer_decay ** (num_layers - layer_id); no weight decay for 1-D
    parameters (biases, norms) and for the names in no_weight_decay_list."""
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or n in no_weight_decay_list
        layer_id = get_layer_id_for_vit(n, num_layers)
        key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
        if key not in groups:
            groups[key] = {'lr_scale': scales[layer_id], 'weight_decay': 0. if no_decay else weight_decay,
                           'params': [], 'names': []}
        groups[key]['params'].append(p)
        groups[key]['names'].append(n)
    for g in groups.values():
        del g['names']
    return list(groups.values())


def param_groups_weight_decay(model, weight_decay):
    """Pretraining groups: decay on parameters with ndim >= 2 except biases; none on 1-D parameters and biases."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or n.endswith('.bias') else decay).append(p)
    return [{'params': no_decay, 'weight_decay': 0.}, {'params': decay, 'weight_decay': weight_decay}]
