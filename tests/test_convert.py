"""Checkpoints in and out: HF ViTMAE and timm conversion (same numbers both ways), one way to name a checkpoint."""
import ast
import subprocess
import sys
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn

import main_convert
import main_knn
import main_linprobe
import main_visualize
import models_mae
import models_vit
from conftest import ROOT, randomize_norms, run_script
from util import convert

transformers = pytest.importorskip('transformers')

SMALL_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                patch_size=8, decoder_hidden_size=24, decoder_num_hidden_layers=2, decoder_num_attention_heads=3,
                decoder_intermediate_size=96)
PICO_HF = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384, image_size=32,
               patch_size=4, decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
               decoder_intermediate_size=256)
PICO_TIMM = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)


def randomize(model, seed=0):
    """Every tensor of the state_dict drawn afresh (HF leaves position embeddings, cls and mask tokens at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            base = 1.0 if 'norm' in k and k.endswith('weight') else 0.0  # LayerNorm scales near 1
            t.copy_(base + 0.05 * torch.randn(t.shape, generator=g))
    return model


def hf_model(seed=0, **cfg):
    torch.manual_seed(seed)
    config = transformers.ViTMAEConfig(**{'layer_norm_eps': 1e-6, **cfg})
    return randomize(transformers.ViTMAEForPreTraining(config), seed).eval()


def ours_from(ck):
    """A MaskedAutoencoderViT of exactly the converted sizes (LayerNorm eps as the source says)."""
    kw = {k: v for k, v in ck['arch'].items() if k in ('img_size', 'patch_size', 'in_chans', 'embed_dim', 'depth',
                                                       'num_heads', 'decoder_embed_dim', 'decoder_depth',
                                                       'decoder_num_heads', 'mlp_ratio', 'norm_pix_loss')}
    model = models_mae.MaskedAutoencoderViT(**kw, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    model.load_state_dict(ck['state'])  # strict
    return model


def compare(hf, ours, n, size, seed=1):
    """Same images and noise through both -> (|loss diff|, max |pred diff|); masks must be equal."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 3, size, size, generator=g)
    noise = torch.rand(n, ours.patch_embed.num_patches, generator=g)
    with torch.no_grad():
        out = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, mask_ratio=hf.config.mask_ratio, noise=noise)
    assert torch.equal(out.mask, mask)
    return abs(out.loss.item() - loss.item()), (out.logits - pred).abs().max().item()


def convert_cli(*argv):
    return run_script(main_convert, list(argv))


# ---------------------------------------------------------------- HF -> ours -> HF

@pytest.mark.parametrize('norm_pix', [False, True])
@pytest.mark.parametrize('naming', ['save_pretrained', 'modules'])
def test_hf_small_to_ours_same_loss_and_pred(tmp_path, norm_pix, naming):
    hf = hf_model(**SMALL_HF, norm_pix_loss=norm_pix)
    if naming == 'save_pretrained':  # 5.x writes hub names (decoder layers: decoder.decoder_encoder.layer.N)
        hf.save_pretrained(tmp_path / 'hf')
    else:  # the module names (transformers >= 5: vit.layers.N.attention.q_proj, mlp.fc1, ...; 4.x: the hub's)
        hf.config.save_pretrained(tmp_path / 'hf')
        convert.save_safetensors(hf.state_dict(), str(tmp_path / 'hf' / 'model.safetensors'))
    ck = convert.load(str(tmp_path / 'hf'))
    assert ck['format'] == 'hf' and ck['args']['norm_pix_loss'] == norm_pix and ck['arch']['num_heads'] == 4
    dloss, dpred = compare(hf, ours_from(ck), 3, 32)
    print(f'HF small -> ours (norm_pix {norm_pix}, {naming} naming): |d loss| {dloss:.2e}, max |d pred| {dpred:.2e}')
    assert dloss <= 1e-5 and dpred <= 1e-4


@pytest.fixture(scope='module')
def vit_b_pair():
    """A random ViTMAEForPreTraining with the ViTMAEConfig defaults (ViT-B/16, decoder 512 x 8) and its conversion."""
    hf = hf_model(seed=3, mask_ratio=0.75)
    ck = {'state': convert.hf_to_mae(hf.state_dict()), 'arch': convert.arch_from_hf_config(hf.config.to_dict())[0]}
    assert convert.match_config(ck['arch'], models_mae.CONFIGS) == 'base_patch16'
    return hf, ours_from(ck)


