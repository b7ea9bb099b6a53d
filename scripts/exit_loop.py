"""Stress the exit path: many short 2-process trainings under CPU load; count the ones that exit non-zero
after their run log says "finished" (issue 16 item 5, issue 19 item 4). Expect 0.

    python scripts/exit_loop.py                   # 30 runs, 2 CPU burners, ZeRO-2 / autocast / ZeRO-3 in turn
    python scripts/exit_loop.py --runs 50 --burners 4 --repo /tmp/old-checkout   # e.g. an older commit

Each run is the real `deepspeed --num_gpus 2 rear_ds/train.py` on the tiny config (3 steps, a checkpoint at the
end). A run counts as:
  ok                    exit 0 and a "finished" event in its log.jsonl
  BAD_EXIT_AFTER_FINISH a "finished" event but a non-zero exit (the teardown abort this script hunts)
  failed                no "finished" event (something else broke: shown with the output's tail)
It also counts DeepSpeed CPU all-reduce buffers left in /dev/shm by each run. Not a test: it takes about a
minute per run on a loaded 2-core machine. Exit status 1 if any run was not "ok" or left a buffer.
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.gpu_smoke import write_tokens  # noqa: E402
from rear_ds.demo import free_port  # noqa: E402

CONFIGS = (("zero2_bf16.json", []), ("zero2_bf16_autocast.json", ["train.precision=bf16_autocast"]),
           ("zero3_bf16.json", []))


def burn(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10000))


def one_run(repo: str, data: str, out: str, ds_json: str, extra: list, timeout: int) -> dict:
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), os.path.join(repo, "rear_ds", "train.py"),
           "--deepspeed_config", os.path.join(repo, "ds_configs", ds_json),
           "--config", os.path.join(repo, "configs", "tiny.yaml"),
           f"train.out_dir={out}", f"data.jsonl={data}", "data.num_workers=0", "train.allow_random_tokenizer=true",
           "train.max_steps=3", "train.ckpt_every=3", "train.log_every=1", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=repo,
               PYTHONFAULTHANDLER="1")  # a hung run's workers print their Python stacks on SIGABRT
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        output, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        import psutil
        import signal

        for child in psutil.Process(p.pid).children(recursive=True):
            try:
                if "RANK" in child.environ():
                    child.send_signal(signal.SIGABRT)
            except psutil.Error:
                pass
        time.sleep(10)
        os.killpg(p.pid, signal.SIGKILL)
        output, _ = p.communicate()
        rc = "timeout"
    events = []
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            events = [json.loads(line).get("event") for line in f if '"event"' in line]
    except OSError:
        pass
    finished = "finished" in events
    kind = "ok" if finished and rc == 0 else "BAD_EXIT_AFTER_FINISH" if finished else "failed"
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    for path in leaked:  # do not let the loop itself fill the RAM
        os.unlink(path)
    return {"rc": rc, "kind": kind, "seconds": round(time.time() - t0, 1), "ds": ds_json, "shm_left": len(leaked),
            "abort_text": "terminate called without an active exception" in output,
            "tail": output[-8000:] if kind != "ok" else ""}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--burners", type=int, default=2, help="busy-loop processes adding CPU load")
    p.add_argument("--repo", default=REPO, help="checkout whose rear_ds/train.py runs (default: this one)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--json", help="write the per-run results here")
    args = p.parse_args()
    stop = mp.Event()
    burners = [mp.Process(target=burn, args=(stop,), daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="exit_loop_") as tmp:
            data = write_tokens(os.path.join(tmp, "data.jsonl"), 256)
            for i in range(args.runs):
                ds_json, extra = CONFIGS[i % len(CONFIGS)]
                r = one_run(args.repo, data, os.path.join(tmp, f"run{i}"), ds_json, extra, args.timeout)
                results.append(r)
                print(f"run {i + 1:3d}/{args.runs} {ds_json:26s} exit {r['rc']!s:7s} {r['kind']:22s} "
                      f"{r['seconds']:6.1f} s shm left {r['shm_left']}"
                      f"{' (abort message in output)' if r['abort_text'] else ''}", flush=True)
                if r["tail"]:
                    print("    | " + r["tail"].replace("\n", "\n    | "), flush=True)
    finally:
        stop.set()
        for b in burners:
            b.join(5)
    counts = {k: sum(r["kind"] == k for r in results) for k in ("ok", "BAD_EXIT_AFTER_FINISH", "failed")}
    shm = sum(r["shm_left"] for r in results)
    print(f"summary: {len(results)} runs under {args.burners} CPU burners (+ whatever else loads this machine): "
          f"{counts['ok']} ok, {counts['BAD_EXIT_AFTER_FINISH']} non-zero exits after 'finished', "
          f"{counts['failed']} failed before finishing; {shm} shm buffers left; repo {args.repo}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "counts": counts, "shm_left": shm, "burners": args.burners}, f, indent=1)
    return 0 if counts["ok"] == len(results) and shm == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
