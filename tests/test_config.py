"""utils/config.py and the task schemas: YAML configs are typed, validated, overridable and saved with their comments."""
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from models.vit import ViTArch
from tasks.retrieval import RetrievalConfig
from utils.config import (Config, ConfigError, config_to_dict, load_config,
                          parse_config, save_config)

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
COCO = CONFIGS / 'retrieval_coco.yaml'
FLICKR = CONFIGS / 'retrieval_flickr.yaml'
TINY_VIT = 'vit={width: 96, depth: 3, heads: 3, patch_size: 8}'


def write(tmp_path: Path, text: str, name: str = 'cfg.yaml') -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- shipped configs

def test_coco_config_is_the_published_recipe():
    cfg, doc = load_config(COCO, RetrievalConfig)
    assert cfg.dataset == 'coco' and cfg.vit == 'base' and cfg.vit_arch.width == 768
    assert cfg.pretrained.endswith('/model_base_retrieval_coco.pth')
    assert (cfg.k_test, cfg.negative_all_rank) == (256, True)
    assert (cfg.batch_size_train, cfg.batch_size_test, cfg.image_size) == (32, 64, 384)
    assert (cfg.vit_grad_ckpt, cfg.vit_ckpt_layer, cfg.queue_size, cfg.alpha) == (True, 4, 57600, 0.4)
    assert (cfg.init_lr, cfg.min_lr, cfg.weight_decay, cfg.max_epoch) == (1e-5, 0.0, 0.05, 6)
    assert not Path(cfg.image_root).is_absolute() and not Path(cfg.ann_root).is_absolute()
    # Defaults not in the file are filled into the returned document as well.
    assert doc['max_tokens'] == 35 and doc['vit_drop_path_rate'] == 0.0


def test_flickr_config_differs_only_where_the_recipe_does():
    coco, _ = load_config(COCO, RetrievalConfig)
    flickr, _ = load_config(FLICKR, RetrievalConfig)
    assert flickr.dataset == 'flickr' and 'flickr30k' in flickr.image_root
    assert flickr.pretrained.endswith('/model_base_retrieval_flickr.pth')
    assert (flickr.k_test, flickr.negative_all_rank) == (128, False)
    differing = {k for k, v in config_to_dict(flickr).items() if config_to_dict(coco)[k] != v}
    assert differing == {'dataset', 'image_root', 'ann_root', 'pretrained', 'k_test',
                         'negative_all_rank', 'output_dir'}


def test_scientific_notation_and_int_for_float(tmp_path):
    # ruamel (YAML 1.2) reads `1e-5` as a float, unlike PyYAML (YAML 1.1), which gives a str.
    cfg, _ = load_config(write(tmp_path, 'init_lr: 1e-5\nmin_lr: 0\nmomentum: 1\n'), RetrievalConfig)
    assert type(cfg.init_lr) is float and cfg.init_lr == 1e-5
    assert type(cfg.min_lr) is float and cfg.min_lr == 0.0
    assert type(cfg.momentum) is float and cfg.momentum == 1.0


def test_none_path_gives_defaults():
    cfg, doc = load_config(None, RetrievalConfig)
    assert cfg == RetrievalConfig()
    assert cfg.vit_drop_path_rate == 0.0  # None resolves per ViT size
    assert load_config(None, RetrievalConfig, ['vit=large'])[0].vit_drop_path_rate == 0.1
    assert set(doc) == set(config_to_dict(cfg))


# ----------------------------------------------------------------------------- overrides

def test_opts_are_yaml_typed():
    cfg, doc = load_config(COCO, RetrievalConfig, [
        'k_test=32', 'init_lr=1e-4', 'negative_all_rank=false', 'train_file=[a.json,b.json]',
        'pretrained=', 'clip_grad_norm=null', 'device=cuda:1', 'val_file=val.json'])
    assert cfg.k_test == 32 and type(cfg.k_test) is int
    assert cfg.init_lr == 1e-4 and type(cfg.init_lr) is float
    assert cfg.negative_all_rank is False
    assert cfg.train_file == ['a.json', 'b.json']
    assert cfg.pretrained == ''
    assert cfg.clip_grad_norm is None
    assert cfg.device == 'cuda:1'
    assert cfg.val_file == 'val.json' and doc['val_file'] == 'val.json'  # added to the document