@pytest.mark.parametrize('norm_pix', [False, True])
def test_hf_vit_b_to_ours_same_loss_and_pred(vit_b_pair, norm_pix):
    hf, ours = vit_b_pair
    hf.config.norm_pix_loss = ours.norm_pix_loss = norm_pix
    dloss, dpred = compare(hf, ours, 1, 224)
    print(f'HF ViT-B -> ours (norm_pix {norm_pix}): |d loss| {dloss:.2e}, max |d pred| {dpred:.2e}')
    assert dloss <= 1e-5 and dpred <= 1e-4


@pytest.mark.parametrize('norm_pix', [False, True])
def test_ours_to_hf_and_back(tmp_path, norm_pix):
    torch.manual_seed(0)
    ours = randomize_norms(models_mae.mae_vit_pico_patch4(norm_pix_loss=norm_pix)).eval()
    src = tmp_path / 'ours.pth'
    torch.save({'model': ours.state_dict(), 'args': {'model': 'mae_vit_pico_patch4', 'input_size': 32,
                                                     'norm_pix_loss': norm_pix}}, src)
    convert_cli('--src', src, '--dst', tmp_path / 'hf', '--to', 'hf')
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / 'hf', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.norm_pix_loss == norm_pix
    dloss, dpred = compare(hf.eval(), ours, 3, 32)
    print(f'ours -> HF (norm_pix {norm_pix}): |d loss| {dloss:.2e}, max |d pred| {dpred:.2e}')
    assert dloss <= 1e-5 and dpred <= 1e-4
    convert_cli('--src', tmp_path / 'hf', '--dst', tmp_path / 'back.pth', '--to', 'mae')
    back = torch.load(tmp_path / 'back.pth', weights_only=True)
    assert back['args']['model'] == 'mae_vit_pico_patch4' and back['args']['norm_pix_loss'] == norm_pix
    assert back['model'].keys() == ours.state_dict().keys()
    assert all(torch.equal(back['model'][k], v) for k, v in ours.state_dict().items())  # bit-identical


def test_ours_vit_b_to_hf_same_loss_and_pred(tmp_path):
    """Ours -> HF at the ViT-B/16 config (decoder 512 x 8), through the files main_convert writes."""
    torch.manual_seed(0)
    ours = randomize_norms(models_mae.mae_vit_base_patch16(norm_pix_loss=True)).eval()
    torch.save({'model': ours.state_dict(), 'args': {'model': 'mae_vit_base_patch16', 'input_size': 224,
                                                     'norm_pix_loss': True}}, tmp_path / 'b.pth')
    convert_cli('--src', tmp_path / 'b.pth', '--dst', tmp_path / 'hf', '--to', 'hf')
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / 'hf', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
    dloss, dpred = compare(hf.eval(), ours, 1, 224)
    print(f'ours ViT-B -> HF: |d loss| {dloss:.2e}, max |d pred| {dpred:.2e}')
    assert dloss <= 1e-5 and dpred <= 1e-4


def test_linear_probe_head_is_folded_for_timm_and_mae(tmp_path, capsys):
    """A main_linprobe checkpoint (head = BatchNorm without affine + Linear) exports as one Linear head that
    gives the probe's logits: strictly into timm, and back into models_vit."""
    torch.manual_seed(0)
    vit = randomize_norms(models_vit.vit_pico_patch4(num_classes=10, global_pool=False))
    vit.head = nn.Sequential(nn.BatchNorm1d(96, affine=False, eps=1e-6), vit.head)
    vit.head[0].running_mean.normal_()
    vit.head[0].running_var.uniform_(0.5, 2)
    vit.eval()
    torch.save({'model': vit.state_dict(), 'args': {'model': 'vit_pico_patch4', 'input_size': 32}}, tmp_path / 'lp.pth')
    convert_cli('--src', tmp_path / 'lp.pth', '--dst', tmp_path / 'lp.safetensors', '--to', 'timm')
    assert 'folded into one Linear head' in capsys.readouterr().out
    tm = timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=10, global_pool='token', **PICO_TIMM,
                           pretrained_cfg_overlay=dict(file=str(tmp_path / 'lp.safetensors'), num_classes=10)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tm(x), vit(x), atol=1e-5, rtol=1e-5)
    convert_cli('--src', tmp_path / 'lp.pth', '--dst', tmp_path / 'lp_mae.pth', '--to', 'mae')
    back = models_vit.vit_pico_patch4(num_classes=10, global_pool=False).eval()
    back.load_state_dict(torch.load(tmp_path / 'lp_mae.pth', weights_only=True)['model'])  # strict
    with torch.no_grad():
        torch.testing.assert_close(back(x), vit(x), atol=1e-5, rtol=1e-5)


