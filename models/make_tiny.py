"""`flf2v-make-tiny CKPT_DIR`: a complete checkpoint directory with random weights, in the official layout.

Same file names, key names and formats as Wan2.1-FLF2V-14B-720P (config.json + sharded fp32 safetensors
with an index, bf16 umT5 `.pth`, CLIP `.pth` holding both towers, fp32 VAE `.pth`, tokenizer folders),
so tests and the demo always run the real loading code. The directory is written under a temporary
name and renamed when complete: a crash never leaves something that looks like a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import checkpoint as ck
from .config import PRESETS, get_preset
from .layouts import quoted_home


def randomize_(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Seeded random weights of a sensible scale; norm gains and biases are randomised too, so that
    a loader or a network that ignores them cannot pass a parity test."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        with torch.no_grad():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if leaf == "bias":
                v = 0.02 * r
            elif leaf == "gamma" or (p.ndim == 1 and "norm" in name) or (p.ndim == 1 and leaf == "weight"):
                v = 1.0 + 0.1 * r
            elif leaf in ("modulation", "emb_pos", "cls_embedding", "pos_embedding"):
                v = 0.1 * r
            elif p.ndim >= 2:
                v = r / math.sqrt(p[0].numel())
            else:
                v = 1.0 + 0.1 * r
            p.copy_(v.to(p.dtype))
    return module


def write_dit_shards(out: Path, cfg_json: dict, tensors: dict, shards: list[list[str]]) -> None:
    """config.json + sharded safetensors + index, as the official DiT. `tensors`: key -> getter of the
    tensor, called only while its shard is written, so a large random checkpoint never sits in memory."""
    (out / ck.DIT_CONFIG).write_text(json.dumps(cfg_json, indent=2))
    weight_map, total = {}, 0
    for i, keys in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        part = {k: tensors[k]().contiguous() for k in keys}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    (out / ck.DIT_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2))


def write_dit(out: Path, model: torch.nn.Module, cfg_json: dict, shards: int = 3) -> None:
    """`model`'s weights as an official fp32 DiT checkpoint in `shards` files."""
    sd = model.state_dict()
    keys = list(sd)
    per = math.ceil(len(keys) / shards)
    write_dit_shards(out, cfg_json, {k: (lambda v=v: v.float()) for k, v in sd.items()},
                     [keys[i * per:(i + 1) * per] for i in range(shards)])


def clip_file_state(visual: torch.nn.Module, cfg, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The official CLIP `.pth` holds the whole XLM-R/ViT-H CLIP: the visual tower (including its last
    block, post-norm and head, which video generation skips), the text tower and `log_scale`."""
    sd = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    last = cfg.num_layers - 1
    for k, v in visual.state_dict().items():
        if k.startswith("transformer.0."):
            sd[f"visual.transformer.{last}." + k[len("transformer.0."):]] = torch.randn(v.shape, generator=gen)
    sd["visual.post_norm.weight"] = torch.ones(cfg.dim)
    sd["visual.post_norm.bias"] = torch.zeros(cfg.dim)
    sd["visual.head"] = torch.randn(cfg.dim, cfg.out_dim, generator=gen) / math.sqrt(cfg.dim)
    sd["textual.token_embedding.weight"] = torch.randn(16, 8, generator=gen)
    sd["textual.head.0.weight"] = torch.randn(cfg.out_dim, 8, generator=gen)
    sd["log_scale"] = torch.tensor(math.log(1 / 0.07))
    return sd


def write_tiny_checkpoint(ckpt_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    from .clip import CLIPVisual
    from .dit import WanDiT
    from .t5 import UMT5Encoder
    from .tokenizer import write_tiny_tokenizer
    from .vae import WanVAE

    p = get_preset(preset)
    if p.t5.vocab > 100_000:
        raise ValueError(f"preset {preset!r} is full size; flf2v-make-tiny writes small test checkpoints only")
    dest = Path(os.path.realpath(ckpt_dir))  # a link to a folder: that folder rewritten, the link kept
    gen = torch.Generator().manual_seed(seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write_dit(tmp, randomize_(WanDiT(p.dit), gen), p.dit.to_json_dict())
        t5 = randomize_(UMT5Encoder(p.t5), gen)
        torch.save({k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}, tmp / ck.T5_FILE)
        write_tiny_tokenizer(tmp / ck.T5_TOKENIZER, p.t5.vocab)
        write_tiny_tokenizer(tmp / ck.CLIP_TOKENIZER, p.t5.vocab)  # unused for video; kept for the layout
        visual = randomize_(CLIPVisual(p.clip), gen)
        torch.save(clip_file_state(visual, p.clip, gen), tmp / ck.CLIP_FILE)
        torch.save(randomize_(WanVAE(p.vae), gen).state_dict(), tmp / ck.VAE_FILE)
        (tmp / "flf2v_tiny.json").write_text(json.dumps({"preset": preset, "seed": seed}))
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp makes 0700 and safetensors 0600: give everything the mode any new file or folder gets
        for f in (tmp, *tmp.rglob("*")):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(ckpt_dir)


def _swap_in(tmp: Path, dest: Path) -> None:
    """The folder `tmp` in place of `dest`, with the user's own files of `dest` (a step-cache calibration,
    notes): hard-linked into `tmp` first (copied where links fail), so that a Ctrl-C anywhere leaves them in
    `dest` (moved into `tmp` one by one, they went with its removal)."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    if Path.cwd().is_relative_to(dest):  # `make-tiny .`: a swapped folder left the shell in a deleted one
        _move_into(tmp, dest)
        return
    for f in dest.iterdir():
        if not (tmp / f.name).exists():
            if f.is_dir() and not f.is_symlink():
                shutil.copytree(f, tmp / f.name, symlinks=True, copy_function=_link)
            else:
                _link(f, tmp / f.name)
    old = tmp.with_name(tmp.name + ".old")
    try:
        os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)  # the old checkpoint's files: the swap is done


