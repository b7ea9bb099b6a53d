"""Train reAR with DeepSpeed.

    deepspeed rear_ds/train.py --deepspeed_config ds_configs/zero2_bf16.json --config configs/tiny.yaml \\
        train.out_dir=runs/x train.max_steps=100
    torchrun --nproc_per_node 8 rear_ds/train.py --deepspeed_config ... --config ...
    srun python rear_ds/train.py --deepspeed_config ... --config ...          (rank/world from SLURM_*)

The run folder (train.out_dir) holds config.yaml, ds_config.json, log.jsonl, wandb_id, samples/*.png and
checkpoints/ (see rear_ds/training/checkpoint.py). A relaunch resumes from checkpoints/latest by itself.

Precision (train.precision, matching the DeepSpeed JSON): "bf16" keeps the module's weights in bf16 for
forward/backward with fp32 master weights and fp32 Adam states in the (ZeRO) optimizer; "bf16_autocast"
keeps fp32 weights and gradients and runs the engine's forward under torch.autocast(bf16), as the reference
does. Either way the loss and its terms are computed in fp32 (the objective casts logits and features), and
gradients are clipped to norm 1.0 by DeepSpeed.
"""
from __future__ import annotations

import logging
import os
import random
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a script by the launchers: make `rear_ds` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from rear_ds import cli
from rear_ds.config import ConfigError, config_json, load_config, save_config
from rear_ds.data.shards import write_json_atomic
from rear_ds.training import ds_config as dsc
from rear_ds.training import launch_env, preflight, signals

log = logging.getLogger("rear_ds")


def help_epilog() -> str:
    """The config sections with the first sentence of their dataclass's docstring, where keys are documented,
    and the exit codes."""
    import dataclasses

    from rear_ds import config

    rows = []
    for f in dataclasses.fields(config.Config):  # f.type is the class name (postponed annotations)
        first = getattr(config, f.type).__doc__.split(". ")[0].strip().rstrip(".")
        rows.append(f"  {f.name:10s} {f.type:16s} {first}")
    sections = "\n".join(rows)
    return (f"config sections (the YAML's top level; override any key as section.key=value):\n{sections}\n"
            f"Every key with its default and meaning: the section's dataclass in\n  {config.__file__}\n"
            f"Worked examples: configs/*.yaml; the README's \"Training\" section explains the choices.\n\n"
            f"exit codes:\n  {signals.EXIT_OK}   finished\n  {signals.EXIT_PREEMPTED}  stopped by SIGTERM/SIGUSR1 "
            f"after writing a checkpoint (slurm/train.sh requeues the job)\n  {signals.EXIT_ERROR}   error "
            f"(a bad config is found before anything is built)")


def parse_args(argv=None):
    p = cli.parser(__doc__, "rear_ds/train.py", epilog=help_epilog())
    p.add_argument("--config", required=True,
                   help="YAML experiment config (configs/*.yaml; a relative path not found here is looked up "
                   "in the rear_ds checkout)")
    p.add_argument("--deepspeed_config", required=True,
                   help="DeepSpeed JSON (ds_configs/*.json, looked up the same way)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; unused")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    return p.parse_args(argv)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        env = launch_env.detect()
    except launch_env.LaunchError as e:
        setup_logging(0)
        log.error("launch error: %s", e)
        return signals.EXIT_ERROR
    setup_logging(env.rank)
    # 1. Everything that can be wrong in the config fails here: no model or data yet, nothing written.
    cfg, problem = None, None
    try:
        cfg = load_config(args.config, args.overrides, need_data=True)
        preflight.check_paths(cfg)
        preflight.check_data(cfg)
        preflight.check_resume(cfg)
        pinned = dsc.pin_global_batch(cfg, env.world_size)
        if pinned:
            log.info("%s", pinned)
        ds_cfg = dsc.resolve(dsc.load_json(args.deepspeed_config), cfg, env.world_size, args.deepspeed_config)
        for note in dsc.precision_warnings(ds_cfg, cfg):
            log.warning("%s", note)
    except ConfigError as e:
        problem = str(e)
    if problem and env.world_size == 1:
        log.error("config error: %s", problem)
        return signals.EXIT_ERROR
    # The ranks agree on the checks (a file missing on one node only): all stop, or none waits for the others.
    from rear_ds.config import TrainConfig

    timeout_s = cfg.train.collective_timeout_s if cfg else TrainConfig.collective_timeout_s
    device = launch_env.init_distributed(env, timeout_s)
    problems = launch_env.gather_problems(problem)
    if problems:
        log.error("config error: %s", "; ".join(problems) if env.rank == 0 else problem or
                  f"on other ranks: {'; '.join(problems)}")
        return signals.EXIT_ERROR
    try:
        return train(cfg, ds_cfg, env, device)
    except ConfigError as e:  # found once the ranks can compare (train.out_dir not shared)
        log.error("config error: %s", e)
        return signals.EXIT_ERROR
    except Exception as e:
        log.exception("training failed on rank %d", env.rank)
        if env.world_size > 1:  # a timed-out or broken collective: say which peer stopped, if we can tell
            peers = launch_env.describe_peers(cfg.train.out_dir, env.rank, env.world_size)
            if peers:
                log.error("rank %d (%s: %s): state of the other ranks: %s", env.rank, type(e).__name__,
                          str(e).splitlines()[0][:200] if str(e) else "", peers)
        return signals.EXIT_ERROR


