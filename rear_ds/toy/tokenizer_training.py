"""Training the small "toy_vq" tokenizer (MaskGIT-VQGAN architecture) on the toy images.

Objective (a plain VQ-VAE, no GAN or perceptual loss: the toy images are flat shapes):

    z = E(x);  k = argmin_j |z - e_j|^2;  zq = z + sg(e_k - z)     (straight-through)
    L = MSE(D(zq), x) + 0.5 * L1(D(zq), x) + beta * |z - sg(e_k)|^2  (commitment)

The codebook is not trained by gradient but by an exponential moving average of the encoder outputs
assigned to each code (VQ-VAE-2 style), which converges much faster in the few hundred steps we can
afford on a CPU. Codes left unused for a while are restarted on random encoder outputs of the
current batch, so the whole codebook stays in use.

The result is cached: ``<out_dir>/toy_vq.safetensors`` plus ``toy_vq.json`` holding the cache key
(tokenizer config + training settings + dataset pixel hash + code version) and the held-out PSNR.
A later call with the same key reuses the file instead of training again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from rear_ds.config import TokenizerConfig
from rear_ds.data.shards import write_json_atomic
from rear_ds.models.tokenizers import build_tokenizer
from rear_ds.models.tokenizers.maskgit_vqgan import MaskGITVQGAN
from rear_ds.models.weights import save_safetensors
from rear_ds.toy.dataset import load_split, read_manifest

CODE_VERSION = 1  # bump when the training procedure changes (invalidates cached weights)
WEIGHTS_NAME = "toy_vq.safetensors"
REPORT_NAME = "toy_vq.json"
# Weights shipped in the repo (made by data_prep/train_toy_tokenizer.py with the default settings on the
# default toy dataset), used when their cache key matches, so the demo does not spend minutes training them.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "data_prep", "toy_tokenizer")


@dataclass
class VQTrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20  # learning-rate warmup steps
    ae_steps: int = 100  # first train as a plain autoencoder (no quantizer), then start the codebook
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.9
    dead_after: int = 20  # steps without any assignment before a code is restarted
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Cache key / report
# ----------------------------------------------------------------------------------------------


def arch_dict(cfg: TokenizerConfig) -> dict:
    """The tokenizer config minus what the toy VQ weights do not depend on: the weights path and the other
    families' knobs (a new AliTok field must not invalidate the shipped weights)."""
    d = asdict(cfg)
    d.pop("weights", None)
    d.pop("alitok", None)
    d["channel_mult"] = list(d["channel_mult"])
    return d


