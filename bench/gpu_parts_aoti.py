"""Part 7 of `make gpu-check`: AOTInductor packages of ours on the GPU.

- dit_slice: part 5's full-width 2-block slice of the flf2v-14B DiT at 720p / 81 frames in bf16, exported with
  torch.export and compiled by `torch._inductor.aoti_compile_and_package` (what `flf2v-build --backend aoti`
  does per graph): compile time, package size, forward time and error against torch eager on the same weights.
- dit_slice_triton: the same with the flf2v Triton kernels (`--attention plugin`): whether AOTInductor compiled
  them into the package (the kernel names in its code), its time and error against eager sdpa.
- tiny: the tiny checkpoint's whole AOTI folder (bf16) and one video through `Pipeline.from_engines` against the
  torch reference in bf16: build time, video error, denoising steps captured; then its DiT rebuilt with
  STREAM=1 and run with every block streamed through the device slots, against the whole folder's video.
In the CPU smoke test the slice is the tiny config at the tiny shape (fp32) and the rest is skipped
(tests/test_aoti.py builds and checks the tiny folder on the CPU). Box-safe at import: stdlib only.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
import time
import zipfile
from pathlib import Path

from flf2v.bench.gpu_common import (Skip, build_random_dit, errors, free_cuda, guarded, model_preset, short_of,
                                    slice_inputs, sync, timed_s, tokens_of, video_shapes)

# the flf2v Triton kernels (kernels/attention.py, cross_attention.py) as named in a package's code
FLF2V_KERNELS = ("self_attn_fwd", "cross_attn_fwd", "rms_stats", "norm_rope")


def kernels_in(path) -> list[str]:
    """Which flf2v kernels a `.pt2` package's files name (file names and generated code)."""
    found = set()
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            text = name + (z.read(name).decode(errors="ignore") if name.endswith((".cpp", ".h", ".py", ".json",
                                                                                   ".txt")) else "")
            found |= {k for k in FLF2V_KERNELS if k in text}
    return sorted(found)


