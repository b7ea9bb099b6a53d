"""Checks that must fail before any model is built or any data is read, each naming the key or file."""
from __future__ import annotations

import glob
import os

from rear_ds.config import Config, ConfigError


def check_paths(cfg: Config) -> None:
    """Data and tokenizer files exist (cfg.validate(need_data=True) has already checked the keys)."""
    d = cfg.data
    if d.jsonl and not os.path.isfile(d.jsonl):
        raise ConfigError(f"data.jsonl={d.jsonl!r}: file does not exist")
    if d.shards:
        if "{" in d.shards or d.shards.endswith(".tar"):
            first = d.shards.split("{")[0]
            if not (glob.glob(first + "*") or os.path.exists(d.shards)):
                raise ConfigError(f"data.shards={d.shards!r}: no shard files match")
        elif not os.path.isdir(d.shards):
            raise ConfigError(f"data.shards={d.shards!r}: folder does not exist")
        elif not os.path.isfile(os.path.join(d.shards, "manifest.json")):
            raise ConfigError(f"data.shards={d.shards!r}: no manifest.json in that folder")
    t = cfg.tokenizer
    if t.weights and not os.path.isfile(t.weights):
        raise ConfigError(f"tokenizer.weights={t.weights!r}: file does not exist")
    if not t.weights and not cfg.train.allow_random_tokenizer:
        raise ConfigError("tokenizer.weights is not set: training needs the tokenizer's codebook (the alignment "
                          "targets). Set tokenizer.weights=/path/to/weights, or for tests and toy runs only, "
                          "train.allow_random_tokenizer=true to use a randomly initialised codebook.")


def check_data(cfg: Config) -> None:
    """The token shards' manifest agrees with the model and the tokenizer (family, codebook size, token layout,
    sequence length: shards.check_manifest; the tokenizer weights' sha256 when the manifest records it).
    Reads manifest.json only, no shard."""
    from rear_ds.data import shards as S

    d = cfg.data
    if not d.shards:
        return
    folder = d.shards if os.path.isdir(d.shards) else os.path.dirname(d.shards)
    mpath = os.path.join(folder, S.MANIFEST)
    try:
        m = S.load_manifest(folder)
    except S.ShardError as e:
        raise ConfigError(f"data.shards={d.shards!r}: {e}") from None
    S.check_manifest(m, mpath, cfg.model, cfg.tokenizer)
    tc, tok = cfg.tokenizer, m.get("tokenizer") or {}
    sha = tok.get("weights_sha256")
    if sha and tc.weights and os.path.isfile(tc.weights):
        from rear_ds.models.tokenizers import tokenizer_weights_sha256

        have = tokenizer_weights_sha256(tc.weights)
        if have != sha:
            raise ConfigError(f"tokenizer.weights={tc.weights!r} (sha256 {have[:12]}...) is not the tokenizer the "
                              f"shards in {folder} were made with (manifest {mpath}: sha256 {sha[:12]}...)")


def check_resume(cfg: Config) -> None:
    """A checkpoint in the run folder that we would resume from must be of the same architecture: its
    rear_config.json is compared with the model section (and the tokenizer's codebook size)."""
    import json

    from rear_ds.training import checkpoint as ckpt

    ckpt_dir = os.path.join(cfg.train.out_dir, "checkpoints")
    resume = ckpt.find_resume(ckpt_dir)
    if resume is None:
        return
    path = os.path.join(ckpt_dir, resume.tag, "rear_config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, resume.tag)} has no readable rear_config.json "
                          f"({e}); cannot tell whether it fits this model. Move it away or fix it.") from None
    now = cfg.to_dict()
    diffs = [f"model.{k}: checkpoint {v!r}, config {now['model'].get(k)!r}"
             for k, v in sorted((saved.get("model") or {}).items())
             if now["model"].get(k) != v and "dropout" not in k]  # dropout rates do not change the weights
    tk = "codebook_size"
    if (saved.get("tokenizer") or {}).get(tk, now["tokenizer"][tk]) != now["tokenizer"][tk]:
        diffs.append(f"tokenizer.{tk}: checkpoint {saved['tokenizer'][tk]!r}, config {now['tokenizer'][tk]!r}")
    if diffs:
        raise ConfigError(f"train.out_dir={cfg.train.out_dir!r} holds checkpoint {os.path.join(ckpt_dir, resume.tag)} "
                          f"of another architecture, which this run would resume from: {'; '.join(diffs)}. "
                          "Use another train.out_dir, or the config the checkpoint was trained with.")


def check_shared_out_dir(out_dir: str) -> None:
    """Collective, after rank 0 created ``out_dir``: every rank must see that same folder. On several nodes it
    must be on a file system they share; a node-local folder of the same name would take each node's part of
    every checkpoint where rank 0, which commits it, never looks (a COMPLETE checkpoint that cannot be loaded).
    Rank 0 writes a file with a fresh name there (no NFS client has a cached answer for a new name), every
    rank reads it back; raises ConfigError on every rank, naming those that did not find it."""
    import socket
    import uuid

    import torch.distributed as dist

    from rear_ds.training.launch_env import gather_problems

    if dist.get_world_size() == 1:
        return
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f".shared-check-{token[0]}"), "w") as f:
            f.write(token[0])
    dist.broadcast_object_list(token, src=0)  # after the write
    path = os.path.join(out_dir, f".shared-check-{token[0]}")
    try:
        with open(path) as f:
            problem = None if f.read() == token[0] else f"{path} holds something else"
    except OSError as e:
        problem = (f"{os.path.abspath(out_dir)} on host {socket.gethostname()} lacks the file rank 0 just wrote "
                   f"({e.strerror})")
    problems = gather_problems(problem)
    if dist.get_rank() == 0:
        os.remove(path)
    if problems:
        raise ConfigError(f"train.out_dir={out_dir!r} is not one folder shared by all ranks: {'; '.join(problems)}. "
                          "Put it on a file system every node mounts (checkpoints are written by all ranks into it).")
