"""The typed config: YAML loading, --set overrides, and errors that list the valid keys/values."""

from __future__ import annotations

from pathlib import Path

import pytest

from hcral.config import Config, ConfigError, apply_overrides, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_schedule():
    cfg = Config()
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == (0.01, 0.9, 1e-4)
    assert (cfg.train.warmup_iters, cfg.train.lr_steps, cfg.train.epochs) == (500, [8, 11], 12)
    assert (cfg.data.short_side, cfg.data.max_side) == (800, 1333)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.out_dir


def test_overrides_parse_by_field_type():
    cfg = load_config(overrides=[
        "model.detector=atss", "train.lr=0.02", "data.root=2017", "train.lr_steps=[3, 4]",
        "train.max_iters=null", "train.grad_clip=35", "loss.hcra_cls_rci=false",
    ])
    assert cfg.model.detector == "atss"
    assert cfg.train.lr == 0.02
    assert cfg.data.root == "2017"  # a string field keeps the text
    assert cfg.train.lr_steps == [3, 4]
    assert cfg.train.max_iters is None
    assert cfg.train.grad_clip == 35.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.loss.hcra_cls_rci is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.detectr=atss", "valid keys: model.detector"),
        ("foo=1", "valid keys: model, loss"),
        ("model.detector=yolo", "'retinanet', 'atss', 'fcos_atss'"),
        ("train.lr=abc", "train.lr: expected a number"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("loss.hcra_cls_cf=maybe", "expected true or false"),
        ("train.lr", "must look like key=value"),
        ("model.detector.x=1", "has no sub-keys"),
    ],
)
def test_bad_overrides_name_the_key_and_the_choices(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        apply_overrides(Config(), [override])


def test_yaml_typo_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  detecter: atss\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.detecter'; valid keys: model\.detector"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_synthetic_configs_are_the_demo_and_its_baseline():
    from hcral.demo import baseline_of, demo_config

    root = Path(__file__).parents[1] / "configs"
    hcral_cfg = load_config(root / "synthetic_fcos_atss_hcral.yaml")
    assert hcral_cfg == demo_config(hcral_cfg.out_dir)
    base_cfg = load_config(root / "synthetic_fcos_atss_baseline.yaml")
    assert base_cfg == baseline_of(demo_config(base_cfg.out_dir))


def test_hcral_defaults_are_the_same_everywhere():
    # One source (hcral/defaults.py, §6): the config fields, the functions and the modules agree.
    import inspect

    from hcral import defaults as D
    from hcral import losses as L
    from hcral.assign import eatss_assign, eatss_assign_batched
    from hcral.models.heads.retinanet import RetinaNetHead

    loss = Config().loss
    assert (loss.hcra_alpha, loss.hcra_theta, loss.hcra_mu, loss.hcra_ep, loss.eatss_max_extra) == (
        D.HCRA_ALPHA, D.HCRA_THETA, D.HCRA_MU, D.HCRA_EP, D.EATSS_MAX_EXTRA,
    )
    for fn in (L.hcra_cls_loss, L.cls_weights, L.HCRAClassificationLoss.__init__, L.hcra_cls_loss_fused):
        p = inspect.signature(fn).parameters
        assert (p["alpha"].default, p["theta"].default, p["mu"].default) == (D.HCRA_ALPHA, D.HCRA_THETA, D.HCRA_MU)
    for fn in (L.hcra_reg_loss, L.reg_weights, L.HCRARegressionLoss.__init__):
        p = inspect.signature(fn).parameters
        assert (p["alpha"].default, p["ep"].default) == (D.HCRA_ALPHA, D.HCRA_EP)
    for fn in (eatss_assign, eatss_assign_batched):
        assert inspect.signature(fn).parameters["max_extra"].default == D.EATSS_MAX_EXTRA
    assert RetinaNetHead.default_hcra_gamma == D.HCRA_GAMMA_RETINANET


def test_the_fused_path_refuses_the_focal_base_and_scale_preserving_weights():
    from hcral.config import ConfigError, load_config

    for extra in ("loss.hcra_cls_base=focal", "loss.hcra_cls_normalize=true"):
        with pytest.raises(ConfigError, match="loss.hcra_fused=true computes only HCRA-C"):
            load_config(overrides=["loss.cls=hcra_c", "loss.hcra_fused=true", extra])
    with pytest.raises(ConfigError, match="'ghm', 'focal'"):
        load_config(overrides=["loss.hcra_cls_base=bce"])


def test_cls_loss_label_names_the_focal_base_and_scale_preserving_weights_apart():
    from hcral.config import cls_loss_label, load_config

    def label(*overrides):
        return cls_loss_label(load_config(overrides=list(overrides)).loss)

    assert label("loss.cls=focal") == "focal" and label("loss.cls=hcra_c") == "hcra_c"
    assert label("loss.cls=hcra_c", "loss.hcra_cls_normalize=true") == "hcra_c_sp"
    assert label("loss.cls=hcra_c", "loss.hcra_cls_base=focal") == "rci_cf_focal"
    assert label("loss.cls=hcra_c", "loss.hcra_cls_base=focal", "loss.hcra_cls_normalize=true") == "rci_cf_focal_sp"
