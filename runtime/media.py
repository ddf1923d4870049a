"""Frames in (PIL images -> [-1, 1] tensors) and video out (H.264 mp4 through PyAV).

The mp4 is encoded under a temporary name beside the target and renamed only once complete, so a
crash or a full disk never leaves a playable-looking partial video.
"""
from __future__ import annotations

import io
import os
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from flf2v.log import logger

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8k x 8k; anything bigger is refused before it is decoded


class InputError(ValueError):
    """A user-supplied input (image, flag, path) is unusable; the message says how to fix it."""


class FrameError(InputError):
    """An input frame that can be read but not used (its shape): in a torchrun job each node reads its own frames,
    so the rank that has it says it."""


def check_output(flag: str, path: str) -> None:
    """An output path can be written, checked before anything loads: refused after the generation, the
    run would be lost. Folders that do not exist yet are made when the file is written."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file path in it")
    check_folder(flag, path, p.parent)


def check_folder(flag: str, path: str, folder: Path) -> None:
    """`folder` (or its nearest existing parent, when it is yet to be made) can take a new file."""
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: {folder} is a file, not a folder; choose another path")
    try:  # access() says yes to root even on a read-only mount: try it
        fd, probe = tempfile.mkstemp(prefix=".flf2v-write-check.", dir=folder)
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write in {folder} ({e.strerror}); choose another path") from None
    os.close(fd)
    os.unlink(probe)


def load_image(path: str | os.PathLike) -> Image.Image:
    """An 8-bit RGB image from disk as an image viewer shows it (see `to_rgb`)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"image {path} is a folder; pass a PNG/JPEG file")
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
                return to_rgb(im)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image {path} is too large to decode safely ({e}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"image {path} cannot be read ({e}); pass a valid PNG/JPEG file") from None


def as_image(x) -> Image.Image:
    """A frame given as a path, a PIL image or an array ([H, W] or [H, W, 3|4]; uint8, uint16, or float in
    [0, 1]) -> 8-bit RGB, the same whichever way it came: the API and the CLI read a photo alike."""
    if isinstance(x, (str, os.PathLike)):
        return load_image(x)
    if isinstance(x, Image.Image):
        return to_rgb(x)
    a = np.asarray(x)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise InputError(f"a frame array must be [H, W] or [H, W, 3|4], got shape {a.shape}")
    if a.dtype == np.uint16:
        a = a.astype(np.float64) / 65535.0
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise InputError("a frame array holds NaN or infinite values")
        if a.max() > 1.0:  # 0..255 floats would all clip to white
            raise InputError(f"a float frame array must be in [0, 1], its maximum is {a.max():g}; divide by 255")
        a = (np.clip(a, 0.0, 1.0) * 255.0).round()
    elif a.dtype != np.uint8:
        raise InputError(f"a frame array must be uint8, uint16 or float in [0, 1], got {a.dtype}")
    return to_rgb(Image.fromarray(a.astype(np.uint8)))


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit sRGB as viewers show it: EXIF orientation applied (phone photos are stored sideways), colours
    through the embedded ICC profile (CMYK, wide-gamut), 16-bit samples scaled by the type's range (not by
    the image's own maximum, which brightened dark frames), transparency composited on white."""
    im = ImageOps.exif_transpose(im)
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "RGBA", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            # most photos embed sRGB itself: their samples are kept bit-exact, as the official code reads them
            if "srgb" not in ImageCms.getProfileDescription(src).lower().replace(" ", ""):
                im = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"),
                                               outputMode="RGBA" if im.mode == "RGBA" else "RGB")
                im.info.pop("icc_profile", None)  # now sRGB: a second read must not convert again
        except (ImageCms.PyCMSError, OSError) as e:  # a damaged profile: the samples as they are
            logger.warning("the image's ICC profile cannot be applied (%s); reading its colours as sRGB", e)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey PNGs (Pillow reads some as 32-bit "I")
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((np.clip(a, 0, 65535) * (255.0 / 65535.0)).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
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
            # One video saved again was sometimes another file (threaded x264 gave 5 files from 12 saves of one
            # 64x64 video; pixels off by up to 38): one x264 thread (the codec context's thread_count did not
            # reach it) and the RGB -> YUV conversion done before encode() made that rare but not gone (1 run
            # in 8 of 16 saves still had 2 files); 81 frames at 720p take about 1.5 s so (2-vCPU Xeon)
            stream.options = {"crf": str(crf), "threads": "1"}
            for frame in frames:
                yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
                out.mux(stream.encode(yuv))
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
