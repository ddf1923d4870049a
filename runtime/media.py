"""Frames in (PIL images -> [-1, 1] tensors) and video out (H.264 mp4 through PyAV).

The mp4 is encoded under a temporary name beside the target and renamed only once complete, so a
crash or a full disk never leaves a playable-looking partial video.
"""
from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps


MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 8k x 8k; anything bigger is refused before it is decoded
HALF_STEP = 0.5 / 255  # float frames may overshoot [0, 1] by this (a bicubic resize does): it rounds away


class InputError(ValueError):
    """A user-supplied input (image, flag, path) is unusable; the message says how to fix it."""


class FrameError(InputError):
    """An input frame that can be read but not used (its shape): in a torchrun job each node reads its own frames,
    so the rank that has it says it."""


def check_output(flag: str, path: str) -> None:
    """An output path can be written, checked before anything loads: refused after the generation, the
    run would be lost. Folders that do not exist yet are made when the file is written."""
    p = Path(path)
    size, limit = len(os.fsencode(p.name)), os.pathconf(next(f for f in p.parents if f.is_dir()), "PC_NAME_MAX")
    if size > limit:
        raise InputError(f"{flag} {path}: the file name is {size} bytes, over the {limit} this file system "
                         f"takes; shorten it")
    if p.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file path in it")
    check_folder(flag, path, p.parent)


def check_folder(flag: str, path: str, folder: Path) -> None:
    """`folder` (or its nearest existing parent, when it is yet to be made) can take a new file."""
    from flf2v.models.layouts import quoted_home
    if why := quoted_home(path):
        raise InputError(f"{flag} {path}: {why}")
    while not folder.exists():
        if folder.is_symlink():  # the file's folders would be made through it: mkdir says only "File exists"
            raise InputError(f"{flag} {path}: {folder} is a link to {os.readlink(folder)}, which does not "
                             f"exist; choose another path")
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
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise InputError(f"image {path} is {im.width}x{im.height}, over the "
                                     f"{MAX_IMAGE_PIXELS // 2**20} Mpixel limit; downscale it first")
                im.load()
                out = to_rgb(im)
                # an animation reads as its first frame, as the official code's Image.open; a photo's MPO
                # preview (phones, stereo cameras) is not one
                if im.format in ("GIF", "PNG", "WEBP") and getattr(im, "n_frames", 1) > 1:
                    warnings.warn(f"an animation of {im.n_frames} frames; its first is used")
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image {path} is too large to decode safely ({e}); downscale it first") from None
    except PermissionError as e:  # before the HEIF sniff, which opens the file again
        raise InputError(f"image {path} cannot be read ({e.strerror}); check its permissions") from None
    except (OSError, SyntaxError, ValueError) as e:
        if _is_heif(path):  # phones' default photo format: Pillow has no HEVC decoder
            raise InputError(f"image {path} is a HEIC/HEIF photo, which Pillow cannot read; convert it to PNG or "
                             f"JPEG first (or export it from the phone as 'Most Compatible')") from None
        raise InputError(f"image {path} cannot be read ({e}); pass a valid PNG/JPEG file") from None
    # Pillow warns of a damaged EXIF block once per parse, naming no file: once, with its file
    for message in dict.fromkeys(" ".join(str(w.message).split()) for w in seen):
        warnings.warn(f"image {path}: {message}", stacklevel=2)
    return out


def _is_heif(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(12)
    return head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1",
                                                    b"msf1")


