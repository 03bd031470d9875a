"""s2d.lowrank: every closed-form error curve against building each rank-r truncation by brute force
and scoring it on the calibration inputs."""
import pytest
import torch

from s2d.lowrank import feature_factors, rank_curves, smallest_rank, weight_factors
from s2d.lowrank.maths import factor_params


def _layer(d_out, d_in, n=200, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(3, 0.1, d_in, dtype=torch.float64))
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d_in, dtype=torch.float64) + 0.7
    return w, b, x


def _moments(x):
    return x.mean(0), x.T @ x / x.shape[0]


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_curves_equal_brute_force_truncations(shape, bias):
    w, b, x = _layer(*shape, bias=bias)
    curves = rank_curves(w, b, *_moments(x))
    y = x @ w.T + (b if b is not None else 0)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    yc = y - y.mean(0)
    evals, evecs = torch.linalg.eigh(yc.T @ yc)                    # PCA of the outputs, brute force
    p = evecs.flip(1)
    for r in range(1, min(shape) + 1):
        w_r = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        assert float(curves.weight_frob[r - 1]) == pytest.approx(float((w - w_r).norm() / w.norm()), abs=1e-7)
        y_w = x @ w_r.T + (b if b is not None else 0)
        assert float(curves.weight_output[r - 1]) == pytest.approx(float((y_w - y).norm() / y.norm()), abs=1e-7)
        proj = p[:, :r] @ p[:, :r].T
        y_f = yc @ proj + y.mean(0)
        assert float(curves.feature_output[r - 1]) == pytest.approx(float((y_f - y).norm() / y.norm()), abs=1e-7)
        assert float(curves.feature_frob[r - 1]) == pytest.approx(float((w - proj @ w).norm() / w.norm()), abs=1e-7)
        first, second, sb = feature_factors(w, b, *_moments(x), r)   # the factorised layer computes y_f
        torch.testing.assert_close(x @ first.T @ second.T + sb, y_f)
        wf, ws = weight_factors(w, r)
        torch.testing.assert_close(ws @ wf, w_r)
    assert float(curves.weight_frob[-1]) == pytest.approx(0, abs=1e-7)
    assert float(curves.feature_output[-1]) == pytest.approx(0, abs=1e-7)


def test_feature_space_never_loses_to_weight_space_on_the_calibration_outputs():
    # PCA of the outputs is the best rank-r fit of the centred outputs (Eckart-Young), and it keeps the mean
    w, b, x = _layer(9, 6, seed=3)
    c = rank_curves(w, b, *_moments(x))
    assert bool((c.feature_output <= c.weight_output + 1e-7).all())


def test_smallest_rank_and_params():
    curve = torch.tensor([0.5, 0.2, 0.09, 0.01])
    assert smallest_rank(curve, 0.1) == 3 and smallest_rank(curve, 0.5) == 1 and smallest_rank(curve, 0.001) == 4
    assert factor_params(8, 4, 2) == 2 * 12 + 8 and factor_params(8, 4, 2, bias=False) == 24


