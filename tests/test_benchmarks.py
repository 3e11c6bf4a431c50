"""The benchmark harness: FLOP and byte counts, case shapes, result files and the summary (never timings)."""
import csv
import json
import math
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import segvit
from benchmarks import __main__ as bench_main
from benchmarks import cases, counts, measure, report, summarize
from segvit.ops import use_backend


# ---------------------------------------------------------------- counts against hand computation

def test_atm_attention_counts_by_hand():
    # B2 Nq3 Nk5 H2 D4: one (3, 4) x (4, 5) product per (b, h) is 2*3*5*4 = 120 FLOPs, 4 of them = 480
    assert counts.atm_attention(2, 3, 5, 2, 4) == (2 * 480, 4 * (48 + 80 + 80 + 48 + 30))
    # backward: 4 more products; incoming gradients out (48) and sim (30), gradients q, k, v (48 + 160)
    assert counts.atm_attention(2, 3, 5, 2, 4, backward=True) == (6 * 480, 4 * (286 + 78 + 208))
    assert counts.atm_attention(2, 3, 5, 2, 4, elem=2)[1] == 2 * 286


def test_query_pool_attention_counts_by_hand():
    # B1, grid 2x3 -> L6, L'2, C4: projections 2*16*(2 + 12) = 448, attention 4*2*6*4 = 192
    assert counts.query_pool_attention(1, 6, 2, 4) == (640, 4 * (24 + 48 + 12 + 8))
    assert counts.query_pool_attention(1, 6, 2, 4, backward=True) == (3 * 640, 4 * (92 + 8 + 84))


def test_mask_classify_counts_by_hand():
    # B1 Q3 K3, 2x5 -> 4x6: 2*3*3*24 = 432; read 3*4 + 3*10, write 3*24
    assert counts.mask_classify(1, 3, 3, (2, 5), (4, 6)) == (432, 4 * (12 + 30 + 72))


def test_mask_losses_counts_by_hand():
    # B2 K5, 3x4 masks, 6x7 labels, 3 present pairs: 126 label pixels
    assert counts.mask_losses(2, 5, (3, 4), (6, 7), 3) == (24 * 126, 2 * 42 * 8 + 3 * 12 * 4 + 3 * 4)
    # backward: 24 more per pixel, 3 incoming scalars read, the whole (2, 5, 3, 4) gradient written
    assert counts.mask_losses(2, 5, (3, 4), (6, 7), 3, backward=True) == (48 * 126, 828 + 12 + 480)


def test_roofline_floor():
    assert counts.roofline_floor(100, 10, 10.0, 5.0) == 10.0  # compute-bound
    assert counts.roofline_floor(100, 1000, 10.0, 5.0) == 200.0  # memory-bound
    assert counts.roofline_floor(100, None, 10.0, 5.0) == 10.0  # model cases have no byte count


def _counted(fn):
    flops, _ = measure.count_flops(fn)
    with FlopCounterMode(display=False) as counter:
        fn()
    assert counter.get_total_flops() == flops  # the harness's counter is PyTorch's
    return flops


@pytest.mark.parametrize("backward", [False, True])
def test_attention_flops_match_torch_flop_counter(backward):
    """The product counts are what PyTorch's own counter sees in the eager (original) computation."""
    q, k, v = (torch.randn(2, n, 3, 8, requires_grad=backward) for n in (5, 7, 7))

    def atm():
        with use_backend("eager"):
            out, sim = segvit.ops.atm_attention(q, k, v)
        if backward:
            torch.autograd.grad((out, sim), (q, k, v), (torch.randn_like(out), torch.randn_like(sim)))

    assert _counted(atm) == counts.atm_attention(2, 5, 7, 3, 8, backward=backward)[0]
    x = torch.randn(2, 15, 12, requires_grad=backward)
    w, b = torch.randn(36, 12, requires_grad=backward), torch.randn(36, requires_grad=backward)

    def qpa():
        with use_backend("eager"):
            out = segvit.ops.query_pool_attention(x, (3, 5), w, b, 3)
        if backward:
            torch.autograd.grad(out, (x, w, b), torch.randn_like(out))

    assert _counted(qpa) == counts.query_pool_attention(2, 15, 6, 12, backward=backward)[0]


