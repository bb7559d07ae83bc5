"""LenVM training: targets, loss aggregation, gamma, MRE, batching, the model split, a short run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from sglang_lenvm import returns
from sglang_lenvm.summary_stats import percentile
from sglang_lenvm.training import targets as T
from sglang_lenvm.training.data import Example, collate, load_examples, split_by_prompt


# ---- targets and loss on hand-computed examples ------------------------------------------

def test_targets_hand_computed():
    # L = 3, gamma = 0.5: G_t = -(1 - 0.5^(3-t)) for t = 0, 1, 2.
    assert T.token_targets(3, 0.5).tolist() == [-0.875, -0.75, -0.5]
    # A completion that is just EOS (L = 1): one state (the last prompt token), G_0 = -(1-g).
    assert T.token_targets(1, 0.9).tolist() == pytest.approx([-0.1])
    with pytest.raises(ValueError):
        T.token_targets(0, 0.9)


def _two_sequences():
    """Lengths 1 and 3 (gamma 0.5), z = 0 everywhere, so every prediction is -0.5."""
    targets = torch.tensor([[-0.5, 0.0, 0.0], [-0.875, -0.75, -0.5]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    return torch.zeros(2, 3), targets, mask


def test_token_mean_differs_from_sequence_mean():
    z, targets, mask = _two_sequences()
    # Squared errors: seq A [0], seq B [0.140625, 0.0625, 0].
    assert float(T.squared_error_sum(z, targets, mask)) == pytest.approx(0.203125)
    # Token mean (eq. 9): all 4 supervised tokens weigh the same.
    assert float(T.token_mean_mse(z, targets, mask)) == pytest.approx(0.203125 / 4)
    # Sequence mean: (0/1 + 0.203125/3) / 2 -- the long sequence's tokens weigh 1/3 as much.
    assert float(T.sequence_mean_mse(z, targets, mask)) == pytest.approx(0.203125 / 3 / 2)
    assert float(T.token_mean_mse(z, targets, mask)) != pytest.approx(
        float(T.sequence_mean_mse(z, targets, mask)))


def test_padding_is_ignored():
    z, targets, mask = _two_sequences()
    z2 = z.clone()
    z2[0, 1:] = 7.0  # junk at padded positions
    assert float(T.token_mean_mse(z2, targets, mask)) == float(T.token_mean_mse(z, targets, mask))


def test_censored_targets_are_one_sided():
    # A completion cut at L = 2 (gamma 0.5): bounds G = [-0.75, -0.5]; the true returns are
    # at most these. z = 0 predicts -0.5: consistent with the bound -0.5 (no loss) but above
    # -0.75, which costs (-0.5 + 0.75)^2 = 0.0625. A prediction below a bound costs nothing.
    targets = torch.tensor([[-0.75, -0.5]])
    mask = torch.ones(1, 2)
    cens = torch.ones(1, 2)
    z = torch.zeros(1, 2)
    assert float(T.squared_error_sum(z, targets, mask, cens)) == pytest.approx(0.0625)
    assert float(T.squared_error_sum(z, targets, mask)) == pytest.approx(0.0625)
    z_long = torch.full((1, 2), 5.0)  # predicts ~-0.993: longer than both bounds
    assert float(T.squared_error_sum(z_long, targets, mask, cens)) == 0.0
    assert float(T.squared_error_sum(z_long, targets, mask)) > 0.2


def test_prediction_is_minus_sigmoid():
    assert T.prediction(torch.tensor([0.0, 100.0, -100.0])).tolist() == pytest.approx(
        [-0.5, -1.0, 0.0])


def test_default_gamma_covers_p99():
    lengths = list(range(1, 101))
    g = T.default_gamma(lengths)
    l99 = percentile(lengths, 99)
    assert l99 == pytest.approx(99.01)
    assert 1 - g ** l99 == pytest.approx(0.99)
    assert T.gamma_for_length(100, 0.99) == pytest.approx(0.01 ** (1 / 100))


def test_ground_truth_length_and_mre():
    assert T.ground_truth_length([10, 10], 0.9) == pytest.approx(10.0)
    # lengths 1 and 3, gamma 0.5: mu = (0.5 + 0.875) / 2 = 0.6875, L_GT = ln(0.3125)/ln(0.5)
    l_gt = math.log(0.3125) / math.log(0.5)
    assert T.ground_truth_length([1, 3], 0.5) == pytest.approx(l_gt)
    assert l_gt < 2.0  # the return-consistent horizon is not the mean length
    mre = T.prompt_boundary_mre([2.0, 10.0], [[1, 3], [10, 10]], 0.5)
    assert mre == pytest.approx(((2 - l_gt) / l_gt + 0.0) / 2)


def test_length_from_p_inverts_targets():
    g = 0.97
    for L in (1, 5, 50, 300):
        p = -T.token_targets(L, g)[0].double()
        assert float(returns.remaining_from_p(p.double(), g)) == pytest.approx(L, rel=1e-4)


# ---- data -----------------------------------------------------------------------------

def test_collate_positions():
    # prompt [5, 6, 7], completion of L = 3 tokens [8, 9, EOS]: inputs are prompt + [8, 9],
    # states s_0..s_2 sit at positions 2, 3, 4.
    ex = Example("p", [5, 6, 7, 8, 9], start=2, length=3)
    short = Example("q", [5, 6], start=1, length=1)
    b = collate([ex, short], [0, 1], gamma=0.5, pad_id=0)
    assert b.censored.sum() == 0
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 0, 0, 0]]
    assert b.mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert b.targets[0, 2:].tolist() == [-0.875, -0.75, -0.5]
    assert b.targets[1, 1].item() == -0.5
    assert b.n_tokens == 4


def _record(pid, L, truncated=False, prompt=(1, 2, 3)):
    return {"prompt_id": pid, "sample_index": 0, "messages": [{"role": "user", "content": "x"}],
            "prompt_token_ids": list(prompt), "completion_token_ids": list(range(10, 10 + L)),
            "completion_tokens": L, "finish_reason": "length" if truncated else "stop",
            "truncated": truncated}


def test_load_examples_skips_truncated_and_cuts(tmp_path):
    path = tmp_path / "d.jsonl"
    recs = [_record("a", 4), _record("b", 6, truncated=True), _record("c", 10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    exs, stats = load_examples([str(path)])
    assert [e.prompt_id for e in exs] == ["a", "c"] and stats.truncated_skipped == 1
    assert exs[0].input_ids == [1, 2, 3, 10, 11, 12] and exs[0].start == 2
    exs, stats = load_examples([str(path)], truncated="as-ended", max_seq_len=8)
    assert len(exs) == 3 and stats.cut_to_max_len == 1 and not any(e.censored for e in exs)
    assert [e.censored for e in load_examples([str(path)], truncated="censored")[0]] == [
        False, True, False]
    c = exs[2]
    assert len(c.input_ids) == 8 and c.length == 10 and c.n_supervised == 6


def test_split_by_prompt_keeps_prompts_whole():
    exs = [Example(str(p), [1, 2], 1, 1) for p in range(20) for _ in range(3)]
    train, val = split_by_prompt(exs, 0.25)
    assert {e.prompt_id for e in train}.isdisjoint({e.prompt_id for e in val})
    assert len({e.prompt_id for e in val}) == 5 and len(val) == 15


# ---- model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from sglang_lenvm.testing import tiny_models as tm

    root = tmp_path_factory.mktemp("train_models")
    tm.build_tokenizer(root / "tok")
    tm.build_causal_lm(root / "base", root / "tok", arch="llama", layers=3, seed=0)
    return root / "base"


def test_split_forward_matches_full_backbone(tiny_base):
    from transformers import AutoModel

    from sglang_lenvm.training.model import LenVMForTraining

    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 9))
    full = LenVMForTraining.from_base(str(tiny_base))
    split = LenVMForTraining.from_base(str(tiny_base), train_last_layers=1)
    split.v_head.load_state_dict(full.v_head.state_dict())
    ref = AutoModel.from_pretrained(str(tiny_base)).eval()
    with torch.no_grad():
        want = full.v_head(ref(ids).last_hidden_state)
        assert torch.allclose(full(ids), want, atol=1e-5)
        assert torch.allclose(split(ids), want, atol=1e-5)
        assert torch.allclose(split.forward_from_states(split.frozen_states(ids)), want, atol=1e-5)
    # Right padding needs no mask: a sequence's values do not depend on what follows it.
    with torch.no_grad():
        assert torch.allclose(full(ids[:1, :5]), full(ids[:1])[:, :5], atol=1e-5)
    trained = split.trained_state_dict()
    assert "model.layers.2.mlp.up_proj.weight" in trained and "model.norm.weight" in trained
    assert not any(k.startswith(("model.layers.0.", "model.layers.1.", "model.embed"))
                   for k in trained)
    assert {k for k in trained if k.startswith("v_head.")} == {
        "v_head.fc.weight", "v_head.fc.bias", "v_head.summary.weight", "v_head.summary.bias"}


def test_gradient_accumulation_equals_one_batch(tiny_base):
    from sglang_lenvm.training.data import batches
    from sglang_lenvm.training.loop import TrainConfig, accumulate_gradients
    from sglang_lenvm.training.model import LenVMForTraining

    rng = random.Random(0)
    exs = [Example(str(i), [rng.randrange(3, 100) for _ in range(3 + L)], 3, L + 1)
           for i, L in enumerate([1, 9, 2, 20])]
    model = LenVMForTraining.from_base(str(tiny_base), train_last_layers=1)
    cfg = TrainConfig()

    def grads(batch_size):
        model.zero_grad()
        group = list(batches(exs, batch_size, 0.9, shuffle=False))
        sse, n = accumulate_gradients(model, group, cfg)
        return sse / n, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    loss_1, g_1 = grads(4)  # one batch of 4
    loss_4, g_4 = grads(1)  # 4 micro-batches of 1, accumulated
    assert loss_1 == pytest.approx(loss_4, rel=1e-5)
    for a, b in zip(g_1, g_4):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_short_run_lowers_loss_and_saves_published_layout(tiny_base, tmp_path):
    """A few epochs on synthetic data where length depends on the prompt: the loss falls
    and the checkpoint validates as a LenVM with its gamma recorded."""
    from sglang_lenvm import train as train_cli
    from sglang_lenvm.checkpoint import check_same_tokenizer, inspect_checkpoint

    rng = random.Random(1)
    lines = []
    for p in range(24):
        prompt = [1, 5 + p % 2, 7]  # the token at index 1 decides short vs long
        for s in range(3):
            L = rng.randint(2, 6) if p % 2 == 0 else rng.randint(25, 35)
            rec = _record(f"p{p}", L, prompt=prompt)
            rec["sample_index"] = s
            lines.append(json.dumps(rec) + "\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(lines))
    out = tmp_path / "lenvm"
    summary = train_cli.main(["--base", str(tiny_base), "--data", str(data), "--output",
                              str(out), "--epochs", "6", "--batch-size", "8", "--grad-accum",
                              "1", "--train-last-layers", "1", "--cache-frozen", "--lr", "3e-3",
                              "--head-lr", "3e-3", "--val-fraction", "0.25", "--no-progress",
                              "--save-trained-part", str(tmp_path / "part.safetensors")])
    hist = summary["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert "mre" in hist[-1] and summary["train_data"]["used"] == 72
    ckpt = inspect_checkpoint(str(out))
    assert ckpt.gamma == pytest.approx(summary["gamma"]) and ckpt.head_source == \
        "value_head.safetensors"
    check_same_tokenizer(str(tiny_base), str(out))
    meta = json.loads((tmp_path / "part.json").read_text())
    assert meta["split_layer"] == 2 and "v_head.summary.bias" in meta["tensors"]


def test_num_layers_keeps_the_first_layers_and_saves_a_shallow_checkpoint(tiny_base, tmp_path):
    """--num-layers 2 of a 3-layer base: the training model is the base's first 2 layers
    (against transformers' own 2-layer load of the base), the CLI refuses an out-of-range
    depth with a clear error, and the saved checkpoint says 2 layers, reloads with 2, keeps
    the frozen layer as the base's and the trained one moved."""
    from transformers import AutoModel

    from sglang_lenvm import train as train_cli
    from sglang_lenvm.checkpoint import inspect_checkpoint
    from sglang_lenvm.training.model import LenVMForTraining

    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 9))
    shallow = LenVMForTraining.from_base(str(tiny_base), train_last_layers=1, num_layers=2)
    assert len(shallow.backbone.layers) == 2 and shallow.split == 1
    ref = AutoModel.from_pretrained(str(tiny_base), num_hidden_layers=2).eval()
    with torch.no_grad():
        want = shallow.v_head(ref(ids).last_hidden_state)
        assert torch.allclose(shallow(ids), want, atol=1e-5)
    with pytest.raises(ValueError):
        LenVMForTraining.from_base(str(tiny_base), num_layers=4)

    lines = [json.dumps({**_record(f"p{p}", 3 + p % 5), "sample_index": 0}) + "\n"
             for p in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(lines))
    with pytest.raises(SystemExit, match="num_layers must be in"):  # the CLI: a clear error
        train_cli.main(["--base", str(tiny_base), "--data", str(data), "--output",
                        str(tmp_path / "x"), "--num-layers", "0", "--no-progress"])
    out = tmp_path / "lenvm"
    summary = train_cli.main(["--base", str(tiny_base), "--data", str(data), "--output",
                              str(out), "--epochs", "1", "--batch-size", "4", "--grad-accum",
                              "1", "--num-layers", "2", "--train-last-layers", "1",
                              "--cache-frozen", "--val-fraction", "0.25", "--no-progress"])
    assert summary["num_layers"] == 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and inspect_checkpoint(str(out)).gamma == \
        pytest.approx(summary["gamma"])
    saved = AutoModel.from_pretrained(str(out)).eval()
    assert len(saved.layers) == 2
    # The frozen layer is the base's own; the trained one moved.
    base = AutoModel.from_pretrained(str(tiny_base))
    w = "mlp.up_proj.weight"
    assert torch.equal(saved.layers[0].get_parameter(w), base.layers[0].get_parameter(w))
    assert not torch.equal(saved.layers[1].get_parameter(w), base.layers[1].get_parameter(w))


