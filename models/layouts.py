"""The checkpoint layouts a `--ckpt_dir` may hold, told apart by their files and keys, not by names alone.

- official: Wan-AI's `Wan2.1-FLF2V-14B-720P` folder (models/checkpoint.py's file names, official keys).
- diffusers: `Wan2.1-FLF2V-14B-720P-diffusers` (`model_index.json`; `transformer/`, `text_encoder/`,
  `image_encoder/`, `vae/`, `tokenizer/`): diffusers' and transformers' key names (models/keymaps.py).
- comfyui: ComfyUI's repackaged single files in one folder (any names): the DiT with official keys (bare or
  under `model.diffusion_model.`), umT5 and CLIP ViT-H with transformers' names, the VAE with official keys.
  Each file's role is read from its keys (the keys ComfyUI and diffusers detect these models by).

A layout is a `Layout`: per network the files and how its keys are named; models/checkpoint.py streams the
tensors from there into the same reference networks, renamed to the official keys.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

OFFICIAL, DIFFUSERS, COMFYUI = "official", "diffusers", "comfyui"
COMFY_DIT_PREFIX = "model.diffusion_model."
# A key only that network's file holds, per naming: diffusers' single-file detection keys ("wan", "wan_vae"
# in loaders/single_file_utils.py) and transformers' module names.
ROLE_KEYS = {
    "dit": ("head.modulation", COMFY_DIT_PREFIX + "head.modulation"),
    "t5": ("encoder.block.0.layer.0.SelfAttention.q.weight",),
    "clip": ("vision_model.encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.q_proj.weight"),
    "vae": ("decoder.middle.0.residual.0.gamma",),
}
# official folder: DiT config + weights, umT5, CLIP, VAE, tokenizer (models/checkpoint.py's names)
OFFICIAL_FILES = ("config.json", "diffusion_pytorch_model.safetensors.index.json",
                  "diffusion_pytorch_model.safetensors", "models_t5_umt5-xxl-enc-bf16.pth",
                  "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "Wan2.1_VAE.pth")
DIFFUSERS_PARTS = {"dit": "transformer", "t5": "text_encoder", "clip": "image_encoder", "vae": "vae"}
TOKENIZER_FOLDERS = ("google/umt5-xxl", "tokenizer", "umt5-xxl")  # looked for beside ComfyUI files


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the network; or the folder holds no
    checkpoint, two layouts at once, or files that cannot be told apart."""


@dataclass(frozen=True)
class Part:
    """One network's weights: its files (one, or the shards of an index) and how their keys are named."""
    files: tuple[Path, ...]
    naming: str  # "official", or "diffusers" (DiT, VAE) / "transformers" (umT5, CLIP)
    prefix: str = ""  # stripped from every key first

    @property
    def origin(self) -> str:
        # the file itself, not a link to it in the cache folder of files given one by one (file_view)
        first = Path(os.path.realpath(self.files[0]))
        return str(first) if len(self.files) == 1 else f"{first.parent} ({len(self.files)} shards)"


@dataclass(frozen=True)
class Layout:
    kind: str
    root: Path
    parts: dict  # "dit" | "t5" | "clip" | "vae" -> Part (official: filled by models/checkpoint.py)
    tokenizer: Path | None
    dit_config: Path | None  # official config.json / diffusers transformer/config.json; None: from shapes


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file (header only)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e}); re-download it") from None


def role_of(keys) -> tuple[str | None, str]:
    """(network, key prefix) a file's keys make it: ("dit", "model.diffusion_model.") ...; (None, "") if none."""
    have = set(keys)
    for role, markers in ROLE_KEYS.items():
        for m in markers:
            if m in have:
                if role == "dit":
                    return role, m[: -len("head.modulation")]
                return role, "vision_model." if m.startswith("vision_model.") else ""
    return None, ""


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a checkpoint of a layout flf2v reads (no place for engines): weights too, not
    a config.json alone."""
    try:
        detect(folder)
    except CheckpointError:
        return False
    return any(next(Path(folder).glob(f"*.{ext}"), None) for ext in ("safetensors", "pth"))


def detect(ckpt_dir: str | os.PathLike) -> Layout:
    """The layout of `ckpt_dir`; CheckpointError naming what is wrong and the fix."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory; point --ckpt_dir at a Wan2.1 checkpoint folder")
    official = [n for n in OFFICIAL_FILES if (d / n).exists()]
    diffusers = (d / "model_index.json").exists()
    # a LoRA or another model's file beside a checkpoint makes no second layout: only Wan2.1 networks count
    comfy = [p for p in sorted(d.glob("*.safetensors")) if not p.name.startswith("diffusion_pytorch_model")
             and role_of(safetensors_keys(p))[0] is not None]
    found = [name for name, there in ((OFFICIAL, official), (DIFFUSERS, diffusers), (COMFYUI, comfy)) if there]
    if len(found) > 1:
        what = {OFFICIAL: f"official files ({', '.join(official[:3])})", DIFFUSERS: "a diffusers model_index.json",
                COMFYUI: f"single .safetensors files ({', '.join(p.name for p in comfy[:3])})"}
        raise CheckpointError(f"{d} holds two checkpoint layouts: {' and '.join(what[f] for f in found)}; "
                          f"keep one layout per folder and point --ckpt_dir at it")
    if not found:
        raise CheckpointError(f"{d}: no Wan2.1 checkpoint here: expected the official files (config.json, "
                          f"diffusion_pytorch_model*.safetensors, *.pth), a diffusers folder (model_index.json) or "
                          f"ComfyUI's .safetensors files; or write a test one with `flf2v-make-tiny DIR`")
    if found[0] == OFFICIAL:
        return Layout(OFFICIAL, d, {}, d / "google/umt5-xxl", d / "config.json")
    return _diffusers(d) if found[0] == DIFFUSERS else _comfyui(d, comfy)


