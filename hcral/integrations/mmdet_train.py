"""Train an MMDetection config (with the HCRAL plugin) through mmengine's ``Runner``.

MMDetection's pip package does not ship ``tools/train.py``; this is its short equivalent::

    python -m hcral.integrations.mmdet_train CONFIG [--work-dir DIR] [--cfg-options KEY=VALUE ...]

The config loads the plugin itself (``custom_imports``); this module imports it too, so configs
that name hcral's types without ``custom_imports`` also build.
"""

from __future__ import annotations

import argparse
import importlib
import os.path as osp
from collections.abc import Sequence

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

# The plugin: importing it registers HCRAL's types into MMDetection's registries.
PLUGIN = "hcral.integrations.mmdet"


def build_runner(config: str, *, work_dir: str | None = None, cfg_options: dict | None = None) -> Runner:
    """An mmengine ``Runner`` for ``config``; ``work_dir`` defaults to ``work_dirs/<config name>``."""
    importlib.import_module(PLUGIN)
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.work_dir = work_dir or cfg.get("work_dir") or osp.join("work_dirs", osp.splitext(osp.basename(config))[0])
    return Runner.from_cfg(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hcral.integrations.mmdet_train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="an MMDetection config, e.g. configs/mmdet/atss_r50_fpn_1x_coco_hcral.py")
    p.add_argument("--work-dir", help="folder for logs and checkpoints (default: work_dirs/<config name>)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE",
                   help="override config values, e.g. train_cfg.max_iters=2")
    args = p.parse_args(argv)
    build_runner(args.config, work_dir=args.work_dir, cfg_options=args.cfg_options).train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