def _slice(row: dict, run, attention: str = "sdpa") -> None:
    """Part 5's DiT slice compiled into one AOTI package, against torch eager (sdpa) on the same weights.
    attention="triton": the DiT with the flf2v triton_ops (kernels/ops.py), which AOTInductor should compile
    into the package; `kernels_in_package` says whether it did."""
    import torch

    from flf2v.export.contracts import DiTFull
    preset = model_preset(run)
    cfg = dataclasses.replace(preset.dit, num_layers=2)
    dtype = torch.float32 if run.smoke else torch.bfloat16
    L, latent, _ = tokens_of(preset, video_shapes(run)[0])
    model = compiled = build_random_dit(cfg, dtype, run.device)
    inputs = slice_inputs(run, cfg, latent)
    row.update(blocks=2, tokens=L, dtype=str(dtype)[6:], attention=attention)
    if attention == "triton":
        import flf2v.kernels.ops  # noqa: F401  (registers the ops)
        compiled = build_random_dit(cfg, dtype, run.device, attention="triton")
        compiled.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory(prefix="flf2v-gpu-check-aoti-") as tmp, torch.no_grad():
        mod, ref_mod = DiTFull(compiled).eval(), DiTFull(model).eval()
        t0 = time.perf_counter()
        ep = torch.export.export(mod, inputs)
        row["export_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(tmp) / "dit_b1.pt2"))
        row.update(compile_s=time.perf_counter() - t0, package_mib=Path(path).stat().st_size / 2**20,
                   kernels_in_package=kernels_in(path))
        pkg, reps = torch._inductor.aoti_load_package(path), 1 if run.smoke else 3
        out = pkg(*inputs)[0]
        row["aoti_forward_s"], _ = timed_s(run, lambda: pkg(*inputs), reps)
        ref = ref_mod(*inputs)[0]
        row["eager_forward_s"], _ = timed_s(run, lambda: ref_mod(*inputs), reps)
        sync(run)
        row.update(vs_eager=errors(out, ref), speedup_vs_eager=row["eager_forward_s"] / row["aoti_forward_s"])


def _tiny(row: dict, run) -> None:
    import torch

    from flf2v.export.build import build
    from flf2v.models.make_tiny import write_demo_frames, write_tiny_checkpoint
    from flf2v.runtime.denoise import DenoiseLoop
    from flf2v.runtime.media import load_image
    from flf2v.runtime.pipeline import Pipeline
    with tempfile.TemporaryDirectory(prefix="flf2v-gpu-check-aoti-tiny-") as tmp:
        tmp = Path(tmp)
        ckpt = write_tiny_checkpoint(tmp / "ckpt", "tiny", seed=0)
        frames = [load_image(p) for p in write_demo_frames(tmp / "frames", (64, 64))]
        t0 = time.perf_counter()
        folder = build(ckpt, "tiny", "bf16", out=tmp / "aoti", backend="aoti", cfg_batch=(2,), progress=False)
        row.update(build_s=time.perf_counter() - t0, folder_mib=sum(f.stat().st_size for f in folder.iterdir()) / 2**20)
        kw = dict(size="64*64", frame_num=9, seed=1, sample_steps=4, progress=False)
        ref = Pipeline.from_checkpoint(ckpt, dtype=torch.bfloat16, device=run.device).generate("a ball", *frames, **kw)
        captures, capture = [], DenoiseLoop.capture
        DenoiseLoop.capture = lambda loop: (captures.append(1), capture(loop))[1]  # counted, not changed
        try:
            t0 = time.perf_counter()
            got = Pipeline.from_engines(folder, device=run.device).generate("a ball", *frames, **kw)
            sync(run)
            row["first_run_s"] = time.perf_counter() - t0
        finally:
            DenoiseLoop.capture = capture
        row["steps_captured"] = len(captures)  # the packages' calls inside a CUDA graph of the step
        row["video_vs_torch_bf16"] = errors(got.float(), ref.float())
        row["streamed"] = guarded(_streamed, {}, run, ckpt, folder, frames, kw, got)


def _streamed(row: dict, run, ckpt, folder, frames, kw, whole) -> None:
    """The tiny folder's DiT rebuilt with STREAM=1 (embed, block, head packages) and run with no block resident:
    both blocks copied into the two device slots on the side stream, against the whole-package video."""
    import shutil

    from flf2v.export.build import build
    from flf2v.models import checkpoint as ck
    from flf2v.runtime.backends import open_backend
    from flf2v.runtime.pipeline import Pipeline
    streamed = folder.with_name("aoti-stream")
    shutil.copytree(folder, streamed)
    t0 = time.perf_counter()
    build(ckpt, "tiny", "bf16", out=streamed, backend="aoti", cfg_batch=(2,), only=["dit_b2"],
          weight_streaming=True, force=True, progress=False)
    row["build_s"] = time.perf_counter() - t0
    preset = ck.preset_for(ckpt)
    backend = open_backend("aoti", streamed, ckpt, preset, run.device, resident_blocks=0)
    t0 = time.perf_counter()
    got = Pipeline(backend, ck.load_tokenizer(ckpt, preset), preset, run.device).generate("a ball", *frames, **kw)
    sync(run)
    row.update(first_run_s=time.perf_counter() - t0, block_copies=backend.blocks.copies,
               pinned_bytes=backend.blocks.pinned_bytes, video_vs_whole=errors(got.float(), whole.float()))


def part_aoti(run, data: dict, part_end: float) -> None:
    if importlib.util.find_spec("torch") is None:
        raise Skip("no torch on this python")
    _slice(data.setdefault("dit_slice", {}), run)  # a failure here fails the part
    free_cuda(run)  # the slice's weights and package went with _slice's frame
    missing = [m for m in ("PIL", "ftfy", "regex", "transformers") if importlib.util.find_spec(m) is None]
    if run.smoke:
        data["dit_slice_triton"] = {"skipped": "smoke: the Triton kernels compile into a package only on CUDA "
                                               "(tests/test_aoti.py checks the ops export on a CPU)"}
    elif reason := short_of(run, part_end, 120):
        data["dit_slice_triton"] = {"skipped": reason}
    else:
        data["dit_slice_triton"] = guarded(_slice, {}, run, "triton")
        free_cuda(run)
    if run.smoke:
        data["tiny"] = {"skipped": "smoke: tests/test_aoti.py builds and checks the tiny AOTI folder on a CPU"}
    elif missing:
        data["tiny"] = {"skipped": f"no {', '.join(missing)} on this python (the tokenizer and images need them)"}
    elif reason := short_of(run, part_end, 60):
        data["tiny"] = {"skipped": reason}
    else:
        data["tiny"] = guarded(_tiny, {}, run)