# ---- distillation from a teacher LenVM (--teacher) ----------------------------------------

@pytest.fixture(scope="module")
def tiny_teacher(tiny_base, tmp_path_factory):
    """A 3-layer LenVM on the tiny base (its last layer, norm and head redrawn), gamma 0.95."""
    from sglang_lenvm.testing import tiny_models as tm

    out = tm.build_trunk_lenvm(tmp_path_factory.mktemp("teacher") / "lenvm", tiny_base)
    cfg = json.loads((out / "config.json").read_text())
    cfg["lenvm_gamma"] = 0.95
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _unpadded_values(lenvm, examples) -> list[torch.Tensor]:
    """V = -sigmoid(z) at each example's supervised states, one unpadded transformers forward
    per sequence (the checkpoint loaded once, by transformers, with its own head)."""
    from sglang_lenvm.training.candidate_head import load_teacher

    backbone, head = load_teacher(str(lenvm))
    with torch.no_grad():
        return [-torch.sigmoid(head(backbone(torch.tensor([e.input_ids])).last_hidden_state)[0])
                [e.start: e.start + e.n_supervised] for e in examples]


def test_teacher_values_match_an_unpadded_transformers_forward(tiny_teacher):
    from sglang_lenvm.training.distill import teacher_values

    rng = random.Random(3)
    exs = []
    for p in range(5):  # different lengths, so the batch pads
        prompt = [1] + [rng.randint(3, 100) for _ in range(2 + p)]
        L = 2 + 3 * p
        exs.append(Example(f"p{p}", prompt + [rng.randint(3, 100) for _ in range(L - 1)],
                           len(prompt) - 1, L))
    exs.append(Example("cut", exs[-1].input_ids[:-4], exs[-1].start, exs[-1].length))
    got = teacher_values(exs, str(tiny_teacher), batch_size=4, progress=False)
    for e, v, ref in zip(exs, got, _unpadded_values(tiny_teacher, exs)):
        assert v.shape == (e.n_supervised,) and torch.allclose(v, ref, atol=1e-5)
    # collate puts them in as the targets, and a censored example is no longer one-sided
    exs[0].teacher, exs[0].censored = got[0], True
    b = collate([exs[0]], [0], 0.95)
    s, n = exs[0].start, exs[0].n_supervised
    assert torch.equal(b.targets[0, s: s + n], got[0]) and b.censored.sum() == 0
    with pytest.raises(ValueError, match="vocabulary"):
        teacher_values([Example("x", [1, 10 ** 6], 0, 2)], str(tiny_teacher), progress=False)