def test_hub_naming_and_layer_norm_eps(tmp_path, capsys):
    """The hub's files (attention.attention.query, intermediate.dense, ...) with the hub's layer_norm_eps 1e-12."""
    hf = hf_model(**PICO_HF)
    hub = convert.mae_to_hf(convert.hf_to_mae(hf.state_dict()))
    assert 'vit.encoder.layer.0.attention.attention.query.weight' in hub
    assert 'decoder.decoder_layers.1.output.dense.bias' in hub
    (tmp_path / 'hub').mkdir()
    convert.save_hf_folder(hub, {**hf.config.to_dict(), 'layer_norm_eps': 1e-12}, str(tmp_path / 'hub'))
    ck = convert.load(str(tmp_path / 'hub'))
    assert any('layer_norm_eps=1e-12' in n for n in ck['notes'])
    assert all(torch.equal(ck['state'][k], v) for k, v in convert.hf_to_mae(hf.state_dict()).items())
    convert_cli('--src', tmp_path / 'hub' / 'model.safetensors', '--dst', tmp_path / 'hf2', '--to', 'hf')
    assert 'layer_norm_eps=1e-12' in capsys.readouterr().out
    assert convert.read_json(str(tmp_path / 'hf2' / 'config.json'))['layer_norm_eps'] == 1e-6


# ---------------------------------------------------------------- timm

def our_features(model, x, pool):
    """this project's MAE encoder on unmasked input (patch order kept) -> [N, D]"""
    noise = torch.arange(model.patch_embed.num_patches, dtype=torch.float).expand(x.shape[0], -1)
    latent, mask, _ = model.forward_encoder(x, 0.0, noise)
    assert mask.sum() == 0
    return latent[:, 0] if pool == 'token' else latent[:, 1:].mean(dim=1)


@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_ours_to_timm_same_features(tmp_path, pool, capsys):
    torch.manual_seed(0)
    ours = randomize_norms(models_mae.mae_vit_pico_patch4()).eval()
    args = {'model': 'mae_vit_pico_patch4', 'input_size': 32}
    torch.save({'model': ours.state_dict(), 'args': args}, tmp_path / 'o.pth')
    dst = tmp_path / 'enc.safetensors'
    convert_cli('--src', tmp_path / 'o.pth', '--dst', dst, '--to', 'timm')
    out = capsys.readouterr().out
    assert 'dropped (not part of the encoder): mask_token (1), decoder_pos_embed (1)' in out
    assert 'decoder_blocks.* (24)' in out
    pool_kw = dict(global_pool='avg', fc_norm=False) if pool == 'avg' else {}  # timm's avg of the normed tokens
    # num_classes=0 in the overlay too: timm then loads strictly (it relaxes strict when the class counts differ)
    tm = timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=0, **PICO_TIMM, **pool_kw,
                           pretrained_cfg_overlay=dict(file=str(dst), num_classes=0)).eval()
    plain = timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=0, **PICO_TIMM, **pool_kw,
                              pretrained_cfg_overlay=dict(file=str(dst)))  # the usual call: the same weights
    assert all(torch.equal(v, tm.state_dict()[k]) for k, v in plain.state_dict().items())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        d = (tm(x) - our_features(ours, x, pool)).abs().max().item()
    print(f'ours -> timm ({pool}): max |d features| {d:.2e}')
    assert d <= 1e-5


