"""The embedded default: the whole pipeline on a laptop-class CPU in minutes, with proof that it learned.

    python -m rear_ds.demo [--out runs/demo] [--fast]
    python -m rear_ds.demo --golden [--regenerate]        (the regression run, see tests/golden/GOLDEN.md)

Stages, each one the real command run as a subprocess (what a user would type):

  1. dataset     python data_prep/make_toy_dataset.py        10 procedurally drawn classes, ImageNet layout
  2. tokenizer   python data_prep/train_toy_tokenizer.py     small MaskGIT-VQGAN ("toy_vq"), cached; PSNR
  3. classifier  (in-process, cached)                        small CNN on the real toy images
  4. tokenize    python data_prep/tokenize.py                WebDataset token shards + manifest
  5. train       deepspeed --num_gpus 2 rear_ds/train.py --deepspeed_config ds_configs/zero2_bf16.json
                 --config configs/toy.yaml ...               2 CPU processes, ZeRO-2, bf16, reAR regularizers on
  6. export      python -m rear_ds.export
  7. sample      python -m rear_ds.sample (CFG) for the trained model and for an untrained one
  8. evaluate    class consistency (classifier) and token round-trip consistency (decode, re-encode: the
                 share of token positions that survive) for trained / real held-out / untrained; a PNG grid
                 with one row per class; FID through python -m rear_ds.evaluate if REAR_INCEPTION_WEIGHTS
                 names a local Inception weights file.

The run folder (--out) holds everything: data/, tokenizer/, classifier/, shards/, train/ (config.yaml,
log.jsonl, checkpoints/), model.safetensors, samples/, grid.png, metrics.json and logs/ (each stage's
output). A second run reuses the dataset, tokenizer, classifier, shards and the finished training run.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

from rear_ds import cli
from rear_ds.data.shards import write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "toy.yaml")
DS_CONFIG = os.path.join(ROOT, "ds_configs", "zero2_bf16.json")
GOLDEN_FILE = os.path.join(ROOT, "tests", "golden", "toy_losses.json")

# The golden run: small enough for CI, long enough that a change in model / loss / data order /
# optimizer moves the per-step losses. Everything is seeded; the tokenizer is a seeded random init
# (no training: its float argmin ties would make tokens machine dependent).
GOLDEN = {"per_class_train": 12, "per_class_val": 2, "steps": 30, "micro_batch_size": 8}


# A training log line "... INFO step 10/600 | eta 3m05s | loss 4.9500 | ..." (rear_ds.training.metrics).
PROGRESS = re.compile(r"\bstep (\d+)/(\d+) \| eta ")
PROGRESS_KEYS = ("eta", "loss", "samples_per_s", "mfu")


class StageError(RuntimeError):
    pass


def shorten_progress(line: str) -> str:
    """The step, ETA, loss, samples/s and MFU of a trainer log line."""
    fields = line[PROGRESS.search(line).start():].strip().split(" | ")
    return " | ".join(fields[:1] + [f for f in fields[1:] if f.split(" ")[0] in PROGRESS_KEYS])


# ----------------------------------------------------------------------------------------------
# Running stages
# ----------------------------------------------------------------------------------------------


class Runner:
    """Runs subprocesses with their output in <out>/logs/<name>.log, times every stage (printed as [tag])."""

    def __init__(self, out: str, verbose: bool = False, tag: str = "demo"):
        self.out, self.tag = out, tag
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.verbose = verbose
        self.timings: dict = {}
        self.notes: dict = {}

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)  # we may be started from inside another launcher
        return env

    def run(self, name: str, cmd: list, env_extra: dict = None, ok_codes=(0,)) -> str:
        """Run ``cmd`` from the repo root; tee to the log file; raise StageError with the log tail on failure."""
        log_path = os.path.join(self.logs, f"{name}.log")
        env = self.env()
        env.update(env_extra or {})
        print(f"  $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            tail = []
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line])[-40:]
                if self.verbose:
                    sys.stdout.write("    " + line)
                elif PROGRESS.search(line):  # the trainer's step lines, live: a stage can take minutes
                    print("    " + shorten_progress(line), flush=True)
            rc = proc.wait()
        if rc not in ok_codes:
            raise StageError(f"stage {name!r} failed with exit code {rc}; last lines of {log_path}:\n"
                             + "".join(tail))
        return "".join(tail)

    def stage(self, name: str):
        runner = self

        class _Stage:
            def __enter__(self):
                print(f"[{runner.tag}] {name} ...", flush=True)
                self.t0 = time.time()
                return self

            def __exit__(self, *exc):
                runner.timings[name] = round(time.time() - self.t0, 1)
                if exc[0] is None:
                    print(f"[{runner.tag}] {name}: {runner.timings[name]:.1f}s  {runner.notes.get(name, '')}",
                          flush=True)
                return False

        return _Stage()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel(path: str) -> str:
    """A path as the user would type it from the repo root (shorter logs and commands)."""
    r = os.path.relpath(path, ROOT)
    return path if r.startswith("..") else r


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def stage_dataset(r: Runner, paths: dict, golden: bool) -> dict:
    cmd = [sys.executable, "data_prep/make_toy_dataset.py", "--out", rel(paths["data"]), "--no-progress"]
    if golden:
        cmd += ["--per-class-train", str(GOLDEN["per_class_train"]), "--per-class-val", str(GOLDEN["per_class_val"])]
    tail = r.run("dataset", cmd)
    r.notes["dataset"] = tail.strip().splitlines()[-1]
    from rear_ds.toy.dataset import read_manifest

    return read_manifest(paths["data"])


def stage_tokenizer(r: Runner, paths: dict, cfg, golden: bool) -> dict:
    if golden:
        # Seeded random init: deterministic and cheap. (Training it would make the golden run slow and
        # its tokens sensitive to float differences between machines.)
        import torch

        from rear_ds.models.tokenizers.maskgit_vqgan import MaskGITVQGAN
        from rear_ds.models.weights import save_safetensors

        weights = os.path.join(paths["tokenizer"], "toy_vq_random_seed0.safetensors")
        if not os.path.isfile(weights):
            torch.manual_seed(0)
            save_safetensors({k: v.contiguous() for k, v in MaskGITVQGAN(cfg.tokenizer).state_dict().items()}, weights)
        r.notes["tokenizer"] = "seeded random init (golden run)"
        return {"weights": os.path.abspath(weights), "val_psnr_db": None, "reused": True}
    r.run("tokenizer", [sys.executable, "data_prep/train_toy_tokenizer.py", "--data", rel(paths["data"]),
                        "--out", rel(paths["tokenizer"]), "--config", rel(paths["config"]), "--no-progress"])
    from rear_ds.toy.tokenizer_training import WEIGHTS_NAME, read_report

    rep = read_report(paths["tokenizer"])
    rep["weights"] = os.path.join(paths["tokenizer"], WEIGHTS_NAME)  # not the JSON's: the folder may have moved
    reused = "reused" in open(os.path.join(r.logs, "tokenizer.log")).read().splitlines()[-1]
    rep["reused"] = reused
    how = "reused" if reused else ("shipped weights from data_prep/toy_tokenizer/" if rep.get("shipped") else "trained")
    r.notes["tokenizer"] = (f"{how}; held-out PSNR {rep['val_psnr_db']:.2f} dB, "
                            f"codebook usage {rep['val_codebook_usage']:.0%}")
    return rep


def stage_classifier(r: Runner, paths: dict, cfg) -> dict:
    from rear_ds.toy.classifier import ClassifierTrainConfig, ensure_classifier

    _, rep = ensure_classifier(paths["data"], paths["classifier"],
                               ClassifierTrainConfig(image_size=cfg.tokenizer.image_size), progress=False)
    r.notes["classifier"] = f"{'reused' if rep['reused'] else 'trained'}; held-out accuracy {rep['val_accuracy']:.3f}"
    return rep


def shards_are_current(shards: str, data: str, tok_weights: str) -> bool:
    """manifest.json exists and names this tokenizer file and this input listing."""
    man_path = os.path.join(shards, "manifest.json")
    if not os.path.isfile(man_path):
        return False
    from rear_ds.models.tokenizers import tokenizer_weights_sha256

    with open(man_path) as f:
        man = json.load(f)
    text = json.dumps(man.get("tokenizer", {}))
    return tokenizer_weights_sha256(tok_weights) in text and man.get("source", {}).get("path") == os.path.abspath(
        os.path.join(data, "train"))


def stage_tokenize(r: Runner, paths: dict, tok_weights: str) -> dict:
    shards = paths["shards"]
    if shards_are_current(shards, paths["data"], tok_weights):
        r.notes["tokenize"] = f"reused the shards in {rel(shards)} (manifest names this tokenizer and input)"
    else:
        # Shards of another tokenizer / input would be refused by tokenize.py: they are derived data, redo them.
        shutil.rmtree(shards, ignore_errors=True)
        r.run("tokenize", [sys.executable, "data_prep/tokenize.py", "--input", rel(os.path.join(paths["data"], "train")),
                           "--out", rel(shards), "--config", rel(paths["config"]), "--tokenizer-weights", rel(tok_weights),
                           "--images-per-shard", "1000", "--workers", "0", "--batch-size", "250"])
        r.notes["tokenize"] = f"wrote shards to {rel(shards)}"
    with open(os.path.join(shards, "manifest.json")) as f:
        man = json.load(f)
    r.notes["tokenize"] += f" ({man.get('num_samples')} samples)"
    return man


def train_overrides(paths: dict, tok_weights: str, extra: list) -> list:
    return [f"train.out_dir={rel(paths['train'])}", f"data.shards={rel(paths['shards'])}",
            f"tokenizer.weights={os.path.abspath(tok_weights)}", *extra]


def training_is_finished(train_dir: str, cfg) -> bool:
    """The run folder already holds a finished run of exactly this config (so a rerun need not relaunch)."""
    import yaml

    cfg_path, latest = os.path.join(train_dir, "config.yaml"), os.path.join(train_dir, "checkpoints", "latest")
    if not (os.path.isfile(cfg_path) and os.path.isfile(latest)):
        return False
    with open(cfg_path) as f:
        if yaml.safe_load(f) != yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)):
            return False
    from rear_ds.training.metrics import read_run_log

    events = read_run_log(train_dir)[1]
    return bool(events) and events[-1].get("event") == "finished" and events[-1].get("step") == cfg.train.max_steps


def stage_train(r: Runner, paths: dict, tok_weights: str, extra: list, reuse: bool = True, name: str = "train") -> list:
    """Train into paths["train"] (logs/<name>.log); a finished run of the same config is reused (noted as such)."""
    from rear_ds.config import load_config

    if reuse and training_is_finished(paths["train"], load_config(paths["config"], train_overrides(paths, tok_weights, extra))):
        recs = read_log(paths["train"])
        r.notes[name] = (f"reused the finished run in {rel(paths['train'])} (same config); loss "
                         f"{recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}")
        return recs
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "rear_ds/train.py",
           "--deepspeed_config", rel(DS_CONFIG), "--config", rel(paths["config"]),
           *train_overrides(paths, tok_weights, extra)]
    # One OpenMP thread per process: two processes share the two cores instead of fighting over them.
    r.run(name, cmd, env_extra={"OMP_NUM_THREADS": "1"})
    recs = read_log(paths["train"])
    if not recs:
        raise StageError(f"training wrote no loss records to {paths['train']}/log.jsonl")
    r.notes[name] = f"steps {recs[0]['step']}..{recs[-1]['step']}, loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}"
    return recs


def read_log(train_dir: str) -> list:
    """Loss records of log.jsonl in step order, one per step."""
    from rear_ds.training.metrics import read_run_log

    steps = read_run_log(train_dir)[0]
    return [steps[k] for k in sorted(steps)]


def write_untrained(path: str, cfg, seed: int = 0) -> None:
    """A randomly initialised generator in the exported layout (same metadata as rear_ds.export)."""
    import torch

    from rear_ds.models import build_generator
    from rear_ds.models.weights import save_safetensors

    torch.manual_seed(seed)
    model = build_generator(cfg.model, with_align_heads=False)
    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, path,
                     metadata={"rear_config": json.dumps(cfg.to_dict(), sort_keys=True), "step": "0",
                               "dtype": "fp32", "source": f"random init, torch.manual_seed({seed})"})


def _read_chunks(out_dir: str) -> list:
    from rear_ds.evaluation.chunks import CHUNK_RE
    from rear_ds.evaluation.safe_npz import load_npz

    if not os.path.isdir(out_dir):
        return []
    return [load_npz(os.path.join(out_dir, f), "sample chunk") for f in sorted(os.listdir(out_dir)) if CHUNK_RE.match(f)]


def stage_sample(r: Runner, name: str, checkpoint: str, out_dir: str, n: int, sampling: list) -> tuple:
    """python -m rear_ds.sample into out_dir; returns (uint8 images (n,H,W,3), labels (n,), tokens (n, N))."""
    import numpy as np

    if any("tokens" not in c for c in _read_chunks(out_dir)):  # chunks from before they carried the tokens
        shutil.rmtree(out_dir)
    r.run(f"sample_{name}", [sys.executable, "-m", "rear_ds.sample", "--checkpoint", rel(checkpoint),
                             "--out-dir", rel(out_dir), "--num-samples", str(n), "--chunk-size", str(n),
                             "--no-progress", *sampling], env_extra={"OMP_NUM_THREADS": "2"})
    chunks = _read_chunks(out_dir)
    return tuple(np.concatenate([c[k] for c in chunks]) for k in ("images", "labels", "tokens"))


def class_grid(images, labels, num_classes: int, per_row: int, path: str, zoom: int = 2) -> str:
    """One row per class, ``per_row`` samples each, pixels repeated ``zoom`` times (32x32 is tiny)."""
    import numpy as np

    from rear_ds.evaluation.grid import save_grid

    rows = np.concatenate([images[labels == c][:per_row] for c in range(num_classes)])
    rows = rows.repeat(zoom, axis=1).repeat(zoom, axis=2)
    return save_grid(rows, path, nrow=per_row)


def stage_fid(r: Runner, paths: dict, samples_dir: str) -> dict:
    weights = os.environ.get("REAR_INCEPTION_WEIGHTS", "")
    if not weights or not os.path.isfile(weights):
        r.notes["fid"] = "skipped (set REAR_INCEPTION_WEIGHTS to a local Inception weights file to add FID)"
        return {}
    out = os.path.join(paths["out"], "eval")
    r.run("evaluate", [sys.executable, "-m", "rear_ds.evaluate", "--samples", rel(samples_dir), "--reference",
                       rel(os.path.join(paths["data"], "val")), "--inception-weights", weights, "--out", rel(out),
                       "--no-prc", "--is-splits", "1"])
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    r.notes["fid"] = f"see {rel(out)}/results.json"
    return res.get("metrics", res)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def layout(out: str) -> dict:
    out = os.path.abspath(out)
    return {"out": out, "data": os.path.join(out, "data", "toy"), "tokenizer": os.path.join(out, "tokenizer"),
            "classifier": os.path.join(out, "classifier"), "shards": os.path.join(out, "shards"),
            "train": os.path.join(out, "train"), "config": CONFIG}


def prepare(r: Runner, paths: dict, cfg) -> dict:
    """The stages every toy run starts with (dataset, tokenizer, classifier, token shards), each reused when
    current. Returns their metrics; "tokenizer" and "classifier" name the weights files."""
    out = {}
    with r.stage("dataset"):
        out["dataset"] = {k: v for k, v in stage_dataset(r, paths, False).items() if k != "wnids"}
    with r.stage("tokenizer"):
        tok = stage_tokenizer(r, paths, cfg, False)
        out["tokenizer"] = {k: tok.get(k) for k in ("weights", "val_psnr_db", "val_codebook_usage", "reused", "shipped")}
    with r.stage("classifier"):
        clf = stage_classifier(r, paths, cfg)
        out["classifier"] = {k: clf[k] for k in ("weights", "val_accuracy", "reused")}
    with r.stage("tokenize"):
        man = stage_tokenize(r, paths, tok["weights"])
        out["shards"] = {"path": paths["shards"], "num_samples": man.get("num_samples")}
    return out


def run_demo(args) -> dict:
    from rear_ds.config import load_config

    paths = layout(args.out)
    r = Runner(paths["out"], args.verbose)
    cfg = load_config(CONFIG)
    t_start = time.time()
    metrics: dict = {"command": " ".join(sys.argv), "out": paths["out"]}
    metrics.update(prepare(r, paths, cfg))
    tok_weights = metrics["tokenizer"]["weights"]
    extra = []
    if args.fast:  # half the steps, with the schedules scaled to match
        half = cfg.train.max_steps // 2
        extra += [f"train.max_steps={half}", f"optim.total_steps={half}", f"train.ckpt_every={half}",
                  f"objective.anneal_end={max(1, cfg.objective.anneal_end // 2)}"]
    extra += args.overrides
    with r.stage("train"):
        recs = stage_train(r, paths, tok_weights, extra)
        metrics["train"] = {"run_dir": paths["train"], "steps": recs[-1]["step"], "loss_first": recs[0]["loss"],
                            "loss_last": recs[-1]["loss"], "ce_first": recs[0].get("ce"), "ce_last": recs[-1].get("ce"),
                            "token_acc_last": recs[-1].get("token_acc")}
    with r.stage("export"):
        model_path = os.path.join(paths["out"], "model.safetensors")
        untrained_path = os.path.join(paths["out"], "untrained.safetensors")
        if "reused" in r.notes["train"] and os.path.isfile(model_path) and os.path.isfile(untrained_path):
            r.notes["export"] = f"reused {rel(model_path)} (the training run is unchanged)"
        else:
            # New weights: samples of the old ones are stale (rear_ds.sample refuses to mix runs in a folder).
            shutil.rmtree(os.path.join(paths["out"], "samples"), ignore_errors=True)
            r.run("export", [sys.executable, "-m", "rear_ds.export", rel(paths["train"]), rel(model_path)])
            write_untrained(untrained_path, load_config(CONFIG, train_overrides(paths, tok_weights, extra)))
            r.notes["export"] = f"{rel(model_path)} (+ {rel(untrained_path)}, random init)"

    n = cfg.model.num_classes * args.samples_per_class
    sampling = ["--guidance-scale", str(cfg.sampling.guidance_scale), "--seed", str(cfg.sampling.seed)]
    with r.stage("sample"):
        samples = os.path.join(paths["out"], "samples")
        gen_x, gen_y, gen_t = stage_sample(r, "trained", model_path, os.path.join(samples, "trained"), n, sampling)
        unt_x, unt_y, unt_t = stage_sample(r, "untrained", untrained_path, os.path.join(samples, "untrained"), n,
                                           sampling)
        grid = class_grid(gen_x, gen_y, cfg.model.num_classes, min(10, args.samples_per_class),
                          os.path.join(paths["out"], "grid.png"))
        class_grid(unt_x, unt_y, cfg.model.num_classes, min(10, args.samples_per_class),
                   os.path.join(paths["out"], "grid_untrained.png"))
        r.notes["sample"] = f"{n} samples each, CFG scale {cfg.sampling.guidance_scale}; grid {rel(grid)}"

    with r.stage("evaluate"):
        from rear_ds.toy.scoring import ToyScorer

        scorer = ToyScorer(metrics["classifier"]["weights"],
                           load_config(CONFIG, [f"tokenizer.weights={tok_weights}"]).tokenizer, paths["data"])
        scores = {"trained": scorer.score(gen_x, gen_y, gen_t), "real_heldout": scorer.real(),
                  "untrained": scorer.score(unt_x, unt_y, unt_t)}
        metrics["class_consistency"] = {k: v["class_consistency"] for k, v in scores.items()}
        metrics["class_consistency"]["chance"] = round(1.0 / cfg.model.num_classes, 4)
        metrics["round_trip"] = {k: v["round_trip"] for k, v in scores.items()}
        metrics["fid"] = stage_fid(r, paths, os.path.join(paths["out"], "samples", "trained"))
        cc, rt = metrics["class_consistency"], metrics["round_trip"]
        r.notes["evaluate"] = (f"class consistency trained {cc['trained']['consistency']:.3f}, real "
                               f"{cc['real_heldout']['consistency']:.3f}, untrained {cc['untrained']['consistency']:.3f}; "
                               f"token round trip trained {rt['trained']['consistency']:.3f}, real "
                               f"{rt['real_heldout']['consistency']:.3f}")

    metrics["timings_s"] = dict(r.timings, total=round(time.time() - t_start, 1))
    # Keep the timings of the run that did the work (a rerun that reuses everything only takes seconds).
    old_path = os.path.join(paths["out"], "metrics.json")
    old = json.load(open(old_path)) if os.path.isfile(old_path) else {}
    metrics["timings_s_first_run"] = old.get("timings_s_first_run") or old.get("timings_s") or metrics["timings_s"]
    metrics["files"] = {"run_folder": paths["out"], "config": os.path.join(paths["train"], "config.yaml"),
                        "log": os.path.join(paths["train"], "log.jsonl"),
                        "checkpoints": os.path.join(paths["train"], "checkpoints"), "model": model_path,
                        "grid": grid, "metrics": os.path.join(paths["out"], "metrics.json"), "stage_logs": r.logs}
    write_json_atomic(os.path.join(paths["out"], "metrics.json"), metrics, sort_keys=False)
    print_summary(metrics, r)
    return metrics


def print_summary(m: dict, r: Runner) -> None:
    cc, rt = m["class_consistency"], m["round_trip"]
    t = m["train"]
    lines = [
        "",
        "=" * 72,
        f"reAR toy demo finished in {m['timings_s']['total']:.0f}s  (run folder: {rel(m['out'])})",
        "  stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in r.timings.items()),
        f"  tokenizer: held-out PSNR {m['tokenizer']['val_psnr_db']:.2f} dB "
        f"({r.notes.get('tokenizer', '').split(';')[0]})",
        f"  training: {t['steps']} steps, loss {t['loss_first']:.3f} -> {t['loss_last']:.3f} "
        f"(CE {t['ce_first']:.3f} -> {t['ce_last']:.3f})",
        f"  class consistency (classifier on the toy classes; chance {cc['chance']:.2f}):",
        f"      trained model  {cc['trained']['consistency']:.3f}   ({cc['trained']['n']} samples, CFG)",
        f"      real held-out  {cc['real_heldout']['consistency']:.3f}",
        f"      untrained      {cc['untrained']['consistency']:.3f}",
        "  token round-trip consistency (decode, re-encode: share of token positions that survive):",
        f"      trained model  {rt['trained']['consistency']:.3f}   (samples' tokens vs the tokens of their images)",
        f"      real held-out  {rt['real_heldout']['consistency']:.3f}   (the ceiling: encode, decode, encode again)",
        f"      untrained      {rt['untrained']['consistency']:.3f}",
    ]
    if m.get("fid"):
        lines.append(f"  FID etc.: {m['fid']}")
    else:
        lines.append("  FID: " + r.notes.get("fid", "skipped"))
    f = m["files"]
    lines += [f"  grid (one row per class): {rel(f['grid'])}", f"  metrics: {rel(f['metrics'])}",
              f"  config / log / checkpoints: {rel(f['config'])}, {rel(f['log'])}, {rel(f['checkpoints'])}",
              "=" * 72]
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------
# The golden run
# ----------------------------------------------------------------------------------------------


def golden_overrides() -> list:
    g = GOLDEN
    return [f"train.max_steps={g['steps']}", f"train.micro_batch_size={g['micro_batch_size']}", "train.log_every=1",
            f"train.ckpt_every={g['steps']}", "train.seed=0", "optim.warmup_steps=5", f"optim.total_steps={g['steps']}",
            f"objective.anneal_end={g['steps']}", "data.num_workers=0", "data.shuffle_buffer=64"]


def run_golden(out: str, verbose: bool = False) -> list:
    """Run the shortened deterministic demo from scratch in ``out``; returns the per-step log records."""
    from rear_ds.config import load_config

    paths = layout(out)
    for key in ("shards", "train"):  # always from scratch: a resumed run would not re-log the steps
        shutil.rmtree(paths[key], ignore_errors=True)
    r = Runner(paths["out"], verbose)
    cfg = load_config(CONFIG)
    with r.stage("dataset"):
        stage_dataset(r, paths, golden=True)
    with r.stage("tokenizer"):
        tok = stage_tokenizer(r, paths, cfg, golden=True)
    with r.stage("tokenize"):
        stage_tokenize(r, paths, tok["weights"])
    with r.stage("train"):
        return stage_train(r, paths, tok["weights"], golden_overrides(), reuse=False)


def golden_record(recs: list) -> dict:
    keys = ("loss", "ce", "enc_align", "dec_align", "token_acc")
    return {"steps": [rec["step"] for rec in recs], **{k: [rec.get(k) for rec in recs] for k in keys},
            "settings": dict(GOLDEN, overrides=golden_overrides(), config="configs/toy.yaml",
                             ds_config="ds_configs/zero2_bf16.json", processes=2)}


def main(argv=None) -> int:
    p = cli.parser(__doc__, "python -m rear_ds.demo", "rear-demo")
    p.add_argument("--out", default=None, help="run folder (default: runs/demo in the current directory; "
                   "--golden: runs/golden in the checkout)")
    p.add_argument("--fast", action="store_true", help="half the training steps: a quicker look that does not reach the 0.8 class consistency")
    p.add_argument("--samples-per-class", type=int, default=20, help="samples per class to generate and score")
    p.add_argument("--golden", action="store_true", help="run the shortened deterministic regression run "
                   "and compare its per-step losses with tests/golden/toy_losses.json")
    p.add_argument("--regenerate", action="store_true", help="with --golden: overwrite the golden file")
    p.add_argument("--verbose", action="store_true", help="echo every stage's output")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for training")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(ROOT, "data_prep")):  # a wheel install has the package only
        p.error(f"the demo runs the repository's scripts (data_prep/, configs/), which are not beside {ROOT}: "
                "install from a checkout with `pip install -e .`")
    try:
        if args.golden:
            recs = run_golden(args.out or os.path.join(ROOT, "runs", "golden"), args.verbose)
            new = golden_record(recs)
            if args.regenerate:
                os.makedirs(os.path.dirname(GOLDEN_FILE), exist_ok=True)
                with open(GOLDEN_FILE, "w") as f:  # one line per series: readable diffs in review
                    f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in new.items()) + "\n}\n")
                print(f"[demo] wrote {rel(GOLDEN_FILE)} ({len(new['loss'])} steps)")
                return 0
            from rear_ds.toy.golden import compare

            problems = compare(new, GOLDEN_FILE)
            print("[demo] golden run matches" if not problems else "[demo] golden run differs:\n  " + "\n  ".join(problems))
            return 1 if problems else 0
        args.out = args.out or os.path.join("runs", "demo_fast" if args.fast else "demo")  # from where it is started
        run_demo(args)
        return 0
    except StageError as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
