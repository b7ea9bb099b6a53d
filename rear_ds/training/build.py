"""Building the pieces of a run: the generator (partitioned at birth under ZeRO-3), the codebook, sample grids."""
from __future__ import annotations

import logging
import os

import deepspeed
import torch

from rear_ds.models.generator import ReARGenerator

log = logging.getLogger("rear_ds")


def build_model(cfg, ds_cfg: dict, zero_stage: int) -> ReARGenerator:
    """Under ZeRO-3 every parameter is partitioned as soon as its module is constructed, so no process
    ever holds the whole model; the generator initialises inside each layer's reset_parameters, which
    zero.Init runs on the full tensor before partitioning it, so the init is the reference one."""
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=zero_stage == 3):
        model = ReARGenerator(cfg.model, with_align_heads=True)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing, cfg.train.checkpoint_every_k)
    if cfg.train.compile:
        import torch

        if not torch.cuda.is_available() or zero_stage == 3:
            # ZeRO-3's parameter-gathering hooks and the CPU path are not worth the compile risk.
            log.warning("train.compile=true ignored (needs a GPU and ZeRO stage < 3)")
        else:
            for block in model.blocks:
                block.compile()  # per block: small graphs, same state-dict names
    return model


def build_codebook(cfg, device):
    """The frozen tokenizer and its (K, z) codebook matrix (the alignment targets)."""
    from rear_ds.models.tokenizers import build_tokenizer

    random_weights = not cfg.tokenizer.weights  # only reachable with train.allow_random_tokenizer
    if random_weights:
        log.warning("tokenizer.weights is empty and train.allow_random_tokenizer=true: using a RANDOM "
                    "codebook (alignment targets and sample grids are meaningless; tests/toy runs only)")
    tokenizer = build_tokenizer(cfg.tokenizer, load_weights=not random_weights, device=device)
    with torch.no_grad():
        ids = torch.arange(cfg.model.codebook_size, device=device)
        codebook = tokenizer.codebook_vectors(ids).float()
    return tokenizer, codebook


@torch.no_grad()
def sample_grid(model, tokenizer, cfg, step: int, out_dir: str, rank: int, zero_stage: int):
    """Samples for train.sample_classes decoded into ``samples/step_<step>.png`` (path on rank 0, else None).
    All ranks call this: under ZeRO-3 every rank must join the parameter gathers."""
    from rear_ds.sampling import generate

    labels = torch.tensor(cfg.train.sample_classes, dtype=torch.long, device=model.pos_embed.device)
    indices = torch.arange(len(labels), device=labels.device)
    cpu_rng = torch.get_rng_state()  # sampling must not shift the training RNG stream
    was_training = model.training
    model.eval()
    try:
        # The root module's own tables are read outside its forward(); gather them explicitly (ZeRO-3).
        own = list(model.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, enabled=zero_stage == 3):
            tokens = generate(model, labels, indices, cfg.sampling.seed, cfg.sampling)
        images = tokenizer.decode(tokens.to(next(tokenizer.parameters()).device)) if rank == 0 else None
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
    if rank != 0:
        return None
    from rear_ds.training.metrics import save_grid

    path = os.path.join(out_dir, "samples", f"step_{step:08d}.png")
    save_grid(images, path)
    return path