def test_lowrank_table_on_a_tiny_bert_matches_brute_force_on_the_real_tokens():
    from test_models import FAMILIES

    from s2d.lowrank import lowrank_table
    from s2d.models import blocks

    model = FAMILIES["bert"][0]().eval()
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0                                             # padding must be left out
    batches = [{"input_ids": torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(i)),
                "attention_mask": mask} for i in range(2)]
    table = lowrank_table(model, batches, threshold=0.2)
    names = [r.name for r in table]
    assert "classifier" not in names and len(names) == 6 * len(blocks(model)) + 1   # q k v o fc1 fc2, the pooler
    name = blocks(model)[1].fc2
    layer = dict(model.named_modules())[name]
    seen = []
    h = layer.register_forward_hook(lambda m, a, o: seen.append(a[0][mask.bool()].double()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    x = torch.cat(seen)
    ref = rank_curves(layer.weight, layer.bias, *_moments(x))
    row = table[names.index(name)]
    torch.testing.assert_close(torch.tensor(row.curves["feature_output"], dtype=torch.float64), ref.feature_output)
    assert row.feature_rank == smallest_rank(ref.feature_output, 0.2) <= row.weight_rank <= row.full_rank == 32
    assert row.break_even == 21                                 # 21 * (64 + 32) = 2016 < 2048 <= 22 * 96
    with pytest.raises(ValueError, match="threshold must be in"):
        lowrank_table(model, batches, threshold=1.5)


def _tiny_bert_and_batches():
    from test_models import FAMILIES
    model = FAMILIES["bert"][0]().eval()
    batches = [{"input_ids": torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(i)),
                "attention_mask": torch.ones(4, 9, dtype=torch.long)} for i in range(3)]
    return model, batches


@pytest.mark.parametrize("space", ["feature", "weight"])
def test_plan_by_ratio_is_the_smallest_common_threshold_that_fits(space):
    from s2d.lowrank import lowrank_table, plan_ranks
    from s2d.lowrank.factorise import linear_params

    model, batches = _tiny_bert_and_batches()
    rows = lowrank_table(model, batches, threshold=0.1)
    dense = linear_params(rows)
    plan = plan_ranks(rows, space, ratio=0.8)
    assert plan.params <= 0.8 * dense and plan.dense_params == dense and plan.ranks
    # brute force: the errors only change plans at curve values; the smallest value whose plan fits
    values = sorted({v for r in rows for v in r.curves[f"{space}_output"]})
    fits = [t for t in values if plan_ranks(rows, space, threshold=t).params <= 0.8 * dense]
    assert plan.ranks == plan_ranks(rows, space, threshold=fits[0]).ranks
    for r in rows:                                              # only below break-even, at the threshold's rank
        if r.name in plan.ranks:
            assert plan.ranks[r.name] <= r.break_even
            assert plan.ranks[r.name] == smallest_rank(torch.tensor(r.curves[f"{space}_output"]), plan.threshold)
    with pytest.raises(ValueError, match="exactly one of threshold and ratio"):
        plan_ranks(rows, space)
    with pytest.raises(ValueError, match="space must be one of"):
        plan_ranks(rows, "pca", ratio=0.5)


def test_factorise_block_by_block_sees_the_factorised_inputs():
    import copy

    from s2d.lowrank import factorise_model, lowrank_table, plan_ranks
    from s2d.lowrank.factorise import RankPlan
    from s2d.models import blocks

    model, batches = _tiny_bert_and_batches()
    original = copy.deepcopy(model)
    rows = lowrank_table(model, batches, threshold=0.1)
    plan = plan_ranks(rows, "feature", ratio=0.7)
    first_block, second_block = (b.name for b in blocks(model))
    target = next(n for n in plan.ranks if n.startswith(second_block + "."))
    factorise_model(model, batches, plan)
    n_params = sum(p.numel() for r in rows for p in model.get_submodule(r.name).parameters())
    assert n_params == plan.params                              # the factors hold exactly the planned parameters
    assert all(isinstance(model.get_submodule(n), torch.nn.Sequential) for n in plan.ranks)
    # brute force: factorise only the first block, capture the target's inputs, build its factors
    ref = copy.deepcopy(original)
    early = {n: r for n, r in plan.ranks.items() if n.startswith(first_block + ".")}
    factorise_model(ref, batches, RankPlan("feature", plan.threshold, early, 0, 0))
    seen = []
    h = ref.get_submodule(target).register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for b in batches:
            ref(**b)
    h.remove()
    x = torch.cat(seen)
    lin = original.get_submodule(target)
    first, second, bias = feature_factors(lin.weight, lin.bias, *_moments(x), plan.ranks[target])
    got = model.get_submodule(target)
    torch.testing.assert_close(got[0].weight.double(), first, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1].bias.double(), bias, rtol=1e-4, atol=1e-5)
    with torch.no_grad():                                       # the factorised model still classifies
        assert model(**batches[0]).logits.shape == original(**batches[0]).logits.shape