def test_finetuned_global_pool_to_timm_and_back(tmp_path):
    """A fine-tuned encoder with fc_norm (global pool): timm's default avg pooling, and back into models_vit."""
    torch.manual_seed(0)
    vit = randomize_norms(models_vit.vit_pico_patch4(num_classes=10, global_pool=True)).eval()
    torch.save({'model': vit.state_dict(), 'args': {'model': 'vit_pico_patch4', 'input_size': 32}}, tmp_path / 'ft.pth')
    convert_cli('--src', tmp_path / 'ft.pth', '--dst', tmp_path / 'ft.safetensors', '--to', 'timm')
    tm = timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=10, global_pool='avg', **PICO_TIMM,
                           pretrained_cfg_overlay=dict(file=str(tmp_path / 'ft.safetensors'), num_classes=10)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        d = (tm.forward_head(tm.forward_features(x), pre_logits=True)
             - models_vit.forward_features_pooled(vit, x, 'avg')).abs().max().item()
        assert torch.allclose(tm(x), vit(x), atol=1e-5)
    print(f'fine-tuned (fc_norm) -> timm (avg): max |d features| {d:.2e}')
    assert d <= 1e-5


def test_timm_to_ours_loads_strictly(tmp_path, data_path):
    """A timm encoder saved by timm (no metadata): -> mae format, which loads strictly into models_vit."""
    torch.manual_seed(0)
    tm = randomize_norms(timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=0, **PICO_TIMM)).eval()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(tmp_path / 'timm.safetensors'))
    convert_cli('--src', tmp_path / 'timm.safetensors', '--dst', tmp_path / 'ours.pth', '--to', 'mae')
    ck = torch.load(tmp_path / 'ours.pth', weights_only=True)
    assert ck['args'] == {'model': 'vit_pico_patch4', 'input_size': 32, 'global_pool': False, 'nb_classes': 0}
    vit = models_vit.create_vit(ck['args']['model'], img_size=32, num_classes=0, global_pool=False).eval()
    vit.load_state_dict(ck['model'])  # strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (vit(x) - tm(x)).abs().max() <= 1e-6


def test_timm_names_fit_every_size():
    """Each standard factory's encoder has exactly the keys and shapes of timm's model of that size."""
    for key, name in convert.TIMM_NAMES.items():
        with torch.device('meta'):
            tm = timm.create_model(name, pretrained=False, num_classes=0)
            ours = models_mae.MODELS[f'mae_vit_{key}']()
        enc, _ = convert.mae_to_timm(ours.state_dict())
        assert {k: v.shape for k, v in enc.items()} == {k: v.shape for k, v in tm.state_dict().items()}, key
        assert tm.blocks[0].attn.num_heads == ours.blocks[0].attn.num_heads


# ---------------------------------------------------------------- the scripts read HF and timm files directly

@pytest.fixture(scope='module')
def pico_files(tmp_path_factory):
    """One random pico MAE as ours (.pth with args), HF folder and timm .safetensors."""
    d = tmp_path_factory.mktemp('pico_files')
    torch.manual_seed(0)
    model = models_mae.mae_vit_pico_patch4(norm_pix_loss=True)
    torch.save({'model': model.state_dict(), 'args': {'model': 'mae_vit_pico_patch4', 'input_size': 32,
                                                      'norm_pix_loss': True}}, d / 'ours.pth')
    for to, dst in (('hf', 'hf'), ('timm', 'enc.safetensors')):
        convert_cli('--src', d / 'ours.pth', '--dst', d / dst, '--to', to)
    return d


KNN = ['--subset', 200, '--val_subset', 100, '--cache_data', '--num_workers', 0, '--ks', 10, '--batch_size', 100]


def test_knn_takes_model_and_size_from_the_checkpoint(pico_files, data_path, capsys):
    rows = []
    for flag, src in (('--finetune', 'ours.pth'), ('--checkpoint', 'hf'), ('--finetune', 'enc.safetensors')):
        args = main_knn.get_args_parser().parse_args([str(a) for a in [*KNN, '--data_path', data_path, flag,
                                                                       pico_files / src]])
        rows += main_knn.main(args)
        assert args.input_size == 32
    out = capsys.readouterr().out
    assert out.count('vit_pico_patch4 at 32 px') == 3 and 'k-NN k=10 top1' in out
    assert rows[0][1] == rows[1][1] == rows[2][1]  # the same encoder in three formats