def _move_into(tmp: Path, dest: Path) -> None:
    """tmp's entries moved into dest one by one over its old ones, the checkpoint's marker last (an interrupted
    move leaves a folder the next run replaces); dest's other files stay."""
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "flf2v_tiny.json"):
        if (dest / f.name).is_dir() and not (dest / f.name).is_symlink():
            shutil.rmtree(dest / f.name)
        os.replace(f, dest / f.name)
    tmp.rmdir()


def _link(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def demo_frames(size: tuple[int, int] = (128, 128)):
    """Two sample frames: a red ball on a wooden-coloured table, left then right (PIL images)."""
    from PIL import Image, ImageDraw

    w, h = size
    frames = []
    for cx in (w // 4, 3 * w // 4):
        im = Image.new("RGB", size, (150, 111, 51))
        d = ImageDraw.Draw(im)
        d.rectangle([0, 0, w, h // 3], fill=(200, 220, 240))
        r = h // 8
        d.ellipse([cx - r, h // 2 - r, cx + r, h // 2 + r], fill=(210, 30, 30))
        frames.append(im)
    return frames[0], frames[1]


def write_demo_frames(folder: str | os.PathLike, size: tuple[int, int] = (128, 128)) -> tuple[Path, Path]:
    """`demo_frames` as first.png and last.png in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "first.png", folder / "last.png")
    for path, im in zip(paths, demo_frames(size)):
        im.save(path)
    return paths


def _refusal(args) -> str | None:
    """Why these flags cannot run, before anything is written."""
    dest, frames = Path(args.ckpt_dir), args.frames
    if "" in (args.ckpt_dir, frames):  # an unset shell variable: '' wrote into the current folder
        return f"{'--frames' if args.ckpt_dir else 'the directory argument'} is an empty string; give a directory"
    if why := quoted_home(args.ckpt_dir):
        return f"{dest}: {why}"
    if not 0 <= args.seed < 2**63:  # as flf2v-run's --base_seed (past 64 bits: a traceback from the generator)
        return f"--seed {args.seed} is out of range; use 0..2^63-1"
    if dest.exists() and not dest.is_dir():
        return f"{dest} is a file; give a directory to write the checkpoint into"
    if dest.exists() and not (dest / "flf2v_tiny.json").exists() and any(dest.iterdir()):
        return f"{dest} exists and is not a tiny checkpoint written by this tool; choose an empty or new directory"
    if frames and Path(frames).exists() and not Path(frames).is_dir():
        return f"--frames {frames} is a file; give a directory for the two frames"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flf2v-make-tiny", description=__doc__.split("\n")[0])
    ap.add_argument("ckpt_dir", help="directory to write (an earlier tiny checkpoint there is replaced; other "
                                     "files in it are kept)")
    ap.add_argument("--preset", default="tiny", choices=[k for k, v in PRESETS.items() if v.t5.vocab < 100_000],
                    help="model preset (default: tiny)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    ap.add_argument("--frames", default=None, help="also write two sample frames first.png/last.png here")
    args = ap.parse_args(argv)
    dest = Path(args.ckpt_dir)
    if why := _refusal(args):
        print(f"flf2v-make-tiny: error: {why}", file=sys.stderr)
        return 2
    try:
        write_tiny_checkpoint(dest, args.preset, args.seed)
        if args.frames:
            write_demo_frames(args.frames)
    except OSError as e:  # a read-only or full disk: said in one line
        print(f"flf2v-make-tiny: error: {e.strerror or e} ({e.filename or dest}); choose another directory",
              file=sys.stderr)
        return 2
    print(f"wrote {args.preset} checkpoint (random weights, seed {args.seed}) to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
