"""Building the fine-tune/probe ViT and filling it from any checkpoint this project (or the originals) writes."""
import models_vit
from util.checkpoint import load_checkpoint, model_state
from util.misc import UserError


def vit_name(name):
    """Accepts 'vit_base_patch16' or the pretrain name 'mae_vit_base_patch16(_dec512d8b)'."""
    name = models_vit.vit_for(name) if name.startswith('mae_') else name
    if name not in models_vit.MODELS:
        raise UserError(f'unknown --model {name!r}; choose from: {", ".join(models_vit.MODELS)}')
    return name


def create_vit(name, **kwargs):
    return models_vit.MODELS[vit_name(name)](**kwargs)


def load_encoder(model, path):
    """Loads the encoder weights of checkpoint `path` (MAE, CrossMAE, CMAE pretrain, or fine-tuned) into model.
    Prints what was not loaded; raises UserError when the checkpoint is of another architecture."""
    state = model_state(load_checkpoint(path))
    try:
        missing, unexpected = models_vit.load_pretrained(model, state)
    except ValueError as e:
        raise UserError(f'{path}: {e}') from e
    print(f'loaded encoder from {path}; missing: {missing}; unexpected: {unexpected}')
    return missing, unexpected


def load_exact(model, path):
    """Loads a checkpoint written for exactly this model (strict); lists the mismatched keys otherwise."""
    ckpt = load_checkpoint(path)
    state = model_state(ckpt)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise UserError(f'{path} does not fit this model (another architecture?): missing {missing[:6]}, '
                        f'unexpected {unexpected[:6]}, shape mismatches {shapes[:6]}')
    model.load_state_dict(state)
    return ckpt