def cache_key(cfg: TokenizerConfig, train_cfg: VQTrainConfig, data_sha256: str) -> str:
    blob = json.dumps({"arch": arch_dict(cfg), "train": asdict(train_cfg), "data": data_sha256,
                       "code_version": CODE_VERSION, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_report(out_dir: str) -> dict:
    path = os.path.join(out_dir, REPORT_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Training pieces
# ----------------------------------------------------------------------------------------------


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [0, 1]."""
    return rearrange(torch.from_numpy(images), "n h w c -> n c h w").float().div_(255.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the per-image PSNR in dB (peak 1.0)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


class EMACodebook:
    """EMA codebook updates + dead-code restarts for a :class:`VectorQuantizer`'s embedding."""

    def __init__(self, weight: torch.Tensor, decay: float, dead_after: int):
        self.weight = weight  # the nn.Embedding weight, updated in place
        self.decay = decay
        self.dead_after = dead_after
        k = weight.shape[0]
        self.cluster_size = torch.ones(k)
        self.embed_sum = weight.detach().clone()
        self.idle = torch.zeros(k, dtype=torch.long)

    @torch.no_grad()
    def update(self, flat_z: torch.Tensor, ids: torch.Tensor, gen: torch.Generator) -> int:
        """One EMA step from encoder outputs (n, z) and their code ids (n,). Returns #restarted codes."""
        k = self.weight.shape[0]
        onehot = F.one_hot(ids, k).float()
        counts = onehot.sum(0)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.t() @ flat_z, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing
        self.weight.copy_(self.embed_sum / smoothed[:, None])
        # Dead codes: restart them on random encoder outputs (plus a little noise) so they get used.
        self.idle = torch.where(counts > 0, torch.zeros_like(self.idle), self.idle + 1)
        dead = (self.idle >= self.dead_after).nonzero().flatten()
        if len(dead):
            pick = torch.randint(0, flat_z.shape[0], (len(dead),), generator=gen)
            new = flat_z[pick] + 0.01 * flat_z.std() * torch.randn(len(dead), flat_z.shape[1], generator=gen)
            self.weight[dead] = new
            self.embed_sum[dead] = new
            self.cluster_size[dead] = 1.0
            self.idle[dead] = 0
        return len(dead)


def vq_step(model: MaskGITVQGAN, x: torch.Tensor, beta: float, quantize: bool = True):
    """Forward pass with straight-through quantization. Returns (loss, recon, flat z, ids or None).

    ``quantize=False`` is the plain-autoencoder warm-up: the decoder sees z itself.
    """
    z = model.encoder(x)
    flat = rearrange(z.detach(), "b c h w -> (b h w) c")
    if not quantize:
        recon = model.decoder(z)
        return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x), recon, flat, None
    ids = model.quantize.nearest(z.detach())
    e = rearrange(model.quantize.embedding.weight.detach()[ids], "b h w c -> b c h w")
    zq = z + (e - z).detach()
    recon = model.decoder(zq)
    loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + beta * F.mse_loss(z, e)
    return loss, recon, flat, ids.flatten()


@torch.no_grad()
def init_codebook(model: MaskGITVQGAN, images: torch.Tensor, gen: torch.Generator, n_images: int = 256) -> None:
    """Codebook rows := distinct random encoder outputs of ``n_images`` training images."""
    idx = torch.randperm(len(images), generator=gen)[:n_images]
    z = torch.cat([model.encoder(images[idx[i:i + 64]]) for i in range(0, len(idx), 64)])
    z = rearrange(z, "b c h w -> (b h w) c")
    k = model.quantize.embedding.weight.shape[0]
    pick = torch.randperm(len(z), generator=gen)[:k]
    if len(pick) < k:
        pick = torch.cat([pick, torch.randint(0, len(z), (k - len(pick),), generator=gen)])
    model.quantize.embedding.weight.copy_(z[pick])


@torch.no_grad()
def evaluate_psnr(tok, images: torch.Tensor, batch: int = 100) -> tuple:
    """(PSNR in dB of encode -> decode on ``images``, fraction of the codebook used)."""
    recons, used = [], set()
    for i in range(0, len(images), batch):
        ids = tok.encode(images[i:i + batch])
        used.update(ids.unique().tolist())
        recons.append(tok.decode(ids))
    return psnr(torch.cat(recons), images), len(used) / tok.codebook_size


def train_vq(cfg: TokenizerConfig, train_images: torch.Tensor, tcfg: VQTrainConfig,
             progress: bool = True) -> tuple:
    """Train a toy_vq tokenizer from scratch. Returns (model in eval mode, history dict)."""
    from tqdm import tqdm

    torch.manual_seed(tcfg.seed)
    gen = torch.Generator().manual_seed(tcfg.seed)
    model = MaskGITVQGAN(cfg).to(memory_format=torch.channels_last)
    model.quantize.embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=tcfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / tcfg.warmup) * (
        0.5 * (1 + math.cos(math.pi * min(1.0, s / tcfg.steps))) * 0.9 + 0.1))
    ema = None  # created when the autoencoder warm-up ends
    history = {"loss": [], "restarts": 0}
    model.train()
    n = len(train_images)
    bar = tqdm(range(tcfg.steps), desc="toy tokenizer", disable=not progress)
    for step in bar:
        idx = torch.randint(0, n, (tcfg.batch_size,), generator=gen)
        x = train_images[idx]
        flip = torch.rand(len(x), generator=gen) < 0.5  # the shards hold flipped views too
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous(memory_format=torch.channels_last)
        if step == tcfg.ae_steps:
            # The encoder now gives meaningful latents: seed the codebook with them (far fewer dead
            # codes and a much faster start than quantizing from step 0 with a random encoder).
            init_codebook(model, train_images, gen)
            ema = EMACodebook(model.quantize.embedding.weight, tcfg.ema_decay, tcfg.dead_after)
        loss, recon, flat, ids = vq_step(model, x, tcfg.beta, quantize=ema is not None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            history["restarts"] += ema.update(flat, ids, gen)
        history["loss"].append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}", psnr=f"{psnr(recon.detach().clamp(0, 1), x):.1f}")
    model.quantize.embedding.weight.requires_grad_(True)
    return model.eval().requires_grad_(False), history


