"""reAR vs the plain AR baseline at equal compute and data order, on the embedded toy data.

    python -m rear_ds.ablate [--out runs/ablate] [--seeds 0 1 2] [--steps 240] [--single-term-arms]
    python -m rear_ds.ablate --quick              (1 seed, 12 steps, 5 samples per class: a smoke run)
    rear-ablate ...                               (the same, as an installed command)

What it does, with the demo's stages (rear_ds.demo: the toy dataset, tokenizer, classifier and token shards,
each reused when current):

  1. trains configs/toy.yaml once per arm and seed through the real launcher (``deepspeed --num_gpus 2
     rear_ds/train.py``, 2 CPU processes, ZeRO-2 bf16): "reAR" (noisy context + encode and decode alignment)
     and "AR" (all three off: the plain AR baseline, same code). Within a seed the runs differ only in those
     three switches: same model init, data order, steps, batch and schedule (the toy's 600-step schedule
     scaled to --steps). That is checked, not assumed: the saved configs are compared, and every logged step's
     ``data_digest`` (a hash of the batches the trainer consumed, in order) must agree between the arms;
  2. samples every run with ``python -m rear_ds.sample`` (CFG as the demo), with the same sampling seed for
     both arms of a seed;
  3. scores each sample set (rear_ds.toy.scoring): token round-trip consistency (decode, re-encode, share of
     token positions that survive; real held-out images give the ceiling), class consistency (the toy
     classifier) and a Frechet distance in the toy classifier's feature space against real held-out images
     (the toy stand-in for FID; NOT an FID);
  4. reports per arm and seed, mean and spread over seeds, and the paired difference reAR - AR per seed:
     <out>/ablation.json, <out>/report.md (a Markdown table), <out>/curves.png (CE and both alignment terms
     against the step, every arm side by side) and a summary on the console.

--single-term-arms adds "encode_only", "decode_only" and "noise_only". Note the reference's rule for one
alignment head (README, "The method, as implemented"): the enabled head's features serve both terms.
A rerun with the same settings reuses every finished training run and sample set.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

from rear_ds import cli, demo

# The objective switches of each arm; everything else is identical within a seed.
SWITCHES = ("noisy_context", "encode_align", "decode_align")
ARMS = {"reAR": (True, True, True), "AR": (False, False, False)}
SINGLE_TERM_ARMS = {"encode_only": (False, True, False), "decode_only": (False, False, True),
                    "noise_only": (True, False, False)}
# Default: 6 runs of 240 steps fit 30 minutes on a 2-core CPU (ABLATION.md gives the measured times).
DEFAULTS = {"steps": 240, "seeds": [0, 1, 2], "samples_per_class": 20}
QUICK = {"steps": 12, "seeds": [0], "samples_per_class": 5}
METRICS = (("round_trip", "token round-trip consistency", "higher"),
           ("class_consistency", "class consistency", "higher"),
           ("feature_frechet", "Frechet distance, toy classifier features (NOT FID)", "lower"))
CURVES = (("ce", "cross-entropy"), ("enc_align", "encode alignment term"), ("dec_align", "decode alignment term"))


class AblationError(demo.StageError):
    pass


def scaled_schedule(steps: int, base) -> dict:
    """The toy's schedule (600 steps: warmup 20, rho reaches 0 at 360) scaled to ``steps``, as overrides."""
    scale = steps / base.train.max_steps
    return {"train.max_steps": steps, "optim.total_steps": steps, "train.ckpt_every": steps,
            "optim.warmup_steps": max(1, round(base.optim.warmup_steps * scale)),
            "objective.anneal_end": max(1, round(base.objective.anneal_end * scale)),
            "train.log_every": max(1, steps // 60)}


def arm_overrides(switches: tuple) -> list:
    return [f"objective.{k}={str(v).lower()}" for k, v in zip(SWITCHES, switches)]


# ----------------------------------------------------------------------------------------------
# Checks: the arms differ in their switches only and consumed the same data in the same order
# ----------------------------------------------------------------------------------------------


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(run_dirs: dict) -> dict:
    """{key: {arm: value}} for every config key that differs between the runs of one seed (out_dir excluded)."""
    import yaml

    flat = {}
    for arm, d in run_dirs.items():
        with open(os.path.join(d, "config.yaml")) as f:
            flat[arm] = _flat(yaml.safe_load(f))
    keys = sorted(set().union(*flat.values()) - {"train.out_dir"})
    return {k: {arm: f.get(k) for arm, f in flat.items()} for k in keys
            if len({json.dumps(f.get(k)) for f in flat.values()}) > 1}


def data_digests(run_dir: str) -> dict:
    """step -> the trainer's data_digest (rank 0's hash of the batches consumed up to that step)."""
    from rear_ds.training.metrics import read_run_log

    return {s: rec.get("data_digest") for s, rec in read_run_log(run_dir)[0].items()}


def check_seed(seed: int, run_dirs: dict, arms: dict) -> dict:
    """Raise AblationError unless the runs of ``seed`` differ exactly in their arm switches and logged the
    same data digests at every step; return what was compared."""
    diff = config_differences(run_dirs)
    expected = {f"objective.{k}" for i, k in enumerate(SWITCHES) if len({a[i] for a in arms.values()}) > 1}
    if set(diff) != expected:
        raise AblationError(f"seed {seed}: the runs' configs differ in {sorted(diff)}, expected exactly "
                            f"{sorted(expected)} ({diff})")
    digests = {arm: data_digests(d) for arm, d in run_dirs.items()}
    first = next(iter(digests.values()))
    if not first or None in first.values():
        raise AblationError(f"seed {seed}: {next(iter(run_dirs.values()))}/log.jsonl has no data_digest records")
    for arm, dig in digests.items():
        if dig != first:
            bad = sorted(s for s in set(dig) | set(first) if dig.get(s) != first.get(s))
            raise AblationError(f"seed {seed}: arm {arm!r} consumed other data than {next(iter(digests))!r} "
                                f"(data_digest differs at steps {bad[:10]}): the comparison would not be fair")
    return {"config_differences": diff, "data_digest_steps_compared": len(first),
            "data_digest_last": first[max(first)]}


# ----------------------------------------------------------------------------------------------
# Statistics and report
# ----------------------------------------------------------------------------------------------


def spread(values: list) -> dict:
    """Mean, sample standard deviation (None for one value), min and max."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std(ddof=1)), 4) if len(v) > 1 else None,
            "min": round(float(v.min()), 4), "max": round(float(v.max()), 4), "n": int(len(v))}


def paired(differences: list, better: str) -> dict:
    """Spread of per-seed differences (arm - AR), the 95% confidence interval of their mean (Student t) and a
    verdict: "better"/"worse" when the interval excludes 0, else "no clear difference"."""
    from scipy.stats import t

    out = spread(differences)
    if out["std"] is None:
        return dict(out, ci95=None, verdict="one seed: no verdict")
    half = float(t.ppf(0.975, out["n"] - 1)) * out["std"] / np.sqrt(out["n"])
    lo, hi = out["mean"] - half, out["mean"] + half
    verdict = "no clear difference" if lo <= 0 <= hi else \
        ("better" if (lo > 0) == (better == "higher") else "worse")
    return dict(out, ci95=[round(lo, 4), round(hi, 4)], verdict=verdict)


def value(scores: dict, metric: str) -> float:
    s = scores[metric]
    return s["consistency"] if isinstance(s, dict) else s


def summarize(runs: dict, seeds: list) -> dict:
    """Per arm and metric: the values by seed and their spread; per other arm: differences to AR, paired by seed."""
    out = {"per_arm": {}, "paired_vs_AR": {}}
    for arm, by_seed in runs.items():
        out["per_arm"][arm] = {m: dict(spread([value(by_seed[s]["scores"], m) for s in seeds]),
                                       by_seed={str(s): value(by_seed[s]["scores"], m) for s in seeds})
                               for m, _, _ in METRICS}
        if arm != "AR":
            out["paired_vs_AR"][arm] = {m: paired([value(by_seed[s]["scores"], m) - value(runs["AR"][s]["scores"], m)
                                                   for s in seeds], better) for m, _, better in METRICS}
    return out


def _fmt(s: dict) -> str:
    return f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["std"] is not None else "")


def report_markdown(rep: dict) -> str:
    st, summ = rep["settings"], rep["summary"]
    lines = [f"Command: `{rep['command']}`  ",
             f"Date: {rep['date']}; commit {rep['machine'].get('git_commit') or 'unknown'}; machine: "
             f"{rep['machine']['cpu']} ({rep['machine']['cpus']} CPUs), load average {rep['machine']['load_start']} "
             f"at the start, {rep['machine']['load_end']} at the end; total {rep['timings_s']['total']:.0f} s"
             + (f" ({rep['runs_reused']} training runs reused; the run that trained them took "
                f"{(rep['timings_s_first_run'] or {}).get('total', float('nan')):.0f} s)" if rep["runs_reused"] else "")
             + "  ",
             f"Seeds {st['seeds']}, {st['steps']} steps x {st['global_batch']} sequences per run, "
             f"{st['num_samples']} samples per run (CFG {st['guidance_scale']})", "",
             "| arm | " + " | ".join(f"{title} ({better} is better)" for _, title, better in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for arm, per in summ["per_arm"].items():
        lines.append(f"| {arm} | " + " | ".join(
            f"{_fmt(per[m])} ({', '.join(f'{v:.3f}' for v in per[m]['by_seed'].values())})" for m, _, _ in METRICS) + " |")
    ref = rep["real_heldout"]
    lines.append("| real held-out | " + f"{ref['round_trip']['consistency']:.3f} (ceiling) | "
                 f"{ref['class_consistency']['consistency']:.3f} | {ref['feature_frechet']:.3f} (real train vs "
                 f"held-out, same n: the floor) |")
    for arm, per in summ["paired_vs_AR"].items():
        lines.append(f"| {arm} - AR, paired by seed | " + " | ".join(
            f"{_fmt(per[m])}" + (f", 95% CI [{per[m]['ci95'][0]:.3f}, {per[m]['ci95'][1]:.3f}]: {per[m]['verdict']}"
                                 if per[m]["ci95"] else "") for m, _, _ in METRICS) + " |")
    lines += ["", "Mean ± sample standard deviation over seeds (the seeds' values in brackets). "
              "The Frechet distance is computed in the toy classifier's 64-d feature space: it is NOT FID. "
              "In curves.png, reAR's cross-entropy is measured on its noisy context until the noise reaches 0 "
              f"at step {st['schedule']['objective.anneal_end']}."]
    return "\n".join(lines)


def curve_panels(runs: dict) -> list:
    """(title, {arm: [mean line, seed lines...]}) for CE and both alignment terms; arms whose term is off
    (logged as exactly 0) are left out of that panel."""
    panels = []
    for key, title in CURVES:
        series = {}
        for arm, by_seed in runs.items():
            lines = []
            for r in by_seed.values():
                recs = demo.read_log(r["run_dir"])
                lines.append(([rec["step"] for rec in recs], [rec[key] for rec in recs]))
            if all(y == 0 for _, ys in lines for y in ys):
                continue
            n = min(len(xs) for xs, _ in lines)
            mean = (lines[0][0][:n], [float(np.mean([ys[i] for _, ys in lines])) for i in range(n)])
            series[arm] = [mean] + (lines if len(lines) > 1 else [])
        panels.append((title, series))
    return panels


def machine_state() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=demo.ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cpus": os.cpu_count(), "load_start": [round(x, 2) for x in os.getloadavg()],
            "git_commit": commit, "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def run_ablation(args) -> dict:
    from rear_ds.config import load_config
    from rear_ds.toy.plot import line_panels
    from rear_ds.toy.scoring import FRECHET_NOTE, ToyScorer

    t_start = time.time()
    machine = machine_state()
    paths = demo.layout(args.out)
    r = demo.Runner(paths["out"], args.verbose, tag="ablate")
    cfg = load_config(demo.CONFIG)
    arms = dict(ARMS, **(SINGLE_TERM_ARMS if args.single_term_arms else {}))
    prep = demo.prepare(r, paths, cfg)
    tok_weights = prep["tokenizer"]["weights"]
    schedule = scaled_schedule(args.steps, cfg)
    n = cfg.model.num_classes * args.samples_per_class

    runs = {arm: {} for arm in arms}
    for seed in args.seeds:
        for arm, switches in arms.items():
            name = f"{arm}_s{seed}"
            run = dict(paths, train=os.path.join(paths["out"], "arms", name))
            samples = os.path.join(paths["out"], "samples", name)
            with r.stage(f"train_{name}"):
                overrides = [f"{k}={v}" for k, v in schedule.items()] + [f"train.seed={seed}"] + arm_overrides(switches)
                recs = demo.stage_train(r, run, tok_weights, overrides, name=f"train_{name}")
            if "reused" not in r.notes[f"train_{name}"]:
                shutil.rmtree(samples, ignore_errors=True)  # samples of earlier weights are stale
            with r.stage(f"sample_{name}"):
                x, y, tokens = demo.stage_sample(r, name, run["train"], samples, n,
                                                 ["--guidance-scale", str(cfg.sampling.guidance_scale),
                                                  "--seed", str(seed)])
                r.notes[f"sample_{name}"] = f"{n} samples, sampling seed {seed}"
            runs[arm][seed] = {"run_dir": run["train"], "samples_dir": samples, "samples": (x, y, tokens),
                               "reused": "reused" in r.notes[f"train_{name}"],
                               "train": {k: recs[-1].get(k) for k in ("step", "loss", "ce", "enc_align", "dec_align",
                                                                       "token_acc")},
                               "step_time_s_median": float(np.median([rec["step_time_s"] for rec in recs])),
                               "train_stage_s": r.timings[f"train_{name}"]}

    with r.stage("checks"):
        checks = {str(s): check_seed(s, {arm: runs[arm][s]["run_dir"] for arm in arms}, arms) for s in args.seeds}
        r.notes["checks"] = (f"configs differ only in {sorted(next(iter(checks.values()))['config_differences'])}; "
                             f"data digests equal across arms at every logged step")
    with r.stage("score"):
        scorer = ToyScorer(prep["classifier"]["weights"],
                           load_config(demo.CONFIG, [f"tokenizer.weights={tok_weights}"]).tokenizer, paths["data"])
        for by_seed in runs.values():
            for run in by_seed.values():
                run["scores"] = scorer.score(*run.pop("samples"), frechet=True)
        real = scorer.real(frechet_n=n)
    with r.stage("report"):
        curves = line_panels(curve_panels(runs), os.path.join(paths["out"], "curves.png"))

    machine["load_end"] = [round(x, 2) for x in os.getloadavg()]
    timings = dict(r.timings, total=round(time.time() - t_start, 1))
    json_path = os.path.join(paths["out"], "ablation.json")
    old = json.load(open(json_path)) if os.path.isfile(json_path) else {}
    reused = sum(run["reused"] for by_seed in runs.values() for run in by_seed.values())
    rep = {
        "command": " ".join(["python -m rear_ds.ablate", *args.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"steps": args.steps, "seeds": args.seeds, "arms": {a: dict(zip(SWITCHES, s)) for a, s in arms.items()},
                     "schedule": schedule, "global_batch": 2 * cfg.train.micro_batch_size * cfg.train.grad_accum,
                     "processes": 2, "num_samples": n, "guidance_scale": cfg.sampling.guidance_scale,
                     "sampling_seed": "= the training seed, the same for every arm", "config": "configs/toy.yaml",
                     "ds_config": demo.rel(demo.DS_CONFIG)},
        "note": "feature_frechet: " + FRECHET_NOTE,
        "setup": prep,
        "real_heldout": real,
        "runs": {arm: {str(s): run for s, run in by_seed.items()} for arm, by_seed in runs.items()},
        "checks": checks,
        "summary": summarize(runs, args.seeds),
        "timings_s": timings,
        "runs_reused": reused,
        # the times of the invocation that trained the runs (a rerun that reuses them takes seconds)
        "timings_s_first_run": (old.get("timings_s_first_run") or old.get("timings_s")) if reused else timings,
        "files": {"report": os.path.join(paths["out"], "report.md"), "curves": curves, "json": json_path,
                  "stage_logs": r.logs},
    }
    md = report_markdown(rep)
    with open(rep["files"]["report"], "w") as f:
        f.write(md + "\n")
    from rear_ds.data.shards import write_json_atomic

    write_json_atomic(rep["files"]["json"], rep)
    print_summary(rep, md)
    return rep


def print_summary(rep: dict, md: str) -> None:
    per = rep["summary"]["per_arm"]
    verdicts = []
    for m, title, _ in METRICS:
        d = rep["summary"]["paired_vs_AR"]["reAR"][m]
        verdicts.append(f"  {title}: reAR {_fmt(per['reAR'][m])} vs AR {_fmt(per['AR'][m])}; paired difference "
                        f"{_fmt(d)} (" + (f"95% CI [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]: reAR {d['verdict']}"
                                          if d["ci95"] else d["verdict"]) + ")")
    print("\n".join(["", "=" * 72, f"reAR vs AR ablation finished in {rep['timings_s']['total']:.0f}s "
                     f"({len(rep['settings']['seeds'])} seed(s), {rep['settings']['steps']} steps per run)",
                     *verdicts, "  NOTE: the Frechet distance is in the toy classifier's feature space; it is NOT FID.",
                     "", md, "",
                     f"  report: {demo.rel(rep['files']['report'])}, curves: {demo.rel(rep['files']['curves'])}, "
                     f"everything: {demo.rel(rep['files']['json'])}", "=" * 72]), flush=True)


def main(argv=None) -> int:
    p = cli.parser(__doc__, "python -m rear_ds.ablate", "rear-ablate")
    p.add_argument("--out", default=None, help="run folder (default runs/ablate, runs/ablate_quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: seeds {QUICK['seeds']}, {QUICK['steps']} steps, {QUICK['samples_per_class']} "
                        "samples per class (unless given)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"training and sampling seeds (default {DEFAULTS['seeds']})")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {DEFAULTS['steps']})")
    p.add_argument("--samples-per-class", type=int, default=None,
                   help=f"samples per class and run (default {DEFAULTS['samples_per_class']})")
    p.add_argument("--single-term-arms", action="store_true", help="add the encode_only, decode_only and noise_only arms")
    p.add_argument("--verbose", action="store_true", help="echo every stage's output")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    args.seeds = args.seeds if args.seeds is not None else base["seeds"]
    args.steps = args.steps if args.steps is not None else base["steps"]
    args.samples_per_class = args.samples_per_class or base["samples_per_class"]
    args.out = args.out or os.path.join(demo.ROOT, "runs", "ablate_quick" if args.quick else "ablate")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if len(set(args.seeds)) != len(args.seeds) or args.steps < 2 or args.samples_per_class < 1:
        p.error(f"--seeds must be distinct ({args.seeds}), --steps >= 2 ({args.steps}), "
                f"--samples-per-class >= 1 ({args.samples_per_class})")
    try:
        run_ablation(args)
        return 0
    except demo.StageError as e:
        print(f"[ablate] {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