def test_vit_as_mapping_and_nested_override():
    cfg, doc = load_config(COCO, RetrievalConfig, [TINY_VIT, 'vit_ckpt_layer=1', 'image_size=64'])
    assert cfg.vit == ViTArch(width=96, depth=3, heads=3, patch_size=8, mlp_ratio=4.0)
    assert doc['vit']['mlp_ratio'] == 4.0  # nested default filled in

    cfg2, _ = load_config(COCO, RetrievalConfig, [TINY_VIT, 'vit.width=48', 'vit_ckpt_layer=0'])
    assert cfg2.vit.width == 48 and cfg2.vit.depth == 3


def test_nested_override_on_a_mapping_in_the_file(tmp_path):
    path = write(tmp_path, 'vit:\n  width: 64\n  depth: 2\n  heads: 2\nimage_size: 64\n')
    cfg, _ = load_config(path, RetrievalConfig, ['vit.width=96', 'vit.heads=3'])
    assert (cfg.vit.width, cfg.vit.depth, cfg.vit.heads, cfg.vit.patch_size) == (96, 2, 3, 16)


def test_opts_entry_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="'k_test' is not key=value"):
        load_config(COCO, RetrievalConfig, ['k_test'])


# ----------------------------------------------------------------------------- errors

def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, 'init_l: 1e-4\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, RetrievalConfig)
    assert str(err.value) == f"unknown config key 'init_l' in {path}; did you mean 'init_lr'?"


def test_unknown_nested_key_and_unknown_key_in_opts(tmp_path):
    path = write(tmp_path, 'vit: {width: 64, depth: 2, heads: 2, patch: 8}\n')
    with pytest.raises(ConfigError, match=r"'vit\.patch' in .*cfg\.yaml; did you mean 'vit\.patch_size'"):
        load_config(path, RetrievalConfig)
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_size_trian' in --opts; "
                                          r"did you mean 'batch_size_train'\?"):
        load_config(COCO, RetrievalConfig, ['batch_size_trian=8'])


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"'k_test' in --opts: expected int, got str 'many'"):
        load_config(COCO, RetrievalConfig, ['k_test=many'])
    with pytest.raises(ConfigError, match=r"'init_lr' in .*cfg\.yaml: expected float, got str '1e-5'"):
        load_config(write(tmp_path, "init_lr: '1e-5'\n"), RetrievalConfig)  # quoted: a string
    with pytest.raises(ConfigError, match=r"'precision' .*expected one of 'fp32', 'bf16', 'fp16'"):
        load_config(COCO, RetrievalConfig, ['precision=fp64'])
    with pytest.raises(ConfigError, match=r"'train_file\[1\]' .*expected str, got int 2"):
        load_config(COCO, RetrievalConfig, ['train_file=[a.json, 2]'])
    with pytest.raises(ConfigError, match=r"'batch_size_train' .*expected int, got bool True"):
        load_config(COCO, RetrievalConfig, ['batch_size_train=true'])


def test_missing_required_field():
    with pytest.raises(ConfigError, match=r"missing required config key 'vit\.heads' \(int\)"):
        load_config(COCO, RetrievalConfig, ['vit={width: 96, depth: 3}'])


def test_semantic_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"invalid value for config key 'batch_size_test' in --opts: "
                                          r"input should be greater than or equal to 1, got 0"):
        load_config(COCO, RetrievalConfig, ['batch_size_test=0'])
    with pytest.raises(ConfigError, match=r"'vit' .*must be one of \['base', 'large', 'small'\]"):
        load_config(COCO, RetrievalConfig, ['vit=huge'])
    # A value error is worded as one, and names where the value came from.
    with pytest.raises(ConfigError, match=r"invalid value for config key 'vit_ckpt_layer' in .*retrieval_coco\.yaml: "
                                          r"must be in \[0, 3\]"):
        load_config(COCO, RetrievalConfig, [TINY_VIT])  # the file's 4 exceeds the tiny depth
    # ... unless the run does not use it (gradient checkpointing under --evaluate).
    assert load_config(COCO, RetrievalConfig, [TINY_VIT], unused_keys=['vit_grad_ckpt'])[0].vit_ckpt_layer == 4
    with pytest.raises(ConfigError, match=r"'vit\.heads' .*must divide width 96"):
        load_config(COCO, RetrievalConfig, ['vit={width: 96, depth: 3, heads: 5}', 'vit_ckpt_layer=0'])
    with pytest.raises(ConfigError, match=r"'keep_checkpoints' .*only save_every > 0 writes; set save_every too"):
        load_config(COCO, RetrievalConfig, ['keep_checkpoints=2'])
    assert load_config(COCO, RetrievalConfig, ['keep_checkpoints=2', 'save_every=1'])[0].keep_checkpoints == 2
    with pytest.raises(ConfigError, match=r"'save_format' .*expected one of 'torch', 'safetensors'"):
        load_config(COCO, RetrievalConfig, ['save_format=pickle'])