@pytest.mark.slow
def test_minilm_factorised_layer_error_is_its_curve_value():
    """MiniLM-L6 on real sentences: factorise at 70 % of the Linears' parameters, then measure the first
    factorised layer of block 0 (whose inputs factorisation does not change) on the calibration data:
    its relative output error is the curve value at its rank."""
    import copy

    from s2d import assets
    from s2d.data import build_loaders, calibration_batches
    from s2d.lowrank import factorise_model, lowrank_table, plan_ranks
    from s2d.models import load

    if not (assets.is_cached("minilm-l6") and assets.is_cached("rotten-tomatoes")):
        pytest.skip("minilm-l6 / rotten-tomatoes assets not cached")
    torch.manual_seed(0)
    bundle = load("minilm-l6", task="classification", num_labels=2)
    loaders = build_loaders("rotten-tomatoes", bundle, batch_size=16, eval_batch_size=16, max_length=48,
                            limit_eval=32, limit_train=128, seed=0)
    calib = calibration_batches(loaders, num_samples=32, batch_size=16)
    model = bundle.model.eval()
    rows = {r.name: r for r in lowrank_table(model, calib, threshold=0.1)}
    plan = plan_ranks(list(rows.values()), "feature", ratio=0.7)
    name = next(n for n in plan.ranks if ".layer.0." in n)
    small = factorise_model(copy.deepcopy(model), calib, plan)

    def outputs(m):
        got = []
        h = m.get_submodule(name).register_forward_hook(
            lambda mod, a, o: got.append(o[batch["attention_mask"].bool()].double()))
        with torch.no_grad():
            for batch in calib:
                m(**{k: v for k, v in batch.items() if k != "labels"})
        h.remove()
        return torch.cat(got)

    y, y_hat = outputs(model), outputs(small)
    measured = float((y_hat - y).norm() / y.norm())
    assert measured == pytest.approx(rows[name].curves["feature_output"][plan.ranks[name] - 1], rel=1e-3)
    assert measured <= plan.threshold + 1e-9


def _identity_factorised(model):
    """Every block Linear replaced by nn.Sequential(itself, an identity Linear): a factorisation that
    computes exactly what the dense model does."""
    import copy

    from torch import nn

    from s2d.models import blocks
    model = copy.deepcopy(model)
    for b in blocks(model):
        for name in [*b.qkv, b.attn_out, *b.fc1, b.fc2]:
            lin = model.get_submodule(name)
            eye = nn.Linear(lin.out_features, lin.out_features, bias=False)
            with torch.no_grad():
                eye.weight.copy_(torch.eye(lin.out_features))
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, nn.Sequential(lin, eye))
    return model


@pytest.mark.parametrize("method", ["rtn", "repq", "ptq4vit", "erq"])
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_ptq_methods_treat_a_factorised_layer_as_the_layer_it_replaces(family, method):
    """With the second factors left in float (an identity here), a method must quantize the first factor
    exactly as it quantizes the dense layer: the same slot in the block (LayerNorm reparameterisation,
    the post-GELU quantizer, ERQ's compensation), so the quantized logits are equal."""
    import copy

    from ptq_models import MODELS, logits

    from s2d.quant import QuantConfig, quantize_model
    make, make_batches = MODELS[family]
    model, batches = make(), make_batches()
    spec = QuantConfig(w_bits=4, a_bits=4, skip=("*.1",))
    dense = quantize_model(copy.deepcopy(model), spec, method=method, calib=batches, progress=False)
    factorised = quantize_model(_identity_factorised(model), spec, method=method, calib=batches, progress=False)
    assert torch.equal(logits(factorised, batches[1]), logits(dense, batches[1]))
    assert not torch.allclose(logits(dense, batches[1]), logits(model, batches[1]), atol=1e-4)   # it quantized


def test_a_factorised_fused_qkv_is_refused_by_the_ptq_methods():
    from test_models import FAMILIES
    from torch import nn

    from s2d.quant.ptq.common import require_blocks
    model = FAMILIES["timm-vit"][0]()
    qkv = model.blocks[0].attn.qkv
    model.blocks[0].attn.qkv = nn.Sequential(nn.Linear(qkv.in_features, 4), nn.Linear(4, qkv.out_features))
    with pytest.raises(ValueError, match="factorised fused qkv"):
        require_blocks(model)


