"""Loading the OFFICIAL AliTok AR code (github ali-vilab/alitok, commit 093e957) from a local checkout, for the
parity goldens (tests/make_alitok_ar_goldens.py) and the benchmark rows that race it.

The repository has no license: it is never copied into this project. Check it out OUTSIDE the project and say
where it is with $ALITOK_REPO (the golden script also takes --alitok), e.g.

    git clone https://github.com/ali-vilab/alitok /tmp/alitok && git -C /tmp/alitok checkout 093e957
    ALITOK_REPO=/tmp/alitok python -m bench.run --only alitok

Only modeling/ar.py (and, for the golden script, utils/train_utils.py's optimizer and schedule) are imported.
"""
from __future__ import annotations

import os
import sys
import types
from typing import Optional

OFFICIAL_COMMIT = "093e957"
ENV = "ALITOK_REPO"


class Config(dict):
    """The attribute-style config (with .get) the official code reads, built from plain dicts."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    @classmethod
    def of(cls, value):
        return cls({k: cls.of(v) for k, v in value.items()}) if isinstance(value, dict) else value


def repo_path(path: Optional[str] = None) -> Optional[str]:
    """The checkout to use (argument, else $ALITOK_REPO), or None when there is none."""
    path = path or os.environ.get(ENV, "")
    return path if path and os.path.isfile(os.path.join(path, "modeling", "ar.py")) else None


def why_missing(path: Optional[str] = None) -> str:
    given = path or os.environ.get(ENV, "")
    if not given:
        return (f"no checkout of the official AliTok code: set ${ENV} to a checkout of "
                f"github.com/ali-vilab/alitok at {OFFICIAL_COMMIT}, outside this project")
    return f"{given!r} is not a checkout of ali-vilab/alitok (no modeling/ar.py there)"


def import_official(path: Optional[str] = None, train_utils: bool = False) -> types.SimpleNamespace:
    """The official modules: ``ar`` (modeling.ar), ``losses`` (modeling.modules.losses) and, with
    ``train_utils``, utils.train_utils (its optimizer groups and LR schedule). Raises FileNotFoundError with
    what to do when the checkout is absent."""
    root = repo_path(path)
    if root is None:
        raise FileNotFoundError(why_missing(path))
    if root not in sys.path:
        sys.path.insert(0, root)
    if train_utils and "omegaconf" not in sys.modules:
        # utils/train_utils.py imports OmegaConf for its YAML loading, which is not used here
        stub = types.ModuleType("omegaconf")
        stub.OmegaConf = None
        sys.modules["omegaconf"] = stub
    import importlib

    out = types.SimpleNamespace(root=root, ar=importlib.import_module("modeling.ar"),
                                losses=importlib.import_module("modeling.modules.losses"))
    if train_utils:
        out.train_utils = importlib.import_module("utils.train_utils")
    return out


def official_config(model_cfg, optim_cfg=None, guidance=(16.0, 1.8)) -> Config:
    """An official-style config for the shape in ``model_cfg`` (a rear_ds ModelConfig of the alitok family).
    The official code hard-codes 17 prefix tokens and a 16x16 grid, so model_cfg must have that layout."""
    if (model_cfg.prefix_tokens, model_cfg.num_tokens) != (17, 273):
        raise ValueError("the official AliTok code hard-codes 17 prefix tokens + a 16x16 grid (273 tokens); got "
                         f"prefix_tokens={model_cfg.prefix_tokens}, num_tokens={model_cfg.num_tokens}")
    gen = {"hidden_size": model_cfg.hidden_size, "num_hidden_layers": model_cfg.depth,
           "num_attention_heads": model_cfg.num_heads, "dropout": model_cfg.dropout,
           "attn_drop": model_cfg.attn_dropout, "tok_dropout": model_cfg.tok_dropout, "class_label_dropout": 0.1,
           "image_seq_len": model_cfg.num_tokens, "condition_num_classes": model_cfg.num_classes,
           "randomize_temperature": 1.0, "guidance_scale": guidance[0], "guidance_scale_pow": guidance[1],
           "use_checkpoint": False}
    cfg = {"model": {"vq_model": {"codebook_size": model_cfg.codebook_size, "token_size": model_cfg.align_z_dim,
                                  "num_latent_tokens": model_cfg.num_tokens},
                     "generator": gen}}
    if optim_cfg is not None:
        cfg["optimizer"] = {"name": "adamw", "params": {"learning_rate": optim_cfg.lr, "beta1": optim_cfg.betas[0],
                                                        "beta2": optim_cfg.betas[1],
                                                        "weight_decay": optim_cfg.weight_decay}}
        cfg["lr_scheduler"] = {"scheduler": "cosine", "params": {"learning_rate": optim_cfg.lr,
                                                                 "warmup_steps": optim_cfg.warmup_steps,
                                                                 "end_lr": optim_cfg.end_lr}}
        cfg["training"] = {"max_train_steps": optim_cfg.total_steps}
    return Config.of(cfg)


def copy_weights(official, ours) -> None:
    """Load our model's weights into the official model (the state-dict names are the same)."""
    official.load_state_dict(ours.inference_state_dict(), strict=True)


def build_official(model_cfg, path: Optional[str] = None) -> tuple:
    """(official ARModel, its ARLoss) for the shape of ``model_cfg``."""
    off = import_official(path)
    cfg = official_config(model_cfg)
    return off.ar.ARModel(cfg), off.losses.ARLoss(cfg)