def test_generic_field_types(tmp_path):
    class Schema(Config):
        size: ViTArch
        weights: Dict[str, float] = {}
        tags: list = []
        sizes: List[Optional[int]] = []

    path = write(tmp_path, 'size: {width: 8, depth: 1, heads: 2}\nweights: {itc: 1, itm: 0.5}\n')
    cfg, _ = load_config(path, Schema, ['tags=[x, 1]', 'sizes=[1, null]'])
    assert cfg.size.width == 8 and cfg.weights == {'itc': 1.0, 'itm': 0.5}
    assert cfg.tags == ['x', 1] and cfg.sizes == [1, None]
    with pytest.raises(ConfigError, match=r"'weights\.itm' .*expected float"):
        load_config(path, Schema, ['weights.itm=high'])
    with pytest.raises(ConfigError, match=r"missing required config key 'size'"):
        load_config(None, Schema)


def test_defaults_from_is_a_lower_layer(tmp_path):
    base = write(tmp_path, 'k_test: 16\nbatch_size_test: 8\n', 'base.yaml')
    path = write(tmp_path, 'k_test: 32\n')
    cfg, _ = load_config(path, RetrievalConfig, ['batch_size_test=4'], defaults_from=base)
    assert (cfg.k_test, cfg.batch_size_test) == (32, 4)
    cfg, _ = load_config(None, RetrievalConfig, defaults_from=RetrievalConfig(k_test=7))
    assert cfg.k_test == 7


# ----------------------------------------------------------------------------- saving / CLI

def test_save_round_trip_keeps_comments_and_overrides(tmp_path):
    cfg, doc = load_config(COCO, RetrievalConfig, ['k_test=32', 'init_lr=1e-4'])
    out = save_config(doc, tmp_path / 'run' / 'config.yaml')
    text = out.read_text()
    assert '# top-k candidates re-ranked with the ITM head' in text
    assert 'k_test: 32' in text and 'init_lr: 1e-4' in text
    assert 'rerank_batch_size: 128' in text  # filled default is recorded too
    again, _ = load_config(out, RetrievalConfig)
    assert again == cfg

    from_instance = save_config(cfg, tmp_path / 'plain.yaml')
    assert load_config(from_instance, RetrievalConfig)[0] == cfg


def test_parse_config_like_an_entry_script(tmp_path):
    args, cfg, doc = parse_config(
        RetrievalConfig, ['--config', str(FLICKR), '--output_dir', str(tmp_path), '--evaluate',
                          '--opts', 'k_test=8', 'batch_size_test=2'],
        extra_args=lambda p: p.add_argument('--evaluate', action='store_true'))
    assert args.evaluate and cfg.output_dir == str(tmp_path) == doc['output_dir']
    assert (cfg.k_test, cfg.batch_size_test) == (8, 2)

    _, cfg, _ = parse_config(RetrievalConfig, [], default_config=str(COCO))
    assert cfg.dataset == 'coco'
    with pytest.raises(SystemExit):  # bad key -> argparse error, not a traceback
        parse_config(RetrievalConfig, ['--config', str(COCO), '--opts', 'k_tset=1'])


