"""Images in, mp4 out: conversions, the H.264 round trip and atomic writes."""
import numpy as np
import pytest
import torch
from PIL import Image

from flf2v.runtime.media import InputError, image_to_tensor, load_image, read_video, save_video


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


def test_bad_images(tmp_path):
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(InputError, match="cannot be read"):
        load_image(tmp_path / "not.png")
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot be read"):
        load_image(tmp_path / "trunc.png")
