"""LoRAs on engines: which LoRAs a folder's DiT was built with (manifest "loras"), and swapping them at run
time where the backend allows it.

A run's LoRAs are what it asks for (`--lora`, `Pipeline(..., loras=)`; none = the base model), whatever the
folder was built with. Equal lists (fingerprint and scale, in order) run the engines as they are. Otherwise
ONNX Runtime swaps without a rebuild: the DiT session is created from the folder's graph with its
LoRA-touched weights replaced by the checkpoint's weight merged with the run's LoRAs, the same fp32
values a fresh build with those LoRAs exports, so the swap equals that build; the keys of the
LoRAs the folder was built with are overridden too (with the base weight where the run does not change
them), so removing a LoRA restores the base exactly. The DiT's ONNX initializers keep their checkpoint
names ("net." + key) because the build always exports the DiT on the streamed route. TensorRT engines are
refused with the build command: a refit from the base weights would do it (refittable engines; TensorRT 11
notes that a plain refit can drop a GEMM bias unless the refit is identical), not built yet.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from flf2v.export import manifest as M
from flf2v.export.contracts import WEIGHT_PREFIX
from flf2v.export.manifest import EngineError


def describe(entries: list[dict]) -> str:
    return ", ".join(f"{Path(e['path']).name}:{e['scale']:g}" for e in entries) or "none"


def wanted(loras) -> list[dict]:
    """The manifest form of a run's [(LoRA, scale)]."""
    return [{"path": str(lora.path), "fingerprint": lora.fingerprint, "scale": float(scale)} for lora, scale in loras]


def needs_swap(manifest: dict, loras) -> bool:
    """Whether the run's LoRAs differ from those the folder's DiT was built with."""
    return M.lora_ids(manifest.get("loras")) != M.lora_ids(wanted(loras))


def lora_arg(loras) -> list[str]:
    """The run's LoRAs as `flf2v-build --lora` takes them, PATH:SCALE each ([] for none)."""
    return [f"{e['path']}:{e['scale']:g}" for e in wanted(loras)]


def refuse(folder, manifest: dict, loras, what: str, hint: str) -> EngineError:
    """Engines that cannot swap LoRAs (`what`: "TensorRT engines", "AOTInductor packages") built with other
    ones than the run's; `hint` names the build with the run's (a folder of its own: runs find it)."""
    return EngineError(f"{folder} was built with LoRAs {describe(manifest.get('loras') or [])}, this run asks for "
                       f"{describe(wanted(loras))}, and {what} cannot swap them; {hint} (without --engines, runs "
                       f"then pick it), or pass the --lora flags the folder was built with")


def _built_loras(manifest: dict, ckpt_dir, hint: str) -> list:
    """The LoRAs the folder was built with, read again from their recorded paths (their keys are what a
    swap must restore)."""
    from flf2v.models.checkpoint import dit_shapes
    from flf2v.models.lora import LoRAError, read_lora
    out, shapes = [], None
    for e in manifest.get("loras") or []:
        shapes = shapes or dit_shapes(ckpt_dir)
        try:
            lora = read_lora(e["path"], shapes)
        except (LoRAError, OSError) as err:
            raise EngineError(f"the LoRA these engines were built with cannot be read to swap it out ({err}); "
                              f"{hint}") from None
        if lora.fingerprint != e["fingerprint"]:
            raise EngineError(f"{e['path']} changed since these engines were built with it; {hint}")
        out.append(lora)
    return out


MAX_SWAP_BYTES = 1 << 31  # a swapped graph is handed to ONNX Runtime as one protobuf, which caps at 2 GB


def ort_model(onnx_path: Path, manifest: dict, ckpt_dir, loras, hint: str, subset: bool = False) -> bytes | str:
    """The DiT graph with the run's LoRAs in its weights, serialized for `InferenceSession(bytes)` (fp32
    graphs under 2 GB: the CPU's). Not `SessionOptions.add_initializer`: ONNX Runtime's constant folding
    folds the weights' Transposes from the file's values and drops the override (onnxruntime 1.32,
    checked on a two-node graph), and without that folding every call would transpose every weight."""
    import onnx
    from onnx import numpy_helper

    from flf2v.models import checkpoint as ck
    from flf2v.models.lora import merged_source
    if manifest.get("precision") != "fp32":
        raise EngineError(f"a LoRA swap on ONNX Runtime needs fp32 engines, these are {manifest.get('precision')}; "
                          f"{hint}")
    keys = {k for lora in _built_loras(manifest, ckpt_dir, hint) for k in lora.keys}
    keys |= {k for lora, _ in loras for k in lora.keys}
    model = onnx.load(str(onnx_path))
    if model.ByteSize() > MAX_SWAP_BYTES:
        raise EngineError(f"{onnx_path}: a LoRA swap holds the graph in memory, which caps at 2 GB; {hint}")
    inits = {t.name: t for t in model.graph.initializer}
    if subset:  # a graph with part of the DiT's weights (the cached step): swap those it has, if any
        keys = {k for k in keys if WEIGHT_PREFIX + k in inits}
        if not keys:
            return str(onnx_path)
    missing = sorted(k for k in keys if WEIGHT_PREFIX + k not in inits)
    if missing:
        raise EngineError(f"{onnx_path}: no initializer {WEIGHT_PREFIX + missing[0]} to swap a LoRA into (built "
                          f"by an flf2v before LoRA swaps); {hint}")
    source = merged_source(ck.tensor_source(ckpt_dir, "dit")[0], list(loras))
    for k in sorted(keys):
        inits[WEIGHT_PREFIX + k].CopyFrom(numpy_helper.from_array(
            np.ascontiguousarray(source[k]().float().numpy()), WEIGHT_PREFIX + k))
    return model.SerializeToString()