def ensure_tokenizer(cfg: TokenizerConfig, data_root: str, out_dir: str, tcfg: VQTrainConfig = None,
                     progress: bool = True, log=print, use_shipped: bool = True) -> tuple:
    """Train (or reuse) the toy tokenizer for the dataset at ``data_root``; returns (weights path, report).

    Reused when ``<out_dir>/toy_vq.json`` carries the same cache key and the weights file exists. Otherwise,
    with ``use_shipped``, the weights shipped in data_prep/toy_tokenizer/ are copied when their cache key
    matches (same architecture, VQ settings and dataset pixels), and their held-out PSNR is measured again here.
    """
    tcfg = tcfg or VQTrainConfig()
    man = read_manifest(data_root)
    if not man:
        raise FileNotFoundError(f"no toy dataset at {data_root!r}: run data_prep/make_toy_dataset.py first")
    key = cache_key(cfg, tcfg, man["pixels_sha256"])
    weights = os.path.join(out_dir, WEIGHTS_NAME)
    report = read_report(out_dir)
    if report.get("cache_key") == key and os.path.isfile(weights):
        report.update(reused=True, weights=os.path.abspath(weights))  # the folder may have been moved
        return weights, report

    val_x = to_tensor(load_split(data_root, "val", cfg.image_size)[0])
    shipped = read_report(SHIPPED_DIR) if use_shipped else {}
    if shipped.get("cache_key") == key and os.path.isfile(os.path.join(SHIPPED_DIR, WEIGHTS_NAME)):
        import shutil

        os.makedirs(out_dir, exist_ok=True)
        shutil.copyfile(os.path.join(SHIPPED_DIR, WEIGHTS_NAME), weights)
        tok = build_tokenizer(dataclasses.replace(cfg, weights=weights))
        val_psnr, usage = evaluate_psnr(tok, val_x)
        report = dict(shipped, weights=os.path.abspath(weights), shipped=True,
                      val_psnr_db=round(val_psnr, 3), val_codebook_usage=round(usage, 4))
        _write_report(out_dir, report)
        log(f"toy tokenizer: using the weights shipped in {SHIPPED_DIR} (same settings and data; "
            f"made by data_prep/train_toy_tokenizer.py; pass --retrain to train your own)")
        report["reused"] = False
        return weights, report

    t0, c0 = time.time(), time.process_time()
    train_x = to_tensor(load_split(data_root, "train", cfg.image_size)[0])
    model, hist = train_vq(cfg, train_x, tcfg, progress)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, weights, metadata={"toy_vq_cache_key": key})
    # Evaluate through the public path (build_tokenizer + strict load), exactly as the pipeline will.
    tok = build_tokenizer(dataclasses.replace(cfg, weights=weights))
    val_psnr, usage = evaluate_psnr(tok, val_x)
    report = {
        "cache_key": key, "weights": os.path.abspath(weights), "tokenizer": arch_dict(cfg), "train": asdict(tcfg),
        "data_sha256": man["pixels_sha256"], "val_psnr_db": round(val_psnr, 3), "val_codebook_usage": round(usage, 4),
        "num_val_images": len(val_x), "loss_first": hist["loss"][0], "loss_last": hist["loss"][-1],
        "code_restarts": hist["restarts"], "train_seconds": round(time.time() - t0, 1),
        # CPU seconds over all threads: on a busy shared machine this / threads estimates an idle machine's time
        "train_cpu_seconds": round(time.process_time() - c0, 1), "threads": torch.get_num_threads(),
    }
    _write_report(out_dir, report)
    report["reused"] = False
    return weights, report


def _write_report(out_dir: str, report: dict) -> None:
    write_json_atomic(os.path.join(out_dir, REPORT_NAME), report, sort_keys=False)
