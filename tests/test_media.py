"""Images in, mp4 out: conversions, the H.264 round trip and atomic writes."""
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from flf2v.runtime.media import (InputError, as_image, image_to_tensor, load_image, read_video, replacing, save_video,
                                 warn_if_stretched, warn_if_upscaled)


def smooth_video(f=9, h=48, w=64):
    t, y, x = torch.meshgrid(torch.linspace(0, 1, f), torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                             indexing="ij")
    return torch.stack([torch.sin(3 * x + 2 * t), torch.cos(2 * y - t), x * y]).clamp(-1, 1)


def test_mp4_round_trip(tmp_path):
    video = smooth_video()
    out = save_video(video, tmp_path / "sub" / "v.mp4")
    frames = read_video(out)
    assert frames.shape == (9, 48, 64, 3)
    ref = video.add(1).mul(127.5).permute(1, 2, 3, 0).numpy()
    psnr = 10 * np.log10(255**2 / np.mean((frames.astype(np.float64) - ref) ** 2))
    assert psnr > 35, f"H.264 round trip PSNR {psnr:.1f} dB"
    assert [p.name for p in out.parent.iterdir()] == ["v.mp4"], "temporary file left behind"


def test_mp4_quality_is_the_official_one(tmp_path):
    """The official cache_video writes with imageio quality=8, which imageio-ffmpeg maps to x264's CRF as
    int((1 - quality / 10) * 51); x264 records its settings in the stream."""
    official = int((1 - 8 / 10.0) * 51)
    data = save_video(smooth_video(), tmp_path / "v.mp4").read_bytes()
    got = data[data.index(b" crf=") + 5:].split(b" ")[0]
    assert float(got) == official, f"x264 crf {got!r}, the official quality=8 is crf {official}"


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="even"):
        save_video(smooth_video(h=47), tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


def test_image_to_tensor_matches_official_formula(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = image_to_tensor(Image.fromarray(a))
    ref = torch.from_numpy(a).permute(2, 0, 1).double() / 255 * 2 - 1
    assert t.shape == (3, 5, 7) and (t.double() - ref).abs().max() < 1e-6


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_become_rgb(tmp_path, mode):
    im = Image.new("RGB", (8, 6), (10, 200, 30)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        im = Image.fromarray((np.arange(48).reshape(6, 8) * 1000).astype(np.uint16))
    im.save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png")
    assert out.mode == "RGB" and out.size == (8, 6)


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored 400x200 with orientation 6 (rotate 90 degrees clockwise to view, EXIF 2.3 table 4)
    is a 200x400 portrait: what was the stored left (red) is the viewed top."""
    a = np.zeros((200, 400, 3), np.uint8)
    a[:, :200] = (220, 20, 20)
    a[:, 200:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = np.asarray(load_image(tmp_path / "phone.jpg"))
    assert out.shape == (400, 200, 3), out.shape
    top, bottom = out[:150].reshape(-1, 3).mean(0), out[250:].reshape(-1, 3).mean(0)
    assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0], (top, bottom)


def test_16_bit_scaled_by_the_types_range(tmp_path):
    """A uniform 16-bit 16384 is 16384 / 65535 of full scale: 63.75 -> 64 in 8 bits, not white."""
    Image.fromarray(np.full((6, 8), 16384, np.uint16)).save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert (out == 64).all(), np.unique(out)


def _variants(tmp_path):
    """Files that need care: alpha, palette transparency, grey + alpha, CMYK, 16-bit, EXIF, an sRGB profile."""
    from PIL import ImageCms
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    paths = {}
    for name, im, kw in (
            ("rgba.png", Image.fromarray(rgba), {}),
            ("palette.png", Image.fromarray(rgba[..., :3]).convert("P"), {"transparency": 3}),
            ("la.png", Image.fromarray(rgba[..., :2].copy(), "LA"), {}),
            ("cmyk.jpg", Image.fromarray(rgba, "CMYK"), {}),
            ("g16.png", Image.fromarray(rng.integers(0, 65536, (12, 10), dtype=np.uint16)), {}),
            ("exif.jpg", Image.fromarray(rgba[..., :3]), {"exif": _orientation(8)}),
            ("srgb.png", Image.fromarray(rgba[..., :3]),
             {"icc_profile": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()})):
        im.save(tmp_path / name, **kw)
        paths[name] = tmp_path / name
    return paths, rgba


def _orientation(v):
    exif = Image.Exif()
    exif[0x0112] = v
    return exif


def test_cli_and_api_read_a_frame_alike(tmp_path):
    paths, rgba = _variants(tmp_path)
    for name, path in paths.items():
        cli = np.asarray(load_image(path))
        with Image.open(path) as im:
            api = np.asarray(as_image(im))
        assert np.array_equal(cli, api) and np.array_equal(cli, np.asarray(as_image(str(path)))), name
    # RGBA over white, as viewers show it: c * a + 255 * (1 - a), to the rounding of Pillow's blend
    want = rgba[..., :3] * (rgba[..., 3:] / 255.0) + 255.0 * (1 - rgba[..., 3:] / 255.0)
    for got in (np.asarray(load_image(paths["rgba.png"])), np.asarray(as_image(rgba))):
        assert np.abs(got - want).max() <= 1.0, np.abs(got - want).max()
    # an embedded sRGB profile keeps the samples bit-exact (as the official code reads them)
    assert np.array_equal(np.asarray(load_image(paths["srgb.png"])), rgba[..., :3])
    assert np.asarray(load_image(paths["exif.jpg"])).shape == (10, 12, 3)  # orientation 8: a quarter turn


def test_a_wide_gamut_profile_is_applied_once(tmp_path, monkeypatch):
    """A non-sRGB profile converts the colours once, however often the frame is read again (the CLI loads it,
    `generate` and `request` read it again): the converted frame carries no profile."""
    from PIL import ImageCms
    rgb = np.random.default_rng(2).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(rgb).save(tmp_path / "p3.png", icc_profile=icc)
    monkeypatch.setattr(ImageCms, "getProfileDescription", lambda profile: "Display P3")  # as a phone's
    calls, convert = [], ImageCms.profileToProfile
    monkeypatch.setattr(ImageCms, "profileToProfile", lambda *a, **k: calls.append(1) or convert(*a, **k))
    once = load_image(tmp_path / "p3.png")
    again = as_image(as_image(once))
    assert len(calls) == 1 and "icc_profile" not in once.info, (calls, list(once.info))
    assert np.array_equal(np.asarray(again), np.asarray(once))


@pytest.mark.parametrize("bad,match", [(np.zeros((4, 4, 2), np.uint8), r"\[H, W, 3\|4\]"),
                                       (np.zeros((4, 4), np.int64), "uint8, uint16 or float"),
                                       (np.full((4, 4), np.nan), "NaN"),
                                       (np.full((4, 4), 200.0), "divide by 255"),
                                       (np.full((4, 4), 1.2), r"maximum is 1.2; clip it"),
                                       (np.linspace(-1, 1, 16).reshape(4, 4), r"\(x \+ 1\) / 2"),
                                       (Image.new("RGB", (0, 0)), r"empty \(0x0\)"),
                                       # said as "got shape ()" before: what it is, and the fix
                                       (None, r"^a frame is a NoneType; pass a path, a PIL image or an \[H, W, 3\]"),
                                       (b"\x89PNG\r\n", r"^a frame is a bytes; pass a path"),
                                       (torch.zeros(3, 8, 8), r"got shape \(3, 8, 8\) \(channels first: permute")])
def test_bad_arrays(bad, match):
    with pytest.raises(InputError, match=match):
        as_image(bad)


def test_arrays_of_every_dtype_read_alike():
    a8 = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    f = torch.from_numpy(a8 / 255.0)
    # a resize's overshoot of under half an 8-bit step rounds away; bf16 and autograd tensors have no NumPy view
    for a in (a8, a8.astype(np.uint16) * 257, a8 / 255.0, f * (1 + 1e-6) - 1e-6, f.requires_grad_()):
        assert np.array_equal(np.asarray(as_image(a)), a8), a.dtype
    b = f.detach().bfloat16()  # 8 mantissa bits: not every 8-bit level, so against its own fp32 values
    assert np.array_equal(np.asarray(as_image(b)), np.asarray(as_image(b.float().numpy())))


def test_a_damaged_exif_block_is_one_warning_naming_its_file(tmp_path):
    """The EXIF entry points past the block's end: Pillow warned once per read of the frame, naming no file."""
    ifd = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">HHHII", 1, 0x010F, 2, 12, 0x1A) + b"\x00" * 4 + b"ab"
    Image.new("RGB", (32, 16), (200, 30, 30)).save(tmp_path / "e.jpg", exif=b"Exif\x00\x00" + ifd)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        as_image(as_image(load_image(tmp_path / "e.jpg")))
    said = [str(w.message) for w in seen]
    assert len(said) == 1 and said[0].startswith(f"image {tmp_path / 'e.jpg'}: "), said


@pytest.mark.parametrize("ext", ["gif", "png", "webp"])
def test_an_animation_is_read_as_its_first_frame_and_said(tmp_path, ext):
    frames = [Image.new("RGB", (32, 16), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    frames[0].save(tmp_path / f"a.{ext}", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(tmp_path / f"still.{ext}", lossless=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first, still = load_image(tmp_path / f"a.{ext}"), load_image(tmp_path / f"still.{ext}")
    got, want = np.asarray(first, np.int16), np.asarray(still, np.int16)
    assert np.abs(got - want).max() <= 2 and want[0, 0].tolist() == [200, 30, 30], (got[0, 0], want[0, 0])
    assert [str(w.message) for w in seen] == [f"image {tmp_path / f'a.{ext}'}: an animation of 3 frames; its "
                                              f"first is used"]


@pytest.mark.parametrize("brand", [b"heic", b"mif1"])
def test_an_iphone_heic_photo_is_refused_with_the_fix(tmp_path, brand):
    """Pillow has no HEIC decoder: it said "cannot identify image file ... pass a valid PNG/JPEG file" of a photo."""
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftyp" + brand + b"\x00" * 4 + b"mif1heic" + b"\x00" * 64)
    with pytest.raises(InputError, match=r"IMG_0001.HEIC is a HEIC/HEIF photo, which Pillow cannot read; convert it "
                                         r"to PNG or JPEG"):
        load_image(tmp_path / "IMG_0001.HEIC")
    (tmp_path / "junk.png").write_bytes(b"\x00" * 64)  # any other unreadable file keeps the general line
    with pytest.raises(InputError, match="cannot be read .*; pass a valid PNG/JPEG file"):
        load_image(tmp_path / "junk.png")


def test_8_bit_values_in_a_16_bit_image_are_warned_of(tmp_path):
    """frame.convert("I") of an 8-bit photo is scaled by 65535 (as a 16-bit PNG must be): black, silently."""
    photo = Image.new("RGB", (8, 6), (200, 120, 40)).convert("L")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dark = np.asarray(as_image(photo.convert("I")))
        as_image(Image.fromarray((np.asarray(photo).astype(np.uint16) * 257)))  # real 16-bit: nothing said
    assert dark.max() <= 1, dark.max()
    assert [str(w.message) for w in seen] == [f"a 16-bit (I) image whose samples are at most {np.asarray(photo).max()} "
                                              f"of 65535 comes out nearly black; if it holds 8-bit values, convert "
                                              f"it to 'L' or 'RGB' first"], [str(w.message) for w in seen]


def test_a_float_image_file_is_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(tmp_path / "f.tiff")  # read as 0..255: black
    with pytest.raises(InputError, match="32-bit float image"):
        load_image(tmp_path / "f.tiff")


def test_a_last_frame_of_another_aspect_ratio_is_said_stretched():
    first = Image.new("RGB", (64, 48))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warn_if_stretched(first, Image.new("RGB", (130, 96)))  # 1.6 % off: the rounding of a resize
        warn_if_stretched(first, Image.new("RGB", (48, 64)))
    assert [str(w.message) for w in seen] == ["the last frame (48x64) has another aspect ratio than the first "
                                              "(64x48); it is stretched to the first's: crop it to match"]


def test_a_thumbnail_upscaled_more_than_4x_is_said():
    """An 8x8 icon became a 960x960 video's first frame without a word."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warn_if_upscaled("first", Image.new("RGB", (320, 180)), 720, 1280)  # 4x: a thumbnail's limit, not said
        warn_if_upscaled("last", Image.new("RGB", (8, 8)), 960, 960)
    assert [str(w.message) for w in seen] == ["the last frame (8x8) is upscaled 120x to 960x960; the video will "
                                              "start from a blurred image: give a larger photo"]


def test_a_long_name_the_file_system_takes_is_written(tmp_path):
    """A temporary name made from the target's ran past NAME_MAX for names of 237-255 bytes, after the run."""
    name = "a" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".mp4"
    assert save_video(smooth_video(f=1), tmp_path / name).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_replacing_a_file_keeps_its_mode_and_writes_through_a_link(tmp_path):
    (tmp_path / "old.mp4").write_bytes(b"old")
    os.chmod(tmp_path / "old.mp4", 0o600)
    (tmp_path / "link.mp4").symlink_to(tmp_path / "old.mp4")
    save_video(smooth_video(f=1), tmp_path / "link.mp4")
    assert (tmp_path / "link.mp4").is_symlink() and (tmp_path / "old.mp4").read_bytes()[4:8] == b"ftyp"
    assert (tmp_path / "old.mp4").stat().st_mode & 0o777 == 0o600
    with pytest.raises(OSError), replacing(tmp_path / "old.mp4") as tmp:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.mp4", "old.mp4"]


def test_a_ctrl_c_as_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "chmod", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_video(smooth_video(f=1), tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("fps", [0, -5, float("nan")])
def test_save_video_refuses_what_it_cannot_write(tmp_path, fps):
    with pytest.raises(ValueError, match="fps must be a positive number"):  # 0 was written as 24 fps
        save_video(smooth_video(), tmp_path / "v.mp4", fps=fps)
    with pytest.raises(ValueError, match="one frame or more"):  # was an empty file, said written
        save_video(smooth_video()[:, :0], tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


def test_bad_images(tmp_path):
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(InputError, match="cannot be read"):
        load_image(tmp_path / "not.png")
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(InputError, match="folder.png is a folder"):  # was "not found"
        load_image(tmp_path / "folder.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot be read"):
        load_image(tmp_path / "trunc.png")


def test_video_pixels_round_to_the_nearest_level_and_16_bit_samples_scale_by_65535():
    """Both half-level choices were unguarded: the output's rounding (README, Differences from the official
    code: the official truncates) and 16-bit samples over 65535 (the test values sat on exact 8-bit levels)."""
    from flf2v.runtime.media import video_to_uint8
    levels = torch.tensor([0.0, 127.5, 255.0, 10.4, 10.6, 200.49])  # (x + 1) * 127.5 of the pixels below
    video = (levels / 127.5 - 1).view(1, 1, 1, -1).expand(3, 1, 1, -1)
    got = video_to_uint8(video)[0, 0, :, 0].tolist()
    assert got == [0, 128, 255, 10, 11, 200], got  # 127.5 rounds to even, 128
    sixteen = as_image(np.full((4, 4), 51529, np.uint16))  # 51529 * 255 / 65535 = 200.502
    assert set(np.asarray(sixteen).ravel().tolist()) == {201}, np.unique(np.asarray(sixteen))
