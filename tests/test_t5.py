"""umT5 encoder: parity with transformers' UMT5EncoderModel, checkpoint keys, export, meta build."""
import dataclasses

import torch

from flf2v.models.config import get_preset
from flf2v.models.keymaps import t5_to_transformers
from flf2v.models.t5 import UMT5Encoder, fp16_clamp

CFG = get_preset("tiny").t5


def randomize(model: torch.nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norm scales away from 1 so a dropped norm weight shows
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "embedding" in name or "shared" in name or "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def official_keys(cfg):
    keys = {"token_embedding.weight", "norm.weight"}
    for i in range(cfg.num_layers):
        keys |= {f"blocks.{i}.{n}.weight" for n in ("norm1", "norm2", "attn.q", "attn.k", "attn.v", "attn.o",
                                                    "ffn.gate.0", "ffn.fc1", "ffn.fc2",
                                                    "pos_embedding.embedding")}
    return keys


def batch(cfg, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab, (len(lengths), cfg.text_len), generator=g)
    mask = (torch.arange(cfg.text_len)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # pad id 0 past each length


def test_state_dict_keys_are_official():
    model = UMT5Encoder(CFG)
    assert set(model.state_dict()) == official_keys(CFG)
    assert model.state_dict()["blocks.1.pos_embedding.embedding.weight"].shape == (CFG.num_buckets, CFG.num_heads)


def test_parity_vs_transformers_umt5():
    from transformers import UMT5Config, UMT5EncoderModel

    model = randomize(UMT5Encoder(CFG)).eval()
    hf_cfg = UMT5Config(vocab_size=CFG.vocab, d_model=CFG.dim, d_kv=CFG.head_dim, d_ff=CFG.ffn_dim,
                        num_layers=CFG.num_layers, num_heads=CFG.num_heads,
                        relative_attention_num_buckets=CFG.num_buckets,
                        relative_attention_max_distance=CFG.max_distance, dropout_rate=0.0,
                        layer_norm_epsilon=CFG.eps, feed_forward_proj="gated-gelu", attn_implementation="eager")
    ref = UMT5EncoderModel(hf_cfg).eval()
    ref.load_state_dict(t5_to_transformers(model.state_dict()), strict=True)

    lengths = [CFG.text_len, 300, 7]  # full, beyond max_distance, short
    ids, mask = batch(CFG, lengths)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ours.dtype == torch.float32 and ours.shape == (3, CFG.text_len, CFG.dim)
    real = mask.bool()
    a, b = ours[real], theirs[real]
    err, rel = (a - b).abs().max().item(), ((a - b).abs().max() / b.abs().max()).item()
    assert rel < 1e-5, f"max abs {err:.3e} rel {rel:.3e}"
    assert ours[~real].abs().max().item() == 0.0
    print(f"T5 parity: max abs {err:.3e}, max rel {rel:.3e}")


def test_fp16_clamp_only_on_overflow():
    c = torch.finfo(torch.float16).max - 1000
    big = torch.tensor([65000.0, -1.0], dtype=torch.float16)
    assert torch.equal(fp16_clamp(big), big)  # no inf anywhere: untouched, as official
    inf = torch.tensor([float("inf"), 65000.0, -float("inf"), 3.0], dtype=torch.float16)
    want = torch.tensor([c, c, -c, 3.0]).half()
    assert torch.equal(fp16_clamp(inf), want)
    x = torch.tensor([float("inf")])
    assert torch.equal(fp16_clamp(x), x)  # fp32: never clamped


def test_export_matches_eager():
    cfg = dataclasses.replace(CFG, text_len=64)
    model = randomize(UMT5Encoder(cfg)).eval()
    ids, mask = batch(cfg, [64, 20])
    prog = torch.export.export(model, (ids, mask))
    with torch.no_grad():
        ref = model(ids, mask)
        out = prog.module()(ids, mask)
    ids2, mask2 = batch(cfg, [5, 64], seed=2)  # other mask in the same graph
    with torch.no_grad():
        assert torch.allclose(prog.module()(ids2, mask2), model(ids2, mask2), rtol=0, atol=1e-6)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6), (out - ref).abs().max()


def test_meta_build_then_assign():
    with torch.device("meta"):
        model = UMT5Encoder(CFG)
    assert all(p.is_meta for p in model.parameters())
    assert model.buckets.device.type == "cpu"
    assert torch.equal(model.buckets, UMT5Encoder(CFG).buckets)
    real = randomize(UMT5Encoder(CFG))
    model.load_state_dict(real.state_dict(), assign=True, strict=True)
    ids, mask = batch(CFG, [10, 3])
    with torch.no_grad():
        assert torch.equal(model(ids, mask), real(ids, mask))


def test_bf16_runs_and_returns_fp32():
    model = randomize(UMT5Encoder(CFG)).eval()
    ids, mask = batch(CFG, [40, 12])
    with torch.no_grad():
        ref = model(ids, mask)
        out = model.to(torch.bfloat16)(ids, mask)
    assert out.dtype == torch.float32
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.05, f"bf16 vs fp32 max rel {rel:.3e}"
    assert out[~mask.bool()].abs().max().item() == 0.0


def test_onnx_export_matches_eager(tmp_path):
    """ONNX (dynamo, opset 23) on onnxruntime; parameters left requiring grad, as a freshly built model."""
    import onnxruntime as ort

    cfg = dataclasses.replace(CFG, text_len=64)
    model = randomize(UMT5Encoder(cfg)).eval()
    ids, mask = batch(cfg, [64, 20])
    prog = torch.onnx.export(model, (ids, mask), dynamo=True, opset_version=23, verbose=False)
    assert "Attention" in {n.op_type for n in prog.model_proto.graph.node}
    prog.save(str(tmp_path / "t5.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "t5.onnx"), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), (ids, mask))})[0])
    with torch.no_grad():
        ref = model(ids, mask)
    err, rel = (out - ref).abs().max().item(), ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5, f"ORT vs eager: max abs {err:.3e} rel {rel:.3e}"
    print(f"T5 ONNX/ORT: max abs {err:.3e}, max rel {rel:.3e}")