def test_linprobe_and_finetune_take_model_from_hf_and_timm(pico_files, data_path, tmp_path):
    import main_finetune
    common = ['--data_path', data_path, '--subset', 32, '--val_subset', 20, '--cache_data', '--num_workers', 0,
              '--batch_size', 16, '--epochs', 1, '--nb_classes', 10, '--max_steps_per_epoch', 1]
    args = run_script(main_linprobe, [*common, '--finetune', pico_files / 'hf', '--output_dir', tmp_path / 'lp'])
    assert (args.model, args.input_size) == ('vit_pico_patch4', 32)
    args = run_script(main_finetune, [*common, '--finetune', pico_files / 'enc.safetensors',
                                      '--output_dir', tmp_path / 'ft'])
    assert (args.model, args.input_size) == ('vit_pico_patch4', 32)
    ck = torch.load(tmp_path / 'ft' / 'checkpoint.pth', weights_only=True)
    assert ck['args']['model'] == 'vit_pico_patch4'


def test_visualize_reads_hf_and_timm(pico_files, data_path, tmp_path):
    panels = main_visualize.main(main_visualize.get_args_parser().parse_args(
        ['--checkpoint', str(pico_files / 'hf'), '--out', str(tmp_path / 'r.png'), '--num_images', '2',
         '--data_path', data_path]))
    assert panels['reconstruction'].shape == (2, 3, 32, 32)
    main_visualize.main(main_visualize.get_args_parser().parse_args(
        ['--rollout', '--checkpoint', str(pico_files / 'enc.safetensors'), '--out', str(tmp_path / 'ro.png'),
         '--num_images', '2', '--data_path', data_path]))
    assert (tmp_path / 'ro.png').stat().st_size > 5000


def test_converted_hf_checkpoint_trains_on(data_path, tmp_path):
    import main_pretrain
    from conftest import read_log
    hf = hf_model(**PICO_HF, norm_pix_loss=True)
    hf.save_pretrained(tmp_path / 'hf')
    convert_cli('--src', tmp_path / 'hf', '--dst', tmp_path / 'mae.pth', '--to', 'mae')
    run_script(main_pretrain, ['--model', 'mae_vit_pico_patch4', '--input_size', 32, '--norm_pix_loss', '--resume',
                               tmp_path / 'mae.pth', '--data_path', data_path, '--subset', 64, '--cache_data',
                               '--batch_size', 32, '--epochs', 1, '--num_workers', 0, '--output_dir', tmp_path / 'out'])
    assert len(read_log(tmp_path / 'out' / 'log.txt')) == 1


# ---------------------------------------------------------------- bad input, layering

def test_bad_sources_get_one_line(tmp_path, capsys):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    tm = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=0, reg_tokens=2, **PICO_TIMM)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(tmp_path / 'reg.safetensors'))
    torch.save({'model': {'foo.weight': torch.zeros(2)}}, tmp_path / 'foo.pth')
    ours = models_mae.mae_vit_pico_patch4(cross_mae=True).state_dict()
    torch.save({'model': ours}, tmp_path / 'cross.pth')
    (tmp_path / 'text.pth').write_text('not a checkpoint\n')
    cases = {'text.pth': ('timm', 'cannot read checkpoint'), 'missing.pth': ('hf', 'checkpoint not found'), 'reg.safetensors': ('mae', "e.g. ['reg_token']"),
             'foo.pth': ('timm', "cannot tell the format from its keys (not this project's/MAE's, HF ViTMAE or timm "
                                 "ViT), e.g. ['foo.weight']"),
             'cross.pth': ('hf', 'no CrossMAE decoder')}
    for src, (to, msg) in cases.items():
        args = main_convert.get_args_parser().parse_args(['--src', str(tmp_path / src), '--dst', str(tmp_path / 'o'),
                                                          '--to', to])
        with pytest.raises(SystemExit) as e:
            main_convert.misc.run_main(main_convert.main, args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith('error: ') and msg in err and '\n' not in err, (src, err)
    out = subprocess.run([sys.executable, 'main_convert.py', '--src', 'no/such.pth', '--dst', str(tmp_path / 'x'),
                          '--to', 'hf'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == 'error: checkpoint not found: no/such.pth'


def test_util_imports_no_model_or_script_files():
    """util/ is the bottom layer: models_*, masking and main_* import it, never the other way round."""
    for path in (ROOT / 'util').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ''] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith(('models_', 'masking', 'main_', 'engine_')) for n in names), (path.name, names)
    code = 'import sys, main_finetune, main_knn, main_linprobe, main_pretrain; print("transformers" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == 'False', out.stderr[-2000:]