def test_mask_classify_flops_match_torch_flop_counter():
    cl, ml = torch.randn(2, 5, 7), torch.randn(2, 5, 3, 4)
    with use_backend("eager"):
        assert _counted(lambda: segvit.ops.mask_classify(cl, ml, (9, 11))) == \
            counts.mask_classify(2, 5, 6, (3, 4), (9, 11))[0]


# ---------------------------------------------------------------- the cases are the published shapes

def _by_id(settings):
    return {c.id: c for c in cases.build_cases(settings)}


def test_cases_use_the_published_shapes_and_counts():
    cpu = _by_id(cases.Settings(device="cpu"))
    vit_b = cpu["atm_attention/vit-b16_ade20k_512/fwd/float32"]
    assert "B2 Nq150 Nk1024 H12 D32" in vit_b.label and vit_b.batch == 2  # issue 4's CPU batch
    assert vit_b.flops == 2 * 4 * 12 * 150 * 1024 * 32  # two (150, 32) x (32, 1024) products per image and head
    assert "Nq150 Nk1600 H16 D32" in cpu["atm_attention/vit-l16_shrunk_ade20k_640/fwd+bwd/float32"].label
    assert "Nq171 Nk1024" in cpu["atm_attention/vit-l16_cocostuff10k_512/fwd/float32"].label
    assert "Nq60 Nk900" in cpu["atm_attention/vit-l16_pc60_480/fwd/float32"].label
    qpa = cpu["query_pool_attention/vit-l16_shrunk_ade20k_640/fwd/float32"]
    assert "B1 L1600->400 C1024 H16" in qpa.label
    assert qpa.flops == 2 * 1024 * 1024 * (400 + 3200) + 4 * 400 * 1600 * 1024
    mc = cpu["mask_classify/vit-l16_shrunk_ade20k_640/fwd/float32"]
    assert "Q150 40x40->640x640" in mc.label and mc.flops == 2 * 150 * 150 * 640 * 640
    assert mc.bytes == 4 * (150 * 151 + 150 * 1600 + 150 * 640 * 640)
    assert {c.group for c in cpu.values()} == set(cases.GROUPS)
    assert sum(c.group == "models" for c in cpu.values()) == 4  # predict and train of both models
    gpu = _by_id(cases.Settings(device="cuda", dtypes=("float32", "bfloat16")))
    assert gpu["atm_attention/vit-b16_ade20k_512/fwd/bfloat16"].batch == 8
    assert "models/vit-l16_shrunk_ade20k_640/train/bf16-autocast" in gpu
    variants = [v.name for v in gpu["atm_attention/vit-b16_ade20k_512/fwd/float32"].variants]
    assert variants[:3] == ["eager", "torch (sdpa+matmul)", "xformers"] and {"triton", "cuda"} <= set(variants)


def test_mask_losses_case_counts_its_present_pairs():
    labels = cases.blob_labels(2, 64, 150, seed=3)
    assert labels.shape == (2, 64, 64) and (labels == 255).any()
    present = [set(l.unique().tolist()) - {255} for l in labels]
    assert [len(p) for p in present] == [cases.PRESENT_CLASSES] * 2
    case = _by_id(cases.Settings(device="cpu", quick=True))["mask_losses/vit-b16_ade20k_512/fwd/float32"]
    assert case.batch == 2 and "20 masks" in case.label  # issue 4's loss case: B 2, 20 present (image, class) pairs
    assert case.flops == counts.mask_losses(
        2, 150, (32, 32), (512, 512), 2 * cases.PRESENT_CLASSES)[0]


