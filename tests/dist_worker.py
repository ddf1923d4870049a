"""Run under `torchrun` by tests/test_parallel.py (not a test module itself).

    torchrun --nproc_per_node N tests/dist_worker.py cases --ckpt DIR --frames DIR --out JSON CASE...
        each CASE ("u2", "u4", "cfg", "cfg-u2", with "+dit_fsdp", "+t5_fsdp", "+cache", "+ort" (--engines)
        suffixes; "dit-sdpa-u2", "dit-triton-u2": one DiT forward) runs one video over all N ranks; every rank also
        makes the single-process video in-process, and rank 0 writes {case: {"max_abs", "max_rel", ...}} to JSON.
    torchrun --nproc_per_node N tests/dist_worker.py cli [--kill RANK:STEP] [--hang RANK:STEP] -- FLF2V-RUN ARGS...
        flf2v-run's main(); with --kill, that rank SIGKILLs itself when its denoising loop reaches that step;
        with --hang, it sleeps there for an hour.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

KW = dict(size="64*64", frame_num=9, seed=3, sample_steps=3, progress=False)


def parse_case(case: str) -> dict:
    name, *flags = case.split("+")
    u = int(name.split("u")[-1]) if "u" in name else 1
    return {"ulysses_size": u, "cfg_parallel": name.startswith("cfg"), "dit_fsdp": "dit_fsdp" in flags,
            "t5_fsdp": "t5_fsdp" in flags, "attention": "triton" if "triton" in flags else "sdpa",
            "cache": "magcache" if "cache" in flags else "off", "engines": "ort" in flags}


def dit_case(ckpt, case: str) -> dict | None:
    """"dit-<sdpa|triton>-u<U>": one DiT forward, Ulysses over the group, against the same DiT in one process, at
    27 tokens (padded to a multiple of U; a whole video through the interpreted kernels takes minutes)."""
    from flf2v.models import checkpoint as ck
    from flf2v.runtime import parallel as P
    kind, u = case.split("-")[1], int(case.split("-u")[-1])
    par = P.groups(u, False, torch.device("cpu"))
    ref, dit = (ck.load_dit(ckpt, attention=kind) for _ in range(2))
    dit.sp = par.sp
    g = torch.Generator().manual_seed(5)
    cfg = ref.cfg
    f, h, w = 3, 6, 6  # 27 tokens: padded to a multiple of the group
    x = torch.randn(2, 16, f, h, w, generator=g)
    inputs = (x, torch.tensor([999, 500]), torch.randn(2, cfg.text_len, cfg.text_dim, generator=g),
              torch.randn(2, cfg.clip_tokens, cfg.clip_dim, generator=g), torch.randn(2, 20, f, h, w, generator=g))
    with torch.no_grad():
        want, got = ref(*inputs), dit(*inputs)
    err = (got - want).abs().max().item()
    return {"max_abs": err, "max_rel": err / want.abs().max().item(), "tokens": f * h * w // 4}


def run_cases(args) -> None:
    from flf2v.runtime import parallel as P
    from flf2v.runtime.media import load_image
    from flf2v.runtime.pipeline import Pipeline

    torch.distributed.init_process_group("gloo")
    frames = [load_image(Path(args.frames) / n) for n in ("first.png", "last.png")]
    want = {}
    out = {}
    for case in args.cases:
        if case.startswith("dit"):
            out[case] = dit_case(args.ckpt, case)
            continue
        c = parse_case(case)
        kw = dict(KW, cache=c["cache"], **({"cache_threshold": 0.5, "cache_calibration": args.calibration,
                                            "sample_steps": 8}  # the step cache's shortest run
                                           if c["cache"] != "off" else {}))
        key = (c["attention"], c["cache"])
        if key not in want:  # the single-process video, made in this process without any group
            want[key] = Pipeline.from_checkpoint(args.ckpt, attention=c["attention"]).generate("a ball", *frames, **kw)
        par = P.groups(c["ulysses_size"], c["cfg_parallel"], torch.device("cpu"))
        if c["engines"]:  # each process its own ONNX Runtime engines
            pipe = Pipeline.from_engines(args.engines, parallel=par)
        else:
            pipe = Pipeline.from_checkpoint(args.ckpt, attention=c["attention"], parallel=par,
                                            dit_fsdp=c["dit_fsdp"], t5_fsdp=c["t5_fsdp"])
        got = pipe.generate("a ball", *frames, **kw)
        if c["cfg_parallel"] and key + (1,) not in want:  # the same layout in one process: batch-1 calls
            want[key + (1,)] = Pipeline.from_checkpoint(args.ckpt, attention=c["attention"]).generate(
                "a ball", *frames, cfg_batch=1, **kw)
        if par.is_main:
            ref = want[key]
            err = (got - ref).abs().max().item()
            out[case] = {"max_abs": err, "max_rel": err / ref.abs().max().item(), "shape": list(got.shape),
                         "cache": pipe.last_cache.to_json() if pipe.last_cache else None}
            if c["cfg_parallel"]:
                out[case]["max_abs_vs_batch1"] = (got - want[key + (1,)]).abs().max().item()
        elif got is not None:
            raise AssertionError(f"rank {par.rank} decoded a video; only rank 0 should")
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def run_cli(args) -> int:
    from flf2v.runtime import cli
    for how in ("kill", "hang"):
        if getattr(args, how):
            rank, step = (int(v) for v in getattr(args, how).split(":"))
            if int(os.environ["RANK"]) == rank:
                from flf2v.runtime.denoise import DenoiseLoop
                load = DenoiseLoop._load

                def failing(self, i, how=how, step=step, load=load):
                    if i == step and how == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    if i == step:
                        time.sleep(3600)
                    return load(self, i)
                DenoiseLoop._load = failing
    rest = args.rest
    if args.rank_args:  # RANK:ARGS, more flags for that rank only (a node given other files or flags)
        rank, more = args.rank_args.split(":", 1)
        rest = rest + more.split() if int(os.environ["RANK"]) == int(rank) else rest
    if args.record:  # each rank writes the seed its run took
        from flf2v.runtime.pipeline import Pipeline
        generate = Pipeline.generate

        def recording(self, *a, **k):
            try:
                return generate(self, *a, **k)
            finally:
                Path(f"{args.record}.{os.environ['RANK']}").write_text(str(self.last_request.seed))
        Pipeline.generate = recording
    code = cli.main(rest)
    if args.record:  # gloo threads still alive once main returned abort a rank at exit now and then
        tasks = Path("/proc/self/task")
        alive = sum((t / "comm").read_text().startswith(("pt_gloo", "gloo_")) for t in tasks.iterdir())
        Path(f"{args.record}.threads.{os.environ['RANK']}").write_text(str(alive))
    return code


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cases")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--frames", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--calibration", default=None)
    c.add_argument("--engines", default=None)
    c.add_argument("cases", nargs="+")
    r = sub.add_parser("cli")
    r.add_argument("--kill", default=None)
    r.add_argument("--hang", default=None)
    r.add_argument("--rank_args", default=None)
    r.add_argument("--record", default=None)
    r.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.what == "cases":
        run_cases(args)
        return 0
    if args.rest and args.rest[0] == "--":
        args.rest = args.rest[1:]
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
