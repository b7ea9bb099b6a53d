"""Building the pieces of a run: the generator (partitioned at birth under ZeRO-3), the codebook, sample grids."""
from __future__ import annotations

import contextlib
import logging
import os

import deepspeed
import torch

from rear_ds.models import build_generator, generator_class
from rear_ds.models.generator import ALIGN_PREFIXES, GeneratorBase

log = logging.getLogger("rear_ds")


def build_model(cfg, ds_cfg: dict, zero_stage: int) -> GeneratorBase:
    """Under ZeRO-3 every parameter is partitioned as soon as its module is constructed, so no process
    ever holds the whole model; the generator initialises inside each layer's reset_parameters, which
    zero.Init runs on the full tensor before partitioning it, so the init is the reference one."""
    norm_layer, why = generator_class(cfg.model).norm_layer_for(cfg.train)
    log.info("norm layer: %s.%s (%s)", norm_layer.__module__, norm_layer.__name__, why)
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=zero_stage == 3):
        model = build_generator(cfg.model, with_align_heads=True, norm_layer=norm_layer)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing, cfg.train.checkpoint_every_k)
    if cfg.train.compile:
        import torch

        if not torch.cuda.is_available() or zero_stage == 3:
            # ZeRO-3's parameter-gathering hooks and the CPU path are not worth the compile risk.
            log.warning("train.compile=true ignored (needs a GPU and ZeRO stage < 3)")
        else:
            model.compile_blocks()  # per block: small graphs, same state-dict names
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


def compute_device(model, zero_stage: int) -> torch.device:
    """Where ``model`` computes. Under ZeRO-3 a parameter's own device can be the host (offload_param), so ask
    the accelerator (cuda:i, or cpu) rather than a parameter."""
    if zero_stage != 3:
        return model.device
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


REPLICA_MEMORY_FRACTION = 0.5  # a ZeRO-3 sampling replica may take at most this share of the free memory


def _replica_fits(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` fit in this rank's free memory with room to spare, agreed by all ranks (the two ways
    of sampling run different collectives, so every rank must take the same one)."""
    import torch.distributed as dist

    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    ok = torch.tensor([1 if nbytes <= REPLICA_MEMORY_FRACTION * free else 0], device=device)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


@contextlib.contextmanager
def sampling_model(model, cfg, zero_stage: int):
    """The model to sample from (in eval mode inside the ``with``; its train mode restored after).

    Under ZeRO-3 each rank holds 1/world of every parameter, and every layer's forward gathers its parameters
    from all ranks. Sampling runs the model once per token (256 times per batch), so it would gather the whole
    model 256 times per batch. Instead the parameters are gathered ONCE into a plain replica on this rank's
    device (the align heads left out: sampling does not use them), which then samples with no collective at
    all and is freed at the end. When the replica would not fit (see REPLICA_MEMORY_FRACTION), sampling goes
    through the partitioned model, slower but in the memory training already uses. All ranks must enter
    together under ZeRO-3."""
    was_training = model.training
    try:
        if zero_stage != 3:
            model.eval()
            yield model
            return
        params = [(n, p) for n, p in model.named_parameters() if not n.startswith(ALIGN_PREFIXES)]
        device = compute_device(model, zero_stage)
        nbytes = sum(p.ds_numel * p.element_size() for _, p in params)
        if not _replica_fits(nbytes, device):
            log.warning("sampling through the ZeRO-3 partitioned model (a %.2f GB replica does not fit in %.0f%% "
                        "of the free memory): every token gathers the parameters again", nbytes / 1e9,
                        100 * REPLICA_MEMORY_FRACTION)
            model.eval()
            # the root module's own tables are read outside its forward(): gather them explicitly
            with deepspeed.zero.GatheredParameters(list(model.parameters(recurse=False))):
                yield model
            return
        state = {}
        for name, p in params:  # one parameter at a time: at most the replica + one full tensor in memory
            with deepspeed.zero.GatheredParameters([p]):
                state[name] = p.data.detach().to(device, copy=True)
        with torch.device("meta"):  # the same norm class as the trained model (e.g. apex's or torch's LayerNorm)
            replica = build_generator(cfg.model, with_align_heads=False, norm_layer=type(model.blocks[0].norm1))
        replica.load_state_dict(state, strict=True, assign=True)  # takes the gathered tensors as they are
        del state
        try:
            yield replica.eval().requires_grad_(False)
        finally:
            del replica
            if device.type == "cuda":
                torch.cuda.empty_cache()  # hand the replica's memory back for training's own peaks
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_grid(model, tokenizer, cfg, step: int, out_dir: str, rank: int, zero_stage: int):
    """Samples for train.sample_classes decoded into ``samples/step_<step>.png`` (path on rank 0, else None).
    All ranks call this: under ZeRO-3 every rank must join the parameter gathers."""
    from rear_ds.sampling import generate

    labels = torch.tensor(cfg.train.sample_classes, dtype=torch.long, device=compute_device(model, zero_stage))
    indices = torch.arange(len(labels), device=labels.device)
    cpu_rng = torch.get_rng_state()  # sampling must not shift the training RNG stream
    try:
        with sampling_model(model, cfg, zero_stage) as m:
            tokens = generate(m, labels, indices, cfg.sampling.seed, cfg.sampling)
        images = tokenizer.decode(tokens.to(next(tokenizer.parameters()).device)) if rank == 0 else None
    finally:
        torch.set_rng_state(cpu_rng)
    if rank != 0:
        return None
    from rear_ds.evaluation.grid import save_grid
    from rear_ds.evaluation.references import to_uint8_hwc

    return save_grid(to_uint8_hwc(images), os.path.join(out_dir, "samples", f"step_{step:08d}.png"))