@pytest.mark.parametrize("group", ["atm_attention", "query_pool_attention", "mask_losses", "mask_classify"])
def test_torch_compositions_match_eager(group):
    """The plain-PyTorch baselines compute the op (a fast wrong baseline would flatter nothing)."""
    torch.manual_seed(0)
    with use_backend("eager"):
        if group == "atm_attention":
            q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8)
            got, want = cases.atm_torch(q, k, v, 8 ** -0.5), segvit.ops.atm_attention(q, k, v)
        elif group == "query_pool_attention":
            x, w, b = torch.randn(2, 15, 12), torch.randn(36, 12), torch.randn(36)
            got = cases.query_pool_torch(x, (3, 5), w, b, 3)
            want = segvit.ops.query_pool_attention(x, (3, 5), w, b, 3)
        elif group == "mask_losses":
            m, lab = torch.randn(2, 6, 5, 7), cases.blob_labels(2, 24, 6, seed=1, present=3)
            got, want = cases.mask_losses_torch(m, lab)[:2], segvit.ops.mask_losses(m, lab)[:2]
        else:
            cl, ml = torch.randn(2, 5, 7), torch.randn(2, 5, 3, 4)
            got, want = cases.mask_classify_torch(cl, ml, (9, 11)), segvit.ops.mask_classify(cl, ml, (9, 11))
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- memory sampling