def test_caption_pretraining_and_dlip_configs_are_their_recipes():
    from tasks.blip_pretrain import BlipPretrainConfig
    from tasks.caption import CaptionConfig
    cap, _ = load_config(CONFIGS / 'caption_coco.yaml', CaptionConfig)
    assert (cap.prompt, cap.max_length, cap.min_length, cap.num_beams) == ('a picture of ', 20, 5, 3)
    assert (cap.batch_size_train, cap.batch_size_test, cap.init_lr, cap.max_epoch, cap.image_size) == (32, 32, 1e-5, 5, 384)
    flickr, _ = load_config(CONFIGS / 'caption_flickr.yaml', CaptionConfig)
    assert flickr.dataset == 'flickr' and flickr.pretrained.endswith('/model_base.pth')
    pre, _ = load_config(CONFIGS / 'pretrain_blip.yaml', BlipPretrainConfig)
    assert (pre.image_size, pre.max_tokens, pre.batch_size_train, pre.init_lr, pre.warmup_steps) == (224, 30, 75, 3e-4, 3000)
    assert (pre.lr_decay_rate, pre.min_lr, pre.max_epoch, pre.queue_size, pre.momentum) == (0.9, 1e-6, 20, 57600, 0.995)
    assert len(pre.train_file) == 4
    ret, _ = load_config(CONFIGS / 'dlip_retrieval_flickr.yaml', RetrievalConfig)
    dcap, _ = load_config(CONFIGS / 'dlip_caption_flickr.yaml', CaptionConfig)
    for cfg in (ret, dcap):
        assert cfg.vit_arch.width == 384 and cfg.vit_arch.heads == 6 and cfg.med_config.endswith('med_config_small.json')
        assert (cfg.batch_size_train, cfg.init_lr, cfg.max_epoch, cfg.image_size) == (32, 5e-5, 6, 384)
        assert (cfg.vit_grad_ckpt, cfg.vit_ckpt_layer) == (True, 4)
    assert ret.k_test == 128
    from models.med import MedConfig
    small = MedConfig.from_json(CONFIGS / 'med_config_small.json')
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads, small.intermediate_size,
            small.vocab_size, small.encoder_width) == (384, 6, 12, 3072, 30524, 384)
    dlip, _ = load_config(CONFIGS / 'dlip_pretrain.yaml', BlipPretrainConfig)
    assert dlip.vit == 'small' and dlip.med_config.endswith('med_config_small.json') and dlip.teacher
    assert (dlip.teacher_vit, dlip.teacher_med_config) == ('base', 'configs/med_config.json')
    assert (dlip.batch_size_train, dlip.init_lr, dlip.warmup_lr, dlip.warmup_steps, dlip.weight_decay) == (72, 5e-4, 1e-6, 3000, 0.02)
    assert (dlip.max_epoch, dlip.lr_decay_rate, dlip.min_lr, dlip.image_size, dlip.max_tokens, dlip.alpha) == (20, 0.9, 1e-6, 224, 30, 0.4)
    assert dlip.queue_size % (4 * 72) == 0 and dlip.distill_itc_targets == 'release'
    assert set(dlip.distill_weights().values()) == {1.0} and len(dlip.distill_weights()) == 9


DEMO_SCHEMAS = {'retrieval': 'RetrievalConfig', 'fixture_eval': 'RetrievalConfig', 'dlip_retrieval': 'RetrievalConfig',
                'caption': 'CaptionConfig', 'dlip_caption': 'CaptionConfig', 'dlip_teacher': 'BlipPretrainConfig',
                'dlip_student': 'BlipPretrainConfig'}


@pytest.mark.parametrize('name', sorted(DEMO_SCHEMAS))
def test_demo_configs_load(name):
    """The demo's retrieval, captioning and DLIP configs load against their schemas (run.sh passes paths)."""
    from tasks.blip_pretrain import BlipPretrainConfig
    from tasks.caption import CaptionConfig
    schema = {'RetrievalConfig': RetrievalConfig, 'CaptionConfig': CaptionConfig,
              'BlipPretrainConfig': BlipPretrainConfig}[DEMO_SCHEMAS[name]]
    cfg, _ = load_config(CONFIGS / 'demo' / f'{name}.yaml', schema)
    if name == 'dlip_student':
        assert cfg.vit_arch.width < 64 and not cfg.teacher and cfg.teacher_vit.width == 64