def _shards(folder: Path, what: str) -> tuple[Path, ...]:
    """The safetensors of one diffusers/transformers component folder: the shards its index lists, or its
    single file."""
    index = next(iter(sorted(folder.glob("*.safetensors.index.json"))), None)
    if index is not None:
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard {missing[0]} is listed but missing from {folder}; re-download it")
        return tuple(folder / n for n in names)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{folder}: expected the {what} weights as one .safetensors file or shards with an "
                          f"index, found {len(files)} .safetensors files; re-download that folder")
    return tuple(files)


def _diffusers(d: Path) -> Layout:
    parts = {}
    for role, sub in DIFFUSERS_PARTS.items():
        folder = d / sub
        if not folder.is_dir():
            raise CheckpointError(f"{d}: diffusers folder without {sub}/ (the {role} weights); re-download it")
        files = _shards(folder, role)
        naming = "diffusers" if role in ("dit", "vae") else "transformers"
        prefix = role_of(safetensors_keys(files[0]))[1] if role == "clip" else ""
        parts[role] = Part(files, naming, prefix)
    return Layout(DIFFUSERS, d, parts, d / "tokenizer", d / "transformer" / "config.json")


def _comfyui(d: Path, files: list[Path]) -> Layout:
    by_role: dict[str, list[tuple[Path, str]]] = {}
    for f in files:
        role, prefix = role_of(safetensors_keys(f))
        by_role.setdefault(role, []).append((f, prefix))
    parts = {}
    for role in ("dit", "t5", "clip", "vae"):
        got = by_role.get(role, [])
        if len(got) != 1:
            why = (f"no {role} file; add it" if not got else
                   f"{len(got)} {role} files ({', '.join(f.name for f, _ in got)}); keep one")
            raise CheckpointError(f"{d}: ComfyUI folder with {why}, or give the four files with --dit, --t5, --clip "
                                  f"and --vae FILE (and --tokenizer DIR) instead of --ckpt_dir")
        f, prefix = got[0]
        parts[role] = Part((f,), "official" if role in ("dit", "vae") else "transformers", prefix)
    tok = next((d / t for t in TOKENIZER_FOLDERS if (d / t).is_dir()), None)
    return Layout(COMFYUI, d, parts, tok, None)


def _check_file(role: str, given, path: Path) -> None:
    """CheckpointError unless `path` is a whole safetensors file of network `role` (header only)."""
    if not path.is_file():
        raise CheckpointError(f"--{role} {given}: no such file")
    if zipfile.is_zipfile(path):  # the official umT5, CLIP and VAE files are PyTorch .pth zips
        raise CheckpointError(f"--{role} {given}: a PyTorch .pth file, not safetensors; the official .pth files "
                              f"load from their checkpoint folder: pass it as --ckpt_dir")
    keys = safetensors_keys(path)
    found, prefix = role_of(keys)
    if found is None:
        raise CheckpointError(f"--{role} {given}: holds none of Wan2.1's networks under the official or ComfyUI "
                              f"names; a diffusers model loads from its folder: pass that as --ckpt_dir")
    if found != role:
        raise CheckpointError(f"--{role} {given}: holds the {found} weights, not the {role}'s; pass it as --{found}")
    if role == "dit" and prefix + "patch_embedding.weight" not in keys:
        raise CheckpointError(f"--dit {given}: a part of a DiT (no patch_embedding.weight), one shard of a sharded "
                              f"checkpoint: pass its folder as --ckpt_dir")