def survival_summary(cfg) -> str:
    """One line: what this run survives and how (see README, "What survives what")."""
    t = cfg.train
    return (f"survives: kill/crash -> relaunch resumes from the last complete checkpoint (every {t.ckpt_every} "
            f"steps, keep {t.keep_last}); SIGTERM/SIGUSR1 -> checkpoint + exit {signals.EXIT_PREEMPTED}; "
            f"disk full -> checkpoint skipped, training goes on (exit {signals.EXIT_ERROR} if it was the final one); "
            f"corrupt shard -> {'skipped and counted' if cfg.data.on_corrupt_shard == 'skip' else 'error'}; "
            f"dead/hung rank -> collective timeout {t.collective_timeout_s} s, exit {signals.EXIT_ERROR}")


def train(cfg, ds_cfg: dict, env, device) -> int:
    import deepspeed
    import torch.distributed as dist

    from rear_ds.backends import enable_fast_kernels
    from rear_ds.data.reader import ReaderStateError, build_train_loader
    from rear_ds.models import count_parameters, flops_per_sample
    from rear_ds.objective import ReARObjective
    from rear_ds.training import build, checkpoint as ckpt, eval_hook, metrics, optim

    enable_fast_kernels()
    signals.install()
    rank, world, t = env.rank, env.world_size, cfg.train
    ckpt_dir = os.path.join(t.out_dir, "checkpoints")
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        save_config(cfg, os.path.join(t.out_dir, "config.yaml"))
        ckpt.clean_partial(ckpt_dir)
    preflight.check_shared_out_dir(t.out_dir)
    heartbeat = launch_env.Heartbeat(t.out_dir, rank)
    launch_env.watch_for_stalls(heartbeat, t.out_dir, world, stall_s=0.8 * t.collective_timeout_s,
                                poll_s=min(30.0, t.collective_timeout_s / 20))

    # 2. Where do we start? Rank 0 decides for all (file listings can differ between the nodes' NFS
    # clients for a while). Another process count or ZeRO stage (whose files are laid out differently) goes
    # through a universal checkpoint.
    found = [ckpt.find_resume(ckpt_dir) if rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    resume = found[0]
    load_tag = resume.tag if resume else None
    stage = dsc.zero_stage(ds_cfg)
    if resume:  # DeepSpeed unpickles with weights_only=False: refuse files that would run code
        ckpt.verify_no_code_on_all_ranks(os.path.join(ckpt_dir, resume.tag))
    relayout = [f"{what} changed ({was} -> {now})" for what, was, now in (
        ("process count", resume.world_size, world), ("ZeRO stage", resume.zero_stage, stage)) if was != now] \
        if resume else []
    if relayout:
        log.info("%s: resuming through a universal checkpoint", "; ".join(relayout))
        load_tag = ckpt.ensure_universal(ckpt_dir, resume.tag)
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
    if rank == 0:
        write_json_atomic(os.path.join(t.out_dir, "ds_config.json"), ds_cfg, sort_keys=False)

    # 3. Model, optimizer, schedule. Same init on every rank; then per-rank streams for dropout.
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    model = build.build_model(cfg, ds_cfg, stage)
    optimizer, opt_impl = optim.build_optimizer(model, cfg.optim, device, dsc.offloads_optimizer(ds_cfg))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_cfg,
        lr_scheduler=lambda opt: optim.build_scheduler(opt, cfg.optim))
    tokenizer, codebook = build.build_codebook(cfg, device)
    objective = ReARObjective(cfg.objective, cfg.model)
    gen = torch.Generator(device=device)
    gen.manual_seed(t.seed * 1000 + rank + 1)  # the objective's perturbation / class-dropout draws
    random.seed(t.seed + rank)
    np.random.seed(t.seed + rank)
    torch.manual_seed(t.seed + rank)  # dropout

    # 4. Resume: weights, optimizer, schedule, step, RNGs and the data position.
    step, samples_seen, wandb_id, mine, saved_world = 0, 0, None, None, None
    if resume:
        path, client = engine.load_checkpoint(ckpt_dir, tag=load_tag)
        if path is None:
            raise RuntimeError(f"could not load checkpoint {os.path.join(ckpt_dir, load_tag)}")
        optim.place_optimizer_state(engine.optimizer)  # e.g. a universal checkpoint's CPU `step` tensors
        step, samples_seen = int(client["step"]), int(client["samples_seen"])
        wandb_id, saved_world = client.get("wandb_id"), client.get("world_size")
        mine = ckpt.own_rank_state(client, rank, world, universal=bool(relayout))
        log.info("resumed from %s: step %d, %d samples seen%s", os.path.join(ckpt_dir, load_tag), step,
                 samples_seen, f" (universal checkpoint: {resume.world_size} -> {world} processes, ZeRO "
                 f"{resume.zero_stage} -> {stage})" if relayout else "")
    else:
        log.info("no complete checkpoint in %s: starting from scratch", ckpt_dir)
    exact = mine is not None
    # An exact resume continues the saved streams, with the seed they were started from (t.seed, or
    # t.seed + k after an earlier change of process count). When they cannot be continued (another process
    # count or micro-batch, shards, data.num_workers of the resampled order, ...), the epoch order continues at
    # its global position, other streams start from a seed that depends on the step (so no data is replayed in
    # the same order), and the log says why.
    data_seed = mine["reader"]["layout"]["seed"] if exact else t.seed + step if resume else t.seed
    loader = build_train_loader(cfg.data, cfg.model, rank, world, data_seed, t.micro_batch_size)
    why_not_exact = None if exact or not resume else "; ".join(relayout) or \
        f"process count changed ({saved_world} -> {world})"
    if exact:
        try:
            loader.load_state_dict(mine["reader"])
        except ReaderStateError as e:  # the same on every rank: the layout is global config
            exact, why_not_exact, data_seed = False, str(e), t.seed + step
            loader.close()
            loader = build_train_loader(cfg.data, cfg.model, rank, world, data_seed, t.micro_batch_size)
    if why_not_exact:  # the epoch order continues at its global position (each sample still once per epoch)
        why_data = loader.continue_from(client.get("data_position"))
        log.warning("%s: %s; RNG streams restart from seed %d", why_not_exact, "data order restarts from seed "
                    f"{data_seed} ({why_data})" if why_data else f"the data order continues at sample "
                    f"{loader.position()['position']} of its global order", data_seed)

    global_batch = t.micro_batch_size * t.grad_accum * world
    flops = flops_per_sample(cfg.model)
    norm_cls = type(model.blocks[0].norm1)  # the family's norm_layer_for choice (e.g. apex's LayerNorm)
    run_info = {"world_size": world, "launcher": env.launcher, "device": str(device), "zero_stage": stage,
                "precision": t.precision, "optimizer_impl": opt_impl,
                "layernorm_impl": f"{norm_cls.__module__}.{norm_cls.__name__}",
                "params": count_parameters(cfg.model, include_align=True), "flops_per_sample": flops,
                "global_batch": global_batch, "deepspeed": deepspeed.__version__, "torch": torch.__version__,
                "resumed_from": load_tag, "start_step": step, "reliability": survival_summary(cfg)}
    logger = metrics.RunLogger(t.out_dir, cfg, rank == 0, run_info)
    if rank == 0:
        log.info("run: %s", run_info)
        log.info("%s", run_info["reliability"])
    wandb_id = logger.wandb_id or wandb_id
    meter = metrics.Throughput(flops, cfg.model.num_tokens, world, metrics.peak_tflops(t.peak_tflops))
    keys = ("loss", "ce", "enc_align", "dec_align", "token_acc", "noise_frac")
    sums, n_sum = torch.zeros(len(keys), device=device), 0  # on the device: no host sync until log time
    digest = metrics.DataDigest(device)

    def save_checkpoint() -> bool:
        local = {"rng": ckpt.rng_state(gen), "reader": loader.state_dict()}
        client = {"step": step, "samples_seen": samples_seen, "wandb_id": wandb_id, "world_size": world,
                  "data_position": loader.position(),
                  "universal_checkpoint_info": {}, **ckpt.rank_state_entry(local, stage),
                  "rear_config": cfg.to_dict()}
        meta = {"world_size": world, "zero_stage": stage, "samples_seen": samples_seen}
        return ckpt.save(engine, ckpt_dir, step, client, meta, config_json(cfg), t.keep_last)

    # RNG streams are restored last, right before the loop, so that nothing above (W&B, meta-device parameter
    # counting, ...) can shift them: stop at step k + resume = the uninterrupted run, bit for bit.
    if exact:
        ckpt.set_rng_state(mine["rng"], gen)
    elif resume:
        torch.manual_seed(data_seed + rank)
        gen.manual_seed(data_seed * 1000 + rank + 1)

    # 5. The loop: one iteration = one optimizer step of grad_accum micro-batches.
    engine.train()
    stop_flag, stopped = signals.StopFlag(device), False
    while step < t.max_steps:
        lr = scheduler.get_last_lr()[0]
        for _ in range(t.grad_accum):
            t0 = time.perf_counter()
            tokens, labels = next(loader)  # its DataLoader has its own generator: the global RNG is dropout's
            tokens, labels = tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            meter.data_s += time.perf_counter() - t0
            digest.update(tokens, labels)
            # rho follows the global optimizer step; class dropout + perturbation happen inside.
            loss, m = objective(engine, tokens, labels, codebook, step=step, generator=gen)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps optimizer + LambdaLR only at the accumulation boundary
            sums += torch.stack([loss.detach().float()] + [m[k].float().to(device) for k in keys[1:]])
            n_sum += 1
        if not engine.was_step_applied():
            # fp16 overflow: DeepSpeed skipped the update and with it the LR step. Step the schedule anyway, so
            # the LR stays a function of the step counter, as rho and the checkpoints are.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                scheduler.step()
        step += 1
        heartbeat.beat(step)
        samples_seen += global_batch
        meter.steps += 1
        meter.samples += global_batch

        if step % t.log_every == 0 or step == t.max_steps:
            stats = loader.stats
            avg = torch.cat([sums.cpu() / n_sum, torch.tensor([float(stats["corrupt_shards_skipped"])])])
            avg = avg.to(device if device.type == "cuda" else "cpu")
            dist.all_reduce(avg)
            avg = (avg / world).tolist()
            corrupt_total = 0
            if avg.pop() > 0:  # some rank skipped a shard; two ranks may share one: count distinct names
                names = [None] * world
                dist.all_gather_object(names, stats["corrupt_shards"])
                corrupt_total = len(set().union(*names))
            gn = engine.get_global_grad_norm()
            rec = {"step": step, **dict(zip(keys, avg)), "rho": objective.rho(step - 1), "lr": lr,
                   "grad_norm": float(gn) if gn is not None else None, "skipped_steps": engine.skipped_steps,
                   **meter.summary(),
                   "samples_seen": samples_seen, "epochs": samples_seen / t.images_per_epoch,
                   "data_digest": int(digest.value)}
            rec["data"] = stats  # rank 0's reader
            rec["corrupt_shards_skipped"] = corrupt_total  # all ranks
            logger.log_step(rec)
            sums.zero_()
            n_sum = 0
        if t.sample_every and step % t.sample_every == 0:
            png = build.sample_grid(engine.module, tokenizer, cfg, step, t.out_dir, rank, stage)
            if png:
                logger.log_image(png, step)
        if t.eval_every and step % t.eval_every == 0:  # small-N FID through the evaluation code path
            fid = eval_hook.in_training_fid(engine.module, tokenizer, cfg, rank, world, stage)
            if rank == 0:
                log.info("step %d | in-training FID (%d samples) %.3f", step, t.eval_num_samples, fid)
                logger.log_step({"step": step, f"fid_{t.eval_num_samples}": fid})
        stopped = stop_flag.poll()
        if stopped and step == t.max_steps:  # the work is done: a requeue would only start and stop again
            log.warning("stop signal seen at the last step %d: finishing normally (exit 0)", step)
            stopped = False
        if stopped or step % t.ckpt_every == 0 or step == t.max_steps:
            ok = save_checkpoint()
            if not ok and (stopped or step == t.max_steps):
                log.error("the final checkpoint could not be written; exiting with an error")
                return signals.EXIT_ERROR
        if stopped:
            log.warning("stopped by signal at step %d after writing the checkpoint; exit %d", step,
                        signals.EXIT_PREEMPTED)
            break

    # slurm/train.sh also reads this event: an exit after it that is not 75 (a teardown abort) still requeues
    logger.write({"event": "stop" if stopped else "finished", "step": step})
    dist.barrier()  # the last collective: what follows (W&B's upload on rank 0, the exit) waits for no rank
    heartbeat.last_beat = 0.0  # nothing for the stall watch to report while rank 0 finishes W&B and deletions
    loader.close()
    code = signals.EXIT_PREEMPTED if stopped else signals.EXIT_OK
    logger.close(exit_code=code)
    return code


if __name__ == "__main__":
    launch_env.run_and_exit(main)  # os._exit after the last collective: no teardown abort (see exit_process)