def as_image(x) -> Image.Image:
    """A frame given as a path, a PIL image or an array ([H, W] or [H, W, 3|4]; uint8, uint16, or float in
    [0, 1]) -> 8-bit RGB, the same whichever way it came: the API and the CLI read a photo alike."""
    if isinstance(x, (str, os.PathLike)):
        return load_image(x)
    if isinstance(x, Image.Image):
        if 0 in x.size:
            raise InputError(f"a frame image is empty ({x.width}x{x.height})")
        return to_rgb(x)
    if isinstance(x, torch.Tensor):  # autograd and bf16 tensors have no NumPy view
        x = x.detach().cpu()
        x = x.float() if x.dtype == torch.bfloat16 else x
    if not (isinstance(x, (list, tuple)) or hasattr(x, "__array__")):  # None, the bytes of a file, ...
        raise InputError(f"a frame is a {type(x).__name__}; pass a path, a PIL image or an [H, W, 3] array")
    a = np.asarray(x)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        chw = " (channels first: permute it to [H, W, C])" if a.ndim == 3 and a.shape[0] in (3, 4) else ""
        raise InputError(f"a frame array must be [H, W] or [H, W, 3|4], got shape {a.shape}{chw}")
    if a.dtype == np.uint16:
        a = a.astype(np.float64) / 65535.0
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise InputError("a frame array holds NaN or infinite values")
        lo, hi = a.min(), a.max()
        if hi > 1 + HALF_STEP:  # 0..255 floats would all clip to white
            raise InputError(f"a float frame array must be in [0, 1], its maximum is {hi:g}; "
                             + ("divide by 255" if hi > 2 else "clip it to [0, 1]"))
        if lo < -HALF_STEP:  # the model's own [-1, 1] would lose everything below mid-grey
            raise InputError(f"a float frame array must be in [0, 1], its minimum is {lo:g}; "
                             + ("for [-1, 1] data pass (x + 1) / 2" if lo >= -1 - HALF_STEP else "clip it to [0, 1]"))
        a = (np.clip(a, 0.0, 1.0) * 255.0).round()
    elif a.dtype != np.uint8:
        raise InputError(f"a frame array must be uint8, uint16 or float in [0, 1], got {a.dtype}")
    return to_rgb(Image.fromarray(a.astype(np.uint8)))


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit sRGB as viewers show it: EXIF orientation applied (phone photos are stored sideways), colours
    through the embedded ICC profile (CMYK, wide-gamut), 16-bit samples scaled by the type's range (not by
    the image's own maximum, which brightened dark frames), transparency composited on white."""
    if im.mode == "F":  # convert() clips floats to 0..255: a [0, 1] float image would come out black
        raise InputError("a 32-bit float image has no defined range; save it as an 8- or 16-bit PNG")
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
            warnings.warn(f"the image's ICC profile cannot be applied ({e}); reading its colours as sRGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey PNGs (Pillow reads some as 32-bit "I")
        a = np.asarray(im, dtype=np.float64)
        if 0 < a.max() <= 255:  # e.g. convert("I") of an 8-bit image: read as 16-bit it comes out black
            warnings.warn(f"a 16-bit ({im.mode}) image whose samples are at most {a.max():g} of 65535 comes out "
                          f"nearly black; if it holds 8-bit values, convert it to 'L' or 'RGB' first")
        im = Image.fromarray((np.clip(a, 0, 65535) * (255.0 / 65535.0)).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        im = bg
    out = im.convert("RGB")
    out.info = {}  # orientation and profile applied: read again (the API reads a PIL image), nothing changes
    return out


def warn_if_stretched(first: Image.Image, last: Image.Image) -> None:
    """The last frame is resized to the video's size, set by the first frame: another aspect ratio stretches."""
    ratio = (last.width * first.height) / (last.height * first.width)
    if not 1 / 1.05 < ratio < 1.05:
        warnings.warn(f"the last frame ({last.width}x{last.height}) has another aspect ratio than the first "
                      f"({first.width}x{first.height}); it is stretched to the first's: crop it to match")


def warn_if_upscaled(name: str, frame: Image.Image, height: int, width: int, limit: float = 4.0) -> None:
    """A thumbnail (an 8x8 icon became 960x960) is upscaled without a word otherwise: the video starts blurred."""
    scale = max(height / frame.height, width / frame.width)
    if scale > limit:
        warnings.warn(f"the {name} frame ({frame.width}x{frame.height}) is upscaled {scale:.3g}x to {width}x{height}; "
                      f"the video will start from a blurred image: give a larger photo")


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


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` to write, renamed onto it once complete and removed on any failure: a
    crash or a full disk leaves no partial file. A link is written through to its target; a file replaced
    keeps its permissions, a new one gets those any new file would (mkstemp makes 0600)."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # a short name of its own: one made from the target's name can pass the file system's limit where it does not
    fd, tmp = tempfile.mkstemp(prefix=".flf2v-", suffix=".part" + path.suffix, dir=path.parent)
    try:  # from the file's creation on: a Ctrl-C in the chmod left an empty .part file
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~umask)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_video(video: torch.Tensor, path: str | os.PathLike, fps: float = 16, crf: int = 10) -> Path:
    """Write [3, F, H, W] in [-1, 1] as an H.264 mp4 (yuv420p), atomically (`replacing`). CRF 10 is the
    official `cache_video`'s imageio quality=8 (imageio-ffmpeg: crf = int((1 - 8/10) * 51))."""
    import av

    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")  # 0 was written as 24 fps
    frames = video_to_uint8(torch.as_tensor(video))
    f, h, w, _ = frames.shape
    if f == 0 or h % 2 or w % 2:
        raise ValueError(f"H.264 needs one frame or more of even sizes, got {f} of {w}x{h}")
    with replacing(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as out:
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
    return Path(path)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """[F, H, W, 3] uint8 frames of a video file (for checks and round trips)."""
    import av

    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