def file_view(files: dict[str, str | os.PathLike | None], tokenizer, cache: Path) -> Path:
    """A ComfyUI folder of links to files given one by one (`--dit --t5 --clip --vae FILE`, `--tokenizer
    DIR`; ComfyUI keeps them in separate models/ subfolders). The same files always give the same folder
    under `cache`, so it serves later as `--ckpt_dir` (engines, step-cache calibrations) too."""
    import hashlib
    import tempfile

    missing = [f"--{role}" for role in ROLE_KEYS if not files.get(role)]
    if missing:
        raise CheckpointError(f"{' '.join(missing)} missing: files given one by one need all of --dit, --t5, "
                              f"--clip and --vae (or put them in one folder and pass --ckpt_dir)")
    paths = {role: Path(files[role]).resolve() for role in ROLE_KEYS}
    for role, path in paths.items():
        _check_file(role, files[role], path)
    tok = Path(tokenizer).resolve() if tokenizer else None
    if tok is not None and not tok.is_dir():
        raise CheckpointError(f"--tokenizer {tokenizer}: no such folder (give the folder of umT5's tokenizer files)")
    if tok is None:  # as for a folder of ComfyUI files: one beside them (ComfyUI ships none)
        tok = next((p.parent / n for p in paths.values() for n in TOKENIZER_FOLDERS if (p.parent / n).is_dir()), None)
    links = {f"{role}.safetensors": p for role, p in paths.items()} | ({"tokenizer": tok} if tok else {})
    key = hashlib.sha256(repr(sorted((k, str(v)) for k, v in links.items())).encode()).hexdigest()[:16]
    folder = Path(cache) / key
    if not folder.is_dir():
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
        except OSError as e:  # a read-only HOME: "Read-only file system (~/.cache)" named no fix
            raise CheckpointError(f"files given one by one are read through a folder of links in {folder.parent}, "
                                  f"which cannot be written ({e.strerror}); set XDG_CACHE_HOME to a writable "
                                  f"folder, or put the files in one folder and pass --ckpt_dir") from None
        for name, target in links.items():
            (tmp / name).symlink_to(target)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first: theirs is the same
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return folder


def quoted_home(path) -> str | None:
    """Why an output path is refused: a '~' no shell expanded (it was quoted) would make a folder named '~'
    here, and "wrote ~/out.mp4" read as the home folder. None for any other path, or a folder '~' that exists."""
    text = str(path)
    if text.startswith("~") and not Path(Path(text).parts[0]).exists():
        return f"'~' is not expanded here (the path was quoted); write {os.path.expanduser(text)}"
    return None


# ---- the checkpoint flags of flf2v-run and flf2v-build ---------------------------------------------

def add_checkpoint_flags(add) -> None:
    """--ckpt_dir, or the files one by one (ComfyUI keeps them in separate models/ subfolders)."""
    add("--ckpt_dir", default=None, help="Wan2.1 checkpoint folder: the official one, a diffusers folder or a folder "
                                         "of ComfyUI's single files (README: Checkpoints)")
    for role, what in (("dit", "the DiT"), ("t5", "umT5"), ("clip", "CLIP ViT-H"), ("vae", "the VAE")):
        add(f"--{role}", default=None, metavar="FILE",
            help=f"{what}'s .safetensors file, for files in separate folders: --dit, --t5, --clip and --vae "
                 f"together instead of --ckpt_dir")
    add("--tokenizer", default=None, metavar="DIR",
        help="umT5's tokenizer folder, for ComfyUI files (they ship none; else found beside them)")


def cache_folder() -> Path:
    """Where the folders of links to files given one by one live ($XDG_CACHE_HOME/flf2v/checkpoints)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flf2v" / "checkpoints"


def ckpt_dir_of(args) -> str:
    """The folder the run reads: --ckpt_dir, or a folder of links to --dit/--t5/--clip/--vae (+ --tokenizer).
    CheckpointError (one line) for a mix that cannot be meant; reads file headers only."""
    files = {role: getattr(args, role, None) for role in ROLE_KEYS}
    given = [f"--{r}" for r, f in files.items() if f]
    if args.ckpt_dir and given:
        raise CheckpointError(f"give --ckpt_dir or the files ({' '.join(given)}), not both")
    if args.ckpt_dir and not args.tokenizer:
        return args.ckpt_dir
    if args.ckpt_dir:  # --tokenizer for a folder of ComfyUI files without one
        layout = detect(args.ckpt_dir)
        if layout.kind != COMFYUI:
            raise CheckpointError(f"--tokenizer is for ComfyUI files; {args.ckpt_dir} is a {layout.kind} folder "
                                  f"with its own tokenizer: drop --tokenizer")
        files = {role: part.files[0] for role, part in layout.parts.items()}
    elif not given:
        raise CheckpointError("--ckpt_dir is required: a Wan2.1 checkpoint folder (or --dit, --t5, --clip and --vae "
                              "FILE for single files); `flf2v-make-tiny DIR` writes a test one")
    return str(file_view(files, args.tokenizer, cache_folder()))
