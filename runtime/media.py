"""Frames in (PIL images -> [-1, 1] tensors) and video out (H.264 mp4 through PyAV).

The mp4 is encoded under a temporary name beside the target and renamed only once complete, so a
crash or a full disk never leaves a playable-looking partial video.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8k x 8k; anything bigger is refused before it is decoded


class InputError(ValueError):
    """A user-supplied input (image, flag, path) is unusable; the message says how to fix it."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image from disk; grey, palette, RGBA and 16-bit images are converted to 8-bit RGB."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {path} not found; pass an existing PNG/JPEG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise InputError(f"image {path} is {im.width}x{im.height}, over the "
                                     f"{MAX_IMAGE_PIXELS // 2**20} Mpixel limit; downscale it first")
                im.load()
                return _to_rgb(im)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image {path} is too large to decode safely ({e}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"image {path} cannot be read ({e}); pass a valid PNG/JPEG file") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((a * (255.0 / max(a.max(), 1.0))).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return bg
    return im.convert("RGB")


def image_to_tensor(im: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1], as the official `TF.to_tensor(img).sub_(0.5).div_(0.5)`."""
    a = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a [3, F, H, W] video, got shape {tuple(video.shape)}")
    x = video.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def save_video(video: torch.Tensor, path: str | os.PathLike, fps: float = 16, crf: int = 18) -> Path:
    """Write [3, F, H, W] in [-1, 1] as an H.264 mp4 (yuv420p), atomically."""
    import av

    path = Path(path)
    frames = video_to_uint8(video)
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {w}x{h}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part.mp4", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the video gets the mode any new file would
    try:
        with av.open(tmp, mode="w", format="mp4") as out:
            # a rational rate: 29.97 is 2997/100 (an int-only rate refused NTSC-like rates)
            stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(stream.encode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """[F, H, W, 3] uint8 frames of a video file (for checks and round trips)."""
    import av

    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