def test_distilling_a_shallow_student_moves_it_toward_the_teacher(tiny_base, tiny_teacher,
                                                                 tmp_path, monkeypatch):
    """--teacher with --num-layers 2: gamma is the teacher's, the student's values end closer
    to the teacher's than they start (on the training text), the teacher cache is reused for
    the same data, and a conflicting --gamma or a missing teacher is a clear CLI error."""
    from sglang_lenvm import train as train_cli
    from sglang_lenvm.training import distill
    from sglang_lenvm.training.model import LenVMForTraining

    rng = random.Random(5)
    recs = []
    for p in range(12):
        prompt = [1, rng.randint(3, 100), rng.randint(3, 100)]
        L = rng.randint(4, 14)
        rec = _record(f"p{p}", L, truncated=p % 4 == 0, prompt=prompt)
        rec["completion_token_ids"] = [rng.randint(3, 100) for _ in range(L)]
        recs.append(json.dumps(rec) + "\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(recs))
    exs = load_examples([str(data)], truncated="censored")[0]
    want = _unpadded_values(tiny_teacher, exs)

    start = LenVMForTraining.from_base(str(tiny_base), num_layers=2)
    start.v_head.init_output(float(torch.cat([-w for w in want]).mean()))
    with torch.no_grad():
        before = float(torch.cat([
            (-torch.sigmoid(start(torch.tensor([e.input_ids]))[0])
             [e.start: e.start + e.n_supervised] - w).abs() for e, w in zip(exs, want)]).mean())

    args = ["--base", str(tiny_base), "--data", str(data), "--num-layers", "2",
            "--train-last-layers", "1", "--cache-frozen", "--truncated", "censored",
            "--teacher", str(tiny_teacher), "--teacher-cache", str(tmp_path / "t.pt"),
            "--epochs", "20", "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3",
            "--head-lr", "3e-3", "--val-fraction", "0.25", "--no-progress"]
    out = tmp_path / "student"
    summary = train_cli.main(args + ["--output", str(out)])
    assert summary["gamma"] == pytest.approx(0.95) and summary["teacher"] == str(tiny_teacher)
    assert (tmp_path / "t.pt").is_file()
    trained = _unpadded_values(out, exs)
    after = float(torch.cat([(t - w).abs() for t, w in zip(trained, want)]).mean())
    assert after < 0.5 * before, (before, after)

    # The cache holds the teacher's values of the training split (the reference above), and a
    # second run on the same data reads it instead of running the teacher.
    saved = torch.load(tmp_path / "t.pt")["values"]
    train_ex, _ = split_by_prompt(exs, 0.25, 0)
    assert len(saved) == summary["train_completions"] == len(train_ex)
    for e, v in zip(train_ex, saved):
        assert torch.allclose(v, want[exs.index(e)], atol=1e-5)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran although its values were cached")

    monkeypatch.setattr(distill, "teacher_values", no_teacher)
    train_cli.main(args + ["--output", str(tmp_path / "again"), "--epochs", "1"])
    with pytest.raises(SystemExit, match="--teacher-cache needs --teacher"):
        train_cli.main([a for a in args if a not in ("--teacher", str(tiny_teacher))]
                       + ["--output", str(tmp_path / "z")])
    with pytest.raises(SystemExit, match="differs from the teacher"):
        train_cli.main(args + ["--output", str(tmp_path / "x"), "--gamma", "0.9"])
    with pytest.raises(SystemExit, match="--teacher"):
        train_cli.main([a if a != str(tiny_teacher) else str(tmp_path / "none") for a in args]
                       + ["--output", str(tmp_path / "y")])