def test_sampled_peak_sees_a_freed_temporary():
    mib = 2 ** 20

    def call():
        temporary = torch.ones(64 * mib // 4)  # touched: resident
        return temporary[:4].sum().reshape(1)

    peak, out = measure.sampled_peak(call)
    assert peak >= 60 * mib and out == 4


# ---------------------------------------------------------------- result files and summary from a tiny run

def _tiny_cases(settings):
    def setup():
        return dict(q=torch.randn(1, 3, 2, 4), k=torch.randn(1, 5, 2, 4), v=torch.randn(1, 5, 2, 4))

    call = lambda st: segvit.ops.atm_attention(st["q"], st["k"], st["v"])  # noqa: E731

    def refuse(state, check=True):
        raise cases.NotAvailable("no such kernel here")

    def broken(state, check=True):
        raise ZeroDivisionError("a bug in a variant")

    flops, moved = counts.atm_attention(1, 3, 5, 2, 4)
    variants = [cases._backend_variant("eager", call),
                cases._plain_variant("torch (sdpa+matmul)", lambda st: cases.atm_torch(st["q"], st["k"], st["v"], 0.5)),
                cases.Variant("refusing", refuse), cases.Variant("broken", broken)]
    return [cases.Case("atm_attention/tiny/fwd/float32", "atm_attention", "tiny: B1 Nq3 Nk5 H2 D4", "fwd", "float32",
                       1, setup, variants, flops, moved)]


class _FakeMemory:
    def measure(self, settings, case_id, variant, warmup=True):
        return {"peak_bytes": {"eager": 4 * 2 ** 20}.get(variant, 2 ** 20), "output_bytes": 1024}


def test_tiny_run_writes_the_documented_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cases, "build_cases", _tiny_cases)
    monkeypatch.setattr(measure, "MemoryServer", _FakeMemory)
    peaks = {"matmul_flops": {"float32": 1e9}, "copy_bandwidth": 1e8, "matmul_shape": {"float32": [1, 1, 1]}, "copy_bytes": 1}
    monkeypatch.setattr(measure, "device_peaks", lambda *a, **k: peaks)
    out = tmp_path / "out"
    bench_main.main(["--device", "cpu", "--quick", "--ops", "atm_attention", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "tiny: B1" in printed and "n/a: no such kernel here" in printed

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"schema", "meta", "results"}
    meta = results["meta"]
    for key in ("device", "device_name", "cpu_model", "cores", "threads", "torch", "triton", "settings", "peaks",
                "backends", "duration_s"):
        assert key in meta
    rows = {r["variant"]: r for r in results["results"]}
    assert list(rows) == ["eager", "torch (sdpa+matmul)", "refusing", "broken"]
    for row in rows.values():
        assert list(row) == report.FIELDS
        assert row["device"] == "cpu" and row["cores"] == os.cpu_count() and row["quick"] is True
    eager, plain = rows["eager"], rows["torch (sdpa+matmul)"]
    assert eager["status"] == "ok" and eager["speedup_vs_eager"] == 1.0 and eager["rounds"] == 3
    assert eager["p20_ms"] <= eager["median_ms"] <= eager["p80_ms"]
    assert plain["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / plain["median_ms"])
    assert plain["peak_mem_mb"] == 1.0 and plain["mem_ratio_vs_eager"] == 0.25
    assert plain["scratch_mb"] == 1.0 - 1 / 1024 and eager["scratch_mb"] == 4.0 - 1 / 1024
    assert plain["scratch_ratio_vs_eager"] == pytest.approx((1024 - 1) / (4096 - 1))
    flops, moved = counts.atm_attention(1, 3, 5, 2, 4)
    floor_ms = max(flops / 1e9, moved / 1e8) * 1e3
    assert plain["flops"] == flops and plain["bytes"] == moved and plain["floor_ms"] == pytest.approx(floor_ms)
    assert plain["roofline_pct"] == pytest.approx(100 * floor_ms / plain["median_ms"])
    assert plain["gflops_per_s"] == pytest.approx(flops / plain["median_ms"] / 1e6)
    assert rows["refusing"]["status"] == "n/a" and rows["refusing"]["reason"] == "n/a: no such kernel here"
    assert rows["broken"]["status"] == "error" and "ZeroDivisionError" in rows["broken"]["reason"]
    assert rows["broken"]["median_ms"] is None

    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["variant"] for r in csv_rows] == list(rows) and list(csv_rows[0]) == report.FIELDS
    assert math.isclose(float(csv_rows[1]["median_ms"]), plain["median_ms"])
    assert (out / "table.txt").read_text().strip() and (out / "plots" / "atm_attention.png").stat().st_size > 1000

    full = summarize.summary_markdown(results)
    assert "| atm_attention | tiny: B1 Nq3 Nk5 H2 D4 | fwd | torch (sdpa+matmul) |" in full
    assert "n/a: no such kernel here" in full and full.count("\n| atm_attention |") == 4
    compact = summarize.compact_markdown(results)
    assert compact.count("\n| atm_attention |") == 1 and "refusing: n/a (no such kernel here)" in compact
    assert f"mem {plain['mem_ratio_vs_eager']:.2f}" in compact

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{summarize.BEGIN}\nold numbers\n{summarize.END}\n\nafter\n")
    summarize.main([str(out), "--compact", "--readme", str(readme)])
    text = readme.read_text()
    assert "old numbers" not in text and "tiny: B1" in text
    assert text.startswith("# title\n\n" + summarize.BEGIN) and text.endswith(summarize.END + "\n\nafter\n")


def test_model_cases_run_in_fresh_worker_processes():
    """The CPU model path end to end on a tiny model: one fresh process per variant, memory and FLOPs of the
    first call, interleaved timing blocks."""
    from conftest import tiny_config

    settings = cases.Settings(device="cpu", quick=True, groups=("models",),
                              models=({"name": "tiny", "model": tiny_config()},))
    predict, train = cases.build_cases(settings)
    assert (predict.id, train.id) == ("models/tiny/predict/float32", "models/tiny/train/float32")
    # predict runs under no_grad with parameters that require grad (where FlopCounterMode's module tracker fails)
    assert measure.count_flops(predict.variants[0].make(predict.setup(), check=False))[0] > 0
    server = measure.MemoryServer()
    for case in [train]:  # one case: each worker process costs seconds
        rows = bench_main.run_case(case, settings, 2, 0.01, server)
        assert [r["variant"] for r in rows] == ["eager", "fused (auto)"] and rows[0]["status"] == "ok"
        # the fused row depends on the kernels built into this tree: either measured or an error with its reason
        assert rows[1]["status"] == "ok" or rows[1]["reason"].startswith("error: ")
        rows = [r for r in rows if r["status"] == "ok"]
        state = case.setup()
        fn = case.variants[0].make(state, check=False)
        flops, out = measure.count_flops(fn)
        assert case.flops == flops > 0  # counted in the worker as here
        for row in rows:
            assert row["rounds"] == 2 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
            assert row["output_mb"] * 2 ** 20 == measure.tensors_bytes(out)  # scores, or every parameter's grad
            assert row["peak_mem_mb"] * 2 ** 20 >= measure.tensors_bytes(out) * 0.9


def test_cli_rejects_unknown_ops():
    with pytest.raises(SystemExit):
        bench_main.main(["--ops", "atm_attention,nonsense"])


def test_best_peaks_keeps_each_dtypes_best_gemm_and_its_shape():
    start = {"matmul_flops": {"float32": 1e11, "bfloat16": 3e11}, "copy_bandwidth": 2e10,
             "matmul_shape": {"float32": [8, 8, 8], "bfloat16": [8, 8, 8]}, "copy_bytes": 4}
    end = {"matmul_flops": {"float32": 2e11, "bfloat16": 1e11}, "copy_bandwidth": 1e10,
           "matmul_shape": {"float32": [16, 4, 32], "bfloat16": [16, 4, 32]}, "copy_bytes": 4}
    best = measure.best_peaks(start, end)
    assert best["matmul_flops"] == {"float32": 2e11, "bfloat16": 3e11}
    assert best["matmul_shape"] == {"float32": [16, 4, 32], "bfloat16": [8, 8, 8]}
    assert best["copy_bandwidth"] == 2e10


def test_cpu_block_time_counts_every_call_of_the_block():
    calls = []
    per_call = measure.block_s(lambda: calls.append(1), 7, "cpu")
    assert len(calls) == 8  # one untimed call, then the block of 7
    assert per_call >= 0


def test_cpu_peak_memory_sees_a_short_lived_buffer():
    """A 40 MiB temporary that lives for well under a millisecond still sets the peak (the sampling thread this
    replaced missed such buffers); the output's size is reported apart."""
    size = 40 * 2 ** 20

    def call():
        temporary = torch.ones(size // 4)
        return temporary[:8].sum()

    peak, output = measure.sampled_peak(call)
    assert 0.95 * size <= peak < 3 * size
    assert output == 4


def test_every_op_case_builds_the_tensors_its_label_names():
    """Each case's setup must build its own config's shapes (closures in a loop once all built the last one's)."""
    import re

    for case in cases.build_cases(cases.Settings(device="cpu", groups=tuple(g for g in cases.GROUPS
                                                                             if g != "models"))):
        st = case.setup()
        numbers = {k: int(v) for k, v in re.findall(r"(Nq|Nk|H|D|L|Q|K)(\d+)", case.label)}
        if case.group == "atm_attention":
            assert st["q"].shape == (case.batch, numbers["Nq"], numbers["H"], numbers["D"]), case.id
            assert st["k"].shape[1] == numbers["Nk"], case.id
        elif case.group == "query_pool_attention":
            pooled = int(re.search(r"->(\d+)", case.label).group(1))
            assert st["x"].shape[1] == numbers["L"] and st["grads"][0].shape[1] == pooled, case.id
            if case.mode == "fwd":
                assert case.variants[0].make(st, check=False)().shape[1] == pooled, case.id
        elif case.group == "mask_classify":
            assert st["mask_logits"].shape[1] == numbers["Q"], case.id
            assert f"{st['out_size'][0]}x{st['out_size'][1]}" in case.label, case.id
        else:
            assert st["mask_logits"].shape[1] == numbers["K"], case.id
            assert f"labels {st['labels'].shape[1]}x{st['labels'].shape[2]}" in case.label, case.id


def test_train_memory_splits_fixed_and_per_image_parts():
    from benchmarks import train_memory as tm

    assert len(tm.cases()) == 2 * 2 * 2 * 2 * 2  # models x precisions x backends x checkpointing x batches
    base = dict(model="m", backend="auto", precision="float32", device="cpu")
    rows = [dict(base, checkpointing=False, batch=1, peak_bytes=10e9, step_s=2.0),
            dict(base, checkpointing=False, batch=2, peak_bytes=13e9, step_s=3.0),
            dict(base, checkpointing=True, batch=1, peak_bytes=8e9, step_s=2.6),
            dict(base, checkpointing=True, batch=2, error="exit 1: boom")]
    plain, ckpt = tm.summarize(rows)
    assert plain["per_image_bytes"] == 3e9 and plain["fixed_bytes"] == 7e9
    assert plain["images_24 GB"] == 5 and plain["images_80 GB"] == 24  # (24 - 7) // 3, (80 - 7) // 3
    assert "per_image_bytes" not in ckpt and ckpt["time_vs_plain"] == pytest.approx(1.3)
    table = tm.markdown(rows, [plain, ckpt])
    assert "error | exit 1: boom" in table and "| 7.00 | 3.00 | 5 | 24 |" in table