def test_output_max_abs_against_the_factors_run_by_hand():
    """max |a| of every layer output (the second factor's for a factorised layer) and of the rank-r
    intermediates, against running each factor on its captured real-token inputs."""
    import copy

    from s2d.lowrank import factorise_model, lowrank_table, plan_ranks
    from s2d.pipeline.compression import output_max_abs
    model, batches = _tiny_bert_and_batches()
    for b in batches:
        b["attention_mask"][:2, 6:] = 0                          # padding must be left out
    rows = lowrank_table(model, batches, threshold=0.2)
    small = factorise_model(copy.deepcopy(model), batches, plan_ranks(rows, "feature", ratio=0.6)).eval()
    names = [r.name for r in rows]
    mods = dict(small.named_modules())
    inputs = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0])) for n in names]
    with torch.no_grad():
        for b in batches:
            small(**b)
            for n in names:                                  # the pooler's input is (B, C): no padding
                x = inputs[n][-1]
                inputs[n][-1] = x[b["attention_mask"].bool()] if x.dim() == 3 else x
    for h in hooks:
        h.remove()
    outer, inner = 0.0, 0.0
    with torch.no_grad():
        for n in names:
            x = torch.cat(inputs[n])
            m = mods[n]
            if isinstance(m, torch.nn.Sequential):
                mid = x @ m[0].weight.T
                inner = max(inner, mid.abs().max().item())
                y = mid @ m[1].weight.T + m[1].bias
            else:
                y = x @ m.weight.T + m.bias
            outer = max(outer, y.abs().max().item())
    got_outer, got_inner = output_max_abs(small, names, batches)
    assert got_outer == pytest.approx(outer, rel=1e-5) and got_inner == pytest.approx(inner, rel=1e-5)
    assert output_max_abs(model, names, batches)[1] is None


def test_compression_grid_reports_a_causal_lms_perplexity_against_its_nll_by_hand():
    """A causal-LM classifier's rows carry exp(mean text NLL) and the paired NLL difference to the dense
    model, both recomputed here from each model's own ``text_nll`` on the test batches."""
    import copy
    import math
    from types import SimpleNamespace

    import transformers as tf

    from s2d.lowrank import factorise_model, lowrank_table, plan_ranks
    from s2d.models import CausalLMClassifier
    from s2d.pipeline.compression import compression_grid, format_compression_table
    torch.manual_seed(0)
    lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()
    model = CausalLMClassifier(lm, [5, 6]).eval()

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(7, 64, (6, 10), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "text_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (6,), generator=g)}
    calib, test = [batch(i) for i in range(3)], [batch(10 + i) for i in range(2)]
    rows = lowrank_table(model, calib, threshold=0.2)
    grid = compression_grid(model, SimpleNamespace(test=test), calib, rows, [0.6], repeats=1)

    def nll(m):
        with torch.no_grad():
            return torch.cat([m(**{k: v for k, v in b.items() if k != "labels"}).text_nll for b in test]).double()
    small = factorise_model(copy.deepcopy(model), calib, plan_ranks(rows, "feature", ratio=0.6)).eval()
    dense_nll, small_nll = nll(model), nll(small)
    assert grid[0]["perplexity"] == pytest.approx(math.exp(float(dense_nll.mean())), rel=1e-6)
    assert grid[1]["perplexity"] == pytest.approx(math.exp(float(small_nll.mean())), rel=1e-6)
    assert grid[1]["nll_vs_dense"].delta == pytest.approx(float((small_nll - dense_nll).mean()), abs=1e-9)
    assert grid[1]["layers"] > 0 and grid[1]["perplexity"] != grid[0]["perplexity"]  # it changed the model
    table = format_compression_table(grid)
    assert "| perplexity | vs dense (%) |" in table and f"{grid[1]['perplexity']:.2f}" in table
