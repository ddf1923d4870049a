"""What the engine backends (ort, trt, aoti) share: one `flf2v-build` folder's graphs behind the backend
contract of runtime/backend.py.

Shapes. A static folder serves one video shape. A dynamic one serves every grid inside one of its
profiles (contracts.DynamicShape): `set_video(height, width, frames)` checks that and fixes the root dims
(T, hp, wp) every dynamic I/O shape of the manifest is computed from (`io`); the buffers of a shape are
allocated when it is first run.
The VAE chunk loop lives here: each chunk step's caches come back as outputs and go in as the next
step's inputs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from flf2v.export import contracts as C
from flf2v.export import manifest as M
from flf2v.export.contracts import TORCH_DTYPES
from flf2v.export.manifest import EngineError
from flf2v.models.config import Preset
from flf2v.models.vae import decode_chunks, encode_chunks

from .engine_folders import build_serving, engine_video_shape, read_manifest

ENCODER_GRAPHS = ("t5", "clip", "vae_encode_first", "vae_encode_chunk")
DECODER_GRAPHS = ("vae_decode_first", "vae_decode_chunk")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file: a build writes each anew and renames it into place."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class EngineBackend:
    """Shared logic; subclasses provide `_run(graph, inputs) -> outputs` (lists of tensors). A backend with
    `static_caches` keeps the VAE caches in two sets per direction (`cache_sets`), swapped each chunk."""
    capturable = False
    static_caches = False

    def __init__(self, folder, ckpt_dir, preset: Preset, device, kind: str, loras=()):
        from . import loras as L
        self.folder, self.preset, self.device = Path(folder), preset, torch.device(device)
        self.ckpt_dir = ckpt_dir
        self.manifest = read_manifest(self.folder, ckpt_dir, preset, kind)
        self.loras = list(loras)  # [(models.lora.LoRA, scale)] this run applies to the DiT (runtime/loras.py)
        self.lora_swap = L.needs_swap(self.manifest, self.loras)
        self.shape = M.shape_of(self.manifest)
        self.quant = self.manifest.get("quant", "none")
        self.hint = M.hint_for(self.manifest, ckpt_dir, self.folder)
        if self.lora_swap and self.quant != "none":  # a swap writes high-precision weights over the FP8 ones
            raise L.refuse(self.folder, self.manifest, self.loras, f"{self.quant} engines",
                           M.hint_for(self.manifest, ckpt_dir, None, loras=L.lora_arg(self.loras)))
        self.video_shape = engine_video_shape(self.manifest)  # None: dynamic, any shape of its profiles
        self.specs = {g: e for g, e in self.manifest["engines"].items()}
        self.stamps = {f: _stamp(self.folder / f) for e in self.specs.values() for f in e.get("files", {})}
        self.cfg_batches = tuple(int(g[-1]) for g in self.specs if g.startswith("dit_b"))
        self.cache_sets: dict = {}  # "encode"/"decode" -> ([set A], [set B]), with static_caches
        self.dims: dict[str, int] | None = None if self.shape.dynamic else {}  # root dims of the current shape
        self.profile = 0  # the optimization profile serving them
        self._io: dict = {}

    def unchanged(self, graph: str) -> None:
        """Before a graph's files are opened (lazily, mid-run): EngineError unless they are those the folder held
        when the run began. A flf2v-build rewriting the folder (--force, another checkpoint) mixed two builds'
        engines in one video, exit 0, or failed with ONNX Runtime's traceback."""
        for f in self.specs[graph].get("files", {}):
            if _stamp(self.folder / f) != self.stamps[f]:
                raise EngineError(f"{self.folder}: {f} changed while this run used the folder (a flf2v-build into "
                                  f"it?); run again once the build has ended")

    # -- video shape ---------------------------------------------------------------------------------
    def check_video(self, height: int, width: int, frame_num: int) -> int:
        """The optimization profile serving this video shape (0 for static engines); EngineError naming
        the build that would serve it when these engines cannot."""
        if not self.shape.dynamic:
            profile = 0 if (height, width, frame_num) == self.video_shape else None
        else:
            profile = self.shape.profile_of(self.preset, frame_num, height, width)
        if profile is None:
            raise EngineError(self._outside(height, width, frame_num))
        return profile

    def set_video(self, height: int, width: int, frame_num: int) -> None:
        """Fix the video shape of the next runs (checked as by `check_video`)."""
        profile = self.check_video(height, width, frame_num)
        if not self.shape.dynamic:
            return
        dims = dict(zip(C.DIMS, self.shape.dims(self.preset, frame_num, height, width)))
        if dims != self.dims:
            self.dims, self.profile = dims, profile
            self._resized()

    def _outside(self, height: int, width: int, frame_num: int) -> str:
        name = build_serving(self.preset, height, width, frame_num)
        hint = M.hint_for(self.manifest, self.ckpt_dir, self.folder.parent / name, shape=name)
        return (f"the engines in {self.folder} serve {M.describe(self.manifest)}, but this run needs {width}x"
                f"{height}, {frame_num} frames (from --size, --frame_num and the first frame's aspect ratio); "
                f"{hint} for engines that serve it, or use --backend torch")

    def _resized(self) -> None:
        """The video shape changed: buffers of the old one are not reused (subclasses drop bindings)."""
        self.cache_sets.clear()

    def io(self, graph: str) -> tuple[list[dict], list[dict]]:
        """(inputs, outputs) specs of `graph` at the current video shape: every dim an int."""
        if self.dims is None:
            raise RuntimeError(f"{graph}: dynamic engines run after set_video(height, width, frames)")
        key = (graph, tuple(self.dims.values()))
        if key not in self._io:
            spec = self.specs[graph]
            self._io[key] = tuple([{**s, "shape": [C.dim_value(d, self.dims) for d in s["shape"]]} for s in spec[k]]
                                  for k in ("inputs", "outputs"))
        return self._io[key]

    def _zero_caches(self, graph: str) -> list[torch.Tensor]:
        return [torch.zeros(s["shape"], dtype=TORCH_DTYPES[s["dtype"]], device=self.device)
                for s in self.io(graph)[0] if s["name"].startswith("cache_in.")]

    def _caches(self, graph: str) -> list[torch.Tensor]:
        """The zero caches a first VAE chunk step starts from: fresh ones, or with static buffers the
        first of the two cache sets, zeroed."""
        if not self.static_caches:
            return self._zero_caches(graph)
        return [c.zero_() for c in self._cache_set(graph, 0)]

    # -- static VAE caches: two sets per direction, shared by the first and the chunk step -------------
    def _cache_set(self, graph: str, which: int) -> list[torch.Tensor]:
        kind = "decode" if "decode" in graph else "encode"
        if kind not in self.cache_sets:
            self.cache_sets[kind] = (self._zero_caches(graph), self._zero_caches(graph))
        return self.cache_sets[kind][which]

    def _cache_pair(self, graph: str, inputs: list[torch.Tensor]):
        """(caches in, caches out) for one VAE chunk step, or None for a graph without caches. Ping-pong:
        the outputs go to the set the inputs are not in (inputs from elsewhere are copied into set A)."""
        caches_in = [x for s, x in zip(self.specs[graph]["inputs"], inputs) if s["name"].startswith("cache_in.")]
        if not caches_in:
            return None
        a, b = self._cache_set(graph, 0), self._cache_set(graph, 1)
        src = b if caches_in[0].data_ptr() == b[0].data_ptr() else a
        for c, x in zip(src, caches_in):
            if c.data_ptr() != x.data_ptr():
                c.copy_(x)
        return src, (a if src is b else b)

    def _drop_cache_sets(self, loaded) -> None:
        """Forget the cache sets of a direction none of whose graphs is still `loaded`."""
        for kind in ("encode", "decode"):
            if all(not g.startswith(f"vae_{kind}") for g in loaded):
                self.cache_sets.pop(kind, None)

    # -- the networks (runtime/backend.py) -----------------------------------------------------------
    def encode_text(self, ids, mask):
        # The T5 engine has a static batch of 2 ([prompt, negative prompt]); a CFG-free run brings the prompt
        # alone, which fills both rows (a padding row would cost the same) and keeps the first.
        rows = self.specs["t5"]["inputs"][0]["shape"][0]
        if ids.shape[0] == rows:
            return self._run("t5", [ids, mask])[0]
        return self._run("t5", [ids.repeat(rows, 1), mask.repeat(rows, 1)])[0][:1]

    def encode_image(self, pixels):
        return self._run("clip", [pixels.float()])[0]

    def release_encoders(self) -> None:
        pass

    def prepare_denoise(self) -> None:
        self.release_encoders()

    def finish_denoise(self) -> None:
        # ONNX Runtime keeps its DiT sessions for the next run (on a CPU the host memory holds them beside the
        # decoder's); trt and aoti release theirs here, so that on a GPU the decoder has the DiT's room.
        pass

    def graph_token(self, cfg_batch: int):
        # not capturable: no CUDA graph of ours reads this backend's memory (trt and aoti name theirs)
        return None

    def denoise(self, x, t, context, clip_fea, y):
        return self._run(f"dit_b{x.shape[0]}", [x, t, context, clip_fea, y])[0]

    @property
    def steps_cache(self) -> bool:
        """Whether the folder holds the step cache's graphs (dit_b* with `hidden`, dit_cached_b*)."""
        return all(f"dit_cached_b{b}" in self.specs and len(self.specs[f"dit_b{b}"]["outputs"]) == 2
                   for b in self.cfg_batches)

    def denoise_full(self, x, t, context, clip_fea, y):
        v, hidden = self._run(f"dit_b{x.shape[0]}", [x, t, context, clip_fea, y])
        return v, hidden

    def denoise_cached(self, x, x_prev, t, y, hidden):
        return self._run(f"dit_cached_b{x.shape[0]}", [x, x_prev, t, y, hidden])[0]

    def _vae_step(self, kind: str):
        def step(x, caches, first):
            out = self._run(f"vae_{kind}_{'first' if first else 'chunk'}", [x.float(), *caches])
            return out[0].clone(), out[1:]  # clone: bound outputs are reused on the next call
        return step

    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        caches = self._caches("vae_encode_first")
        return encode_chunks(self._vae_step("encode"), video, caches, self.preset.vae.stride[0])

    def vae_decode(self, z: torch.Tensor, progress=None) -> torch.Tensor:
        return decode_chunks(self._vae_step("decode"), z, self._caches("vae_decode_first"), progress)
