"""Partial FC on 2 real gloo workers (torch.multiprocessing spawn) against one-process references.

The two workers are started once for the module and run every scenario in turn (a spawn costs
seconds); each scenario returns tensors that the tests compare with a full-softmax computation
made here in the parent on the same data.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from margin_presets import margin_preset

from ranray.config import MarginConfig
from ranray.models.margin import CombinedMarginLoss
from ranray.models.partial_fc import (
    PartialFC, PartialFCAdamW, PartialFCSGD, make_optimizer, max_sample_rate, memory_estimate,
    overlapping_ranks, reshard_optimizer_state, reshard_rows, sample_count, shard_range,
)

WORLD = 2
SPAWN_TIMEOUT_S = 300  # catches a hang; generous because the test machine may be busy
ARC = margin_preset("arcface")
COS = margin_preset("cosface")


def _data(num_classes: int, emb: int, sizes: list[int], seed: int, labels: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, emb, generator=g)
    embeddings = torch.randn(sum(sizes), emb, generator=g)
    y = torch.tensor(labels) if labels is not None else torch.randint(0, num_classes, (sum(sizes),), generator=g)
    return weight, embeddings, y


def _rows(sizes: list[int], rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))


# ---------------------------------------------------------------------------------------------
# Scenarios, run inside each worker
# ---------------------------------------------------------------------------------------------


def _step(rank, num_classes, sizes, margin, seed, rate=1.0, grad_scale=1.0, labels=None):
    weight, embeddings, y = _data(num_classes, 16, sizes, seed, labels)
    pfc = PartialFC(num_classes, 16, rate, margin, seed=seed, embedding_grad_scale=grad_scale)
    with torch.no_grad():
        pfc.weight.copy_(weight[pfc.class_start:pfc.class_end])
    mine = embeddings[_rows(sizes, rank)].clone().requires_grad_(True)
    loss = pfc(mine, y[_rows(sizes, rank)])
    loss.backward()
    return {"loss": loss.detach(), "emb_grad": mine.grad, "weight_grad": pfc.weight.grad.to_dense(),
            "range": (pfc.class_start, pfc.class_end), "sampled": pfc.last_index + pfc.class_start}


def scenario_equal_r1(rank):
    return _step(rank, 10, [4, 4], ARC, seed=1)


def scenario_uneven(rank):
    # 7 classes on 2 ranks (4 + 3) and 5 + 3 rows: uneven shards and uneven batches.
    return _step(rank, 7, [5, 3], COS, seed=2)


def scenario_ddp_grad_scale(rank):
    return _step(rank, 10, [4, 4], ARC, seed=1, grad_scale=2.0)


def scenario_sampled(rank):
    return _step(rank, 200, [6, 6], ARC, seed=3, rate=0.1)


def scenario_sampling_steps(rank):
    """Three training steps at r = 0.1: the sampled sets, and a twin module's step-0 set."""
    sizes, out = [6, 6], {"index": [], "labels": []}
    _, embeddings, _ = _data(200, 16, sizes, 4)
    pfc = PartialFC(200, 16, 0.1, ARC, seed=4)
    opt = make_optimizer(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
    step_labels = [torch.randint(0, 200, (12,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    step_labels.append(torch.arange(12))  # 12 distinct positives, all in rank 0's 100 classes
    for y in step_labels:
        opt.zero_grad()
        pfc(embeddings[_rows(sizes, rank)], y[_rows(sizes, rank)]).backward()
        opt.step()
        out["index"].append(pfc.last_index + pfc.class_start)
        out["labels"].append(y)
    twin = PartialFC(200, 16, 0.1, ARC, seed=4)
    twin(embeddings[_rows(sizes, rank)], step_labels[0][_rows(sizes, rank)])
    out["twin_index0"] = twin.last_index + twin.class_start
    out["num_sample"], out["num_local"] = pfc.num_sample, pfc.num_local
    out["state"] = {"module": pfc.state_dict(), "optim": opt.state_dict()}
    out["resume"] = _resume(pfc, opt)
    return out


def _resume(pfc: PartialFC, opt: PartialFCSGD) -> dict:
    """Load this rank's saved shard into a fresh module; the other rank's shard must be refused."""
    fresh = PartialFC(200, 16, 0.1, ARC, seed=4)
    fresh_opt = make_optimizer(fresh, lr=0.1, momentum=0.9, weight_decay=5e-4)
    fresh.load_state_dict(pfc.state_dict())
    fresh_opt.load_state_dict(opt.state_dict())
    states = [None] * WORLD
    dist.all_gather_object(states, pfc.state_dict())
    try:
        PartialFC(200, 16, 0.1, ARC, seed=4).load_state_dict(states[1 - dist.get_rank()])
        other = "loaded"
    except ValueError as err:
        other = str(err)
    return {"weight_equal": torch.equal(fresh.weight, pfc.weight), "step": fresh.step,
            "momentum_equal": torch.equal(fresh_opt.state[fresh.weight]["momentum_buffer"],
                                          opt.state[pfc.weight]["momentum_buffer"]),
            "other_rank": other}


def scenario_bad_labels(rank):
    """Only rank 1 passes a label == num_classes: both ranks must raise, then keep working."""
    pfc = PartialFC(10, 16, 1.0, ARC)
    labels = torch.tensor([1, 2, 3]) if rank == 0 else torch.tensor([4, 10, 5])
    try:
        pfc(torch.randn(3, 16), labels)
        message = "no error"
    except ValueError as err:
        message = str(err)
    after = pfc(torch.randn(3, 16), torch.tensor([1, 2, 3])).item()  # the group is still in step
    return {"message": message, "after": after}


def scenario_bf16(rank):
    """Embeddings equal to their centres (cos = 1 exactly) under bf16 autocast stay finite."""
    pfc = PartialFC(10, 16, 1.0, ARC)
    emb = torch.randn(3, 16)
    labels = torch.tensor([0, 1, 2]) + pfc.class_start
    with torch.no_grad():
        emb[:] = pfc.weight[:3]
    emb.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pfc(emb, labels)
    loss.backward()
    return {"loss": loss.detach(), "finite": bool(torch.isfinite(emb.grad).all())
            and bool(torch.isfinite(pfc.weight.grad.to_dense()).all())}


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().copy().items() if name.startswith("scenario_")}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=dt.timedelta(seconds=60))
    results = {name: fn(rank) for name, fn in SCENARIOS.items()}
    dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run every scenario on 2 gloo workers; fail (not hang) if they do not finish in time."""
    tmp = tmp_path_factory.mktemp("pfc")
    ctx = mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"Partial FC workers did not finish within {SPAWN_TIMEOUT_S} s (a hang)")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------
# One-process references
# ---------------------------------------------------------------------------------------------


def _reference(num_classes, sizes, margin: MarginConfig, seed, columns=None):
    """Full (or column-restricted) margin softmax on the whole batch in one process."""
    weight, embeddings, y = _data(num_classes, 16, sizes, seed)
    weight.requires_grad_(True)
    embeddings.requires_grad_(True)
    cols = torch.arange(num_classes) if columns is None else columns
    labels = torch.searchsorted(cols, y)
    assert torch.equal(cols[labels], y), "every label must be among the columns"
    cos = F.linear(F.normalize(embeddings), F.normalize(weight[cols]))
    loss = CombinedMarginLoss.from_config(margin).loss(cos, labels)
    loss.backward()
    return loss.detach(), embeddings.grad, weight.grad


def _assert_matches(ranks, name, num_classes, sizes, margin, seed, columns=None, grad_scale=1.0):
    loss, emb_grad, weight_grad = _reference(num_classes, sizes, margin, seed, columns)
    for rank, res in enumerate(r[name] for r in ranks):
        start, end = res["range"]
        torch.testing.assert_close(res["loss"], loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["emb_grad"], grad_scale * emb_grad[_rows(sizes, rank)], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["weight_grad"], weight_grad[start:end], rtol=1e-4, atol=1e-6)


def test_r1_equals_full_softmax_loss_and_gradients(ranks):
    assert [r["equal_r1"]["range"] for r in ranks] == [(0, 5), (5, 10)]
    _assert_matches(ranks, "equal_r1", 10, [4, 4], ARC, seed=1)


def test_uneven_shards_and_batches_equal_full_softmax(ranks):
    assert [r["uneven"]["range"] for r in ranks] == [(0, 4), (4, 7)]
    _assert_matches(ranks, "uneven", 7, [5, 3], COS, seed=2)


def test_embedding_grad_scale_compensates_ddp_average(ranks):
    _assert_matches(ranks, "ddp_grad_scale", 10, [4, 4], ARC, seed=1, grad_scale=2.0)


def test_sampled_loss_equals_softmax_over_the_sampled_classes(ranks):
    columns = torch.cat([r["sampled"]["sampled"] for r in ranks])
    assert len(columns) == 2 * sample_count(100, 0.1) == 20
    _assert_matches(ranks, "sampled", 200, [6, 6], ARC, seed=3, columns=columns)


def test_every_positive_is_sampled_and_counts_follow_the_rate(ranks):
    for rank, res in enumerate(r["sampling_steps"] for r in ranks):
        start, end = shard_range(200, WORLD, rank)
        assert res["num_sample"] == math.ceil(0.1 * res["num_local"]) == 10
        for index, labels in zip(res["index"], res["labels"]):
            positives = {int(y) for y in labels if start <= y < end}
            assert positives <= set(index.tolist())
            assert len(index) == max(10, len(positives)) == len(set(index.tolist()))
            assert all(start <= i < end for i in index.tolist())
    assert len(ranks[0]["sampling_steps"]["index"][2]) == 12  # 12 positives > 10: all kept


def test_sampling_is_deterministic_per_step_and_varies_across_steps(ranks):
    for res in (r["sampling_steps"] for r in ranks):
        assert torch.equal(res["twin_index0"], res["index"][0])
        assert not torch.equal(res["index"][0], res["index"][1])


def test_each_rank_checkpoint_restores_its_shard_and_refuses_the_other(ranks):
    for rank, res in enumerate(r["sampling_steps"] for r in ranks):
        state = res["state"]["module"]["_extra_state"]
        assert (state["class_start"], state["class_end"]) == shard_range(200, WORLD, rank)
        assert state["step"] == 3
        assert res["resume"]["weight_equal"] and res["resume"]["momentum_equal"]
        assert res["resume"]["step"] == 3
        assert "resume with the same num_classes and world size" in res["resume"]["other_rank"]


def test_out_of_range_label_raises_on_every_rank_without_hanging(ranks):
    for res in (r["bad_labels"] for r in ranks):
        assert re.search(r"1 label\(s\) outside \[0, 10\).*e\.g\. 10 on rank 1", res["message"])
        assert math.isfinite(res["after"])


def test_bf16_autocast_with_cos_exactly_one_stays_finite(ranks):
    for res in (r["bf16"] for r in ranks):
        assert torch.isfinite(res["loss"]) and res["finite"]


# ---------------------------------------------------------------------------------------------
# One process: no process group at all
# ---------------------------------------------------------------------------------------------


def test_single_process_without_process_group_matches_reference():
    weight, embeddings, y = _data(9, 16, [6], 5)
    pfc = PartialFC(9, 16, 1.0, COS)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    emb = embeddings.clone().requires_grad_(True)
    loss = pfc(emb, y)
    loss.backward()
    ref_loss, ref_emb_grad, ref_weight_grad = _reference(9, [6], COS, 5)
    torch.testing.assert_close(loss.detach(), ref_loss)
    torch.testing.assert_close(emb.grad, ref_emb_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pfc.weight.grad.to_dense(), ref_weight_grad, rtol=1e-4, atol=1e-6)


def test_optimizer_dense_gradient_equals_torch_sgd():
    w0 = torch.randn(5, 3)
    grad = torch.randn(5, 3)
    mine, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = PartialFCSGD([mine], lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        mine.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(mine.detach(), ref.detach())


def test_optimizer_sparse_gradient_touches_only_sampled_rows():
    param = torch.nn.Parameter(torch.ones(6, 2))
    opt = PartialFCSGD([param], lr=0.5, momentum=0.9, weight_decay=0.0)
    param.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.ones(2, 2), (6, 2),
                                         check_invariants=True)
    opt.step()
    assert param[[0, 2, 3, 5]].eq(1).all() and param[[1, 4]].eq(0.5).all()
    assert opt.state[param]["momentum_buffer"][[0, 2, 3, 5]].eq(0).all()


def test_invalid_construction_is_refused():
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(10, 4, 0.0)


def test_wrong_embedding_shape_is_refused():
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        PartialFC(10, 16)(torch.randn(3, 8), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------
# Memory estimate: the implementation's tensor sizes, and the table in docs/SCALING.md
# ---------------------------------------------------------------------------------------------


def test_memory_estimate_uses_the_module_sizes():
    pfc = PartialFC(1001, 32, 0.3)
    est = memory_estimate(1001, 32, 1, 64, 0.3)
    assert est.classes_per_rank == pfc.num_local and est.sampled_per_rank == pfc.num_sample
    assert est.weights == pfc.weight.numel() * pfc.weight.element_size()
    assert est.logits == 2 * 64 * pfc.num_sample * 4
    uneven = memory_estimate(1001, 32, 2, 64, 1.0)
    assert uneven.classes_per_rank == 501 and uneven.global_batch == 128


def test_memory_grows_with_rate_and_plain_fc_holds_everything():
    small, large = (memory_estimate(2_000_000, 512, 64, 128, r) for r in (0.1, 1.0))
    assert small.logits * 9 < large.logits and small.weights == large.weights
    plain = memory_estimate(2_000_000, 512, 64, 128, partial_fc=False)
    assert plain.weights == plain.dense_grad == 2_000_000 * 512 * 4
    assert max_sample_rate(80 * 2**30, 2_000_000, 512, 64, 128) == 1.0
    assert 0 < max_sample_rate(60 * 10**9, 100_000_000, 512, 64, 128) < 1.0


# docs/SCALING.md's Partial FC memory table, generated here and kept equal to the doc by the test below
# (print(memory_table_markdown()) to regenerate it).
GPU_BYTES = 80 * 10**9  # an "80 GB" card (A100 / H100 80GB: 80 GiB would be 85.9e9)
BACKBONE_RESERVE_BYTES = 20 * 10**9  # iResNet-50 at 128 images/GPU: see docs/SCALING.md
TABLE_CASES = (  # (classes, nodes, gpus per node, sample rate or None for plain data parallel)
    (2_000_000, 8, 8, None), (2_000_000, 8, 8, 1.0), (2_000_000, 8, 8, 0.1),
    (2_000_000, 1, 8, None), (2_000_000, 1, 8, 1.0), (2_000_000, 1, 8, 0.1),
    (10_000_000, 1, 8, None), (10_000_000, 1, 8, 1.0), (10_000_000, 1, 8, 0.1),
    (100_000_000, 8, 8, 1.0), (100_000_000, 8, 8, 0.1),
)


def memory_table_markdown(embedding_size: int = 512, batch_per_rank: int = 128) -> str:
    def gb(x: int) -> str:
        return f"{x / 1e9:.2f}"

    head_budget = GPU_BYTES - BACKBONE_RESERVE_BYTES
    lines = ["| classes | GPUs | head | classes/GPU | sampled/GPU | global batch | weights + momentum GB "
             "| sampled centres GB | embeddings GB | logits GB | dense grad GB | head total GB "
             "| fits 80 GB | largest r that fits |",
             "|" + "---|" * 14]
    for classes, nodes, gpus, rate in TABLE_CASES:
        world = nodes * gpus
        est = memory_estimate(classes, embedding_size, world, batch_per_rank, rate or 1.0, rate is not None)
        largest = "-" if rate is None else f"{max_sample_rate(head_budget, classes, embedding_size, world, batch_per_rank):g}"
        lines.append(
            f"| {classes / 1e6:g}M | {nodes}x{gpus} | {'plain DP' if rate is None else f'PFC r={rate:g}'} "
            f"| {est.classes_per_rank:,} | {est.sampled_per_rank:,} | {est.global_batch:,} "
            f"| {gb(est.weights + est.momentum)} | {gb(est.sampled_centres)} | {gb(est.embeddings)} "
            f"| {gb(est.logits)} | {gb(est.dense_grad)} | {gb(est.total)} "
            f"| {'yes' if est.total <= head_budget else 'no'} | {largest} |")
    return "\n".join(lines) + "\n"


def test_scaling_doc_table_is_the_generated_one():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "SCALING.md").read_text()
    block = re.search(r"<!-- partial-fc-memory:begin -->\n(.*?)<!-- partial-fc-memory:end -->", doc, re.S)
    assert block, "docs/SCALING.md lost its generated Partial FC table"
    assert block.group(1).strip() == memory_table_markdown().strip()


# ---------------------------------------------------------------------------------------------
# Resharding: any old world size onto any new one (the Ray run is in test_pretrain)
# ---------------------------------------------------------------------------------------------


def _saved_ranks(num_classes: int, world: int, name: str):
    """What `world` ranks would save: their shard rows of one global table, and one optimizer step."""
    table = torch.randn(num_classes, 4, generator=torch.Generator().manual_seed(7))
    states = []
    for rank in range(world):
        lo, hi = shard_range(num_classes, world, rank)
        shard = torch.nn.Parameter(table[lo:hi].clone())
        opt = make_optimizer(torch.nn.ParameterList([shard]), lr=0.1, weight_decay=1e-3, name=name)
        shard.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1, 4), shard.shape, check_invariants=True)
        opt.step()
        states.append(((lo, hi), shard.detach().clone(), opt.state_dict()))
    full = torch.cat([w for _, w, _ in states])
    return states, full


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("old, new", [(3, 2), (3, 4), (2, 3), (4, 1), (1, 3)])
def test_reshard_gives_every_class_its_saved_rows_bit_for_bit(old, new, name):
    num_classes = 11  # uneven on every world size here
    states, full = _saved_ranks(num_classes, old, name)
    per_class = {k for k, v in states[0][2]["state"][0].items() if v.dim() >= 1}
    assert per_class == ({"momentum_buffer"} if name == "sgd" else {"exp_avg", "exp_avg_sq"})
    for rank in range(new):
        lo, hi = shard_range(num_classes, new, rank)
        needed = overlapping_ranks(num_classes, old, lo, hi)
        assert needed == [r for r in range(old) if states[r][0][0] < hi and states[r][0][1] > lo]
        parts = [states[r] for r in needed]
        rows = reshard_rows([(a, b, w) for (a, b), w, _ in parts], lo, hi)
        assert torch.equal(rows, full[lo:hi])
        opt = reshard_optimizer_state([o for _, _, o in parts], [r for r, _, _ in parts], lo, hi)
        for key in per_class:
            whole = torch.cat([o["state"][0][key] for _, _, o in states])
            assert torch.equal(opt["state"][0][key], whole[lo:hi])
        if name == "adamw":
            assert opt["state"][0]["step"] == states[0][2]["state"][0]["step"]


def test_load_resharded_takes_the_rows_and_refuses_another_class_count():
    saved = []
    for rank in range(3):  # the module state dicts 3 ranks of 10 classes would write
        lo, hi = shard_range(10, 3, rank)
        extra = {"num_classes": 10, "class_start": lo, "class_end": hi, "rank": rank, "world_size": 3,
                 "sample_rate": 1.0, "seed": 0, "step": 5, "embedding_size": 4}
        saved.append({"weight": torch.arange(lo * 4, hi * 4, dtype=torch.float32).view(-1, 4), "_extra_state": extra})
    one = PartialFC(10, 4)  # no process group: one rank holding all 10 classes
    one.load_resharded(list(reversed(saved)))
    assert torch.equal(one.weight.detach(), torch.arange(40, dtype=torch.float32).view(10, 4)) and one.step == 5
    with pytest.raises(ValueError, match=r"num_classes=\[10\], this run 12"):
        PartialFC(12, 4).load_resharded(saved)


def test_adamw_head_updates_every_row_like_torch_adamw_on_the_dense_gradient():
    w0, rows = torch.randn(5, 3), torch.tensor([[1, 3]])
    mine, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = make_optimizer(torch.nn.ParameterList([mine]), lr=0.01, weight_decay=0.1, name="adamw")
    ref_opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1)
    for _ in range(3):
        mine.grad = torch.sparse_coo_tensor(rows, torch.ones(2, 3), (5, 3), check_invariants=True)
        ref.grad = mine.grad.to_dense()
        opt.step()
        ref_opt.step()
    assert isinstance(opt, PartialFCAdamW)
    torch.testing.assert_close(mine.detach(), ref.detach())
    assert not torch.equal(mine[0].detach(), w0[0])  # an unsampled row is decayed too, as insightface's
