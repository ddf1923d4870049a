"""Images in, mp4 out: conversions, the H.264 round trip and atomic writes."""
import numpy as np
import pytest
import torch
from PIL import Image

from flf2v.runtime.media import InputError, as_image, image_to_tensor, load_image, read_video, save_video


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
                                       (np.full((4, 4), 200.0), "divide by 255")])
def test_bad_arrays(bad, match):
    with pytest.raises(InputError, match=match):
        as_image(bad)


def test_arrays_of_every_dtype_read_alike():
    a8 = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    for a in (a8, a8.astype(np.uint16) * 257, a8 / 255.0):
        assert np.array_equal(np.asarray(as_image(a)), a8), a.dtype


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
