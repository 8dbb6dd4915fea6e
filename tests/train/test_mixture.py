"""Mixture YAML, seeded weighted epochs, length grouping, per-process plans, held-out split."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import yaml
from synthetic import write_mixture

from train.config import ConfigError
from train.mixture import DataError, epoch_samples, load_mixture, plan_batches, quotas, rank_plan
from train.records import open_records, split


def test_load_mixture_resolves_paths_and_export_folder(data_dir):
    mix = load_mixture(data_dir / "mixture.yaml")
    assert [d.name for d in mix.datasets] == ["shapes", "text", "feedback"]
    fb = mix.datasets[2]
    assert fb.path == (data_dir / "export" / "data.jsonl").resolve() and fb.image_root == (data_dir / "export").resolve()
    assert mix.weights.tolist() == [2.0, 1.0, 1.0]


@pytest.mark.parametrize("body, error", [
    ({"datasets": []}, ConfigError),
    ({"datasets": [{"path": "shapes.jsonl", "weigth": 1}]}, ConfigError),
    ({"datasets": [{"path": "shapes.jsonl", "weight": -1}]}, ConfigError),
    ({"datasets": [{"path": "missing.jsonl"}]}, DataError),
    ({"datasets": [{"path": "shapes.jsonl"}, {"path": "shapes.jsonl"}]}, ConfigError),  # same name twice
])
def test_mixture_errors(data_dir, tmp_path, body, error):
    path = data_dir / f"bad-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(error):
        load_mixture(path)


def test_quotas_follow_weights_exactly():
    assert quotas(np.array([2.0, 1.0, 1.0]), 100).tolist() == [50, 25, 25]
    assert quotas(np.array([1.0, 1.0, 1.0]), 10).sum() == 10


def test_weighted_epochs_are_deterministic_per_seed_and_follow_weights():
    pools = [np.arange(0, 100), np.arange(100, 130), np.arange(130, 1130)]
    weights = np.array([3.0, 1.0, 1.0])
    a = epoch_samples(pools, weights, 1000, seed=1, epoch=0)
    b = epoch_samples(pools, weights, 1000, seed=1, epoch=0)
    c = epoch_samples(pools, weights, 1000, seed=2, epoch=0)
    d = epoch_samples(pools, weights, 1000, seed=1, epoch=1)
    assert np.array_equal(a, b) and not np.array_equal(np.sort(a), np.sort(c)) and not np.array_equal(a, d)
    share = Counter(np.searchsorted([100, 130], a, side="right").tolist())
    assert share == {0: 600, 1: 200, 2: 200}
    small = a[(a >= 100) & (a < 130)]  # an up-weighted small pool repeats, each record about equally
    counts = Counter(small.tolist())
    assert len(counts) == 30 and max(counts.values()) - min(counts.values()) <= 1


def test_length_grouping_lowers_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 600, size=2000)
    ids = np.arange(2000)

    def padding(batches):
        slots = sum(len(b) * lengths[b].max() for b in batches)
        return 1 - sum(lengths[b].sum() for b in batches) / slots

    grouped = plan_batches(ids, lengths, 8, seed=0, epoch=0, group_by_length=True, megabatch_mult=32)
    random = plan_batches(ids, lengths, 8, seed=0, epoch=0, group_by_length=False, megabatch_mult=32)
    assert padding(grouped) < 0.05 < 0.3 < padding(random)
    assert sorted(np.concatenate(grouped).tolist()) == ids.tolist()  # every sample once
    assert lengths[grouped[0]].max() == lengths.max()  # the longest batch first: OOM shows at step 1
    again = plan_batches(ids, lengths, 8, seed=0, epoch=0, group_by_length=True, megabatch_mult=32)
    assert all(np.array_equal(x, y) for x, y in zip(grouped, again))


def test_rank_plans_split_batches_evenly():
    batches = [np.array([i]) for i in range(23)]
    plans = [rank_plan(batches, r, world=2, grad_accum=2) for r in range(2)]
    assert plans[0].steps == plans[1].steps == 5
    assert len(plans[0].batches) == len(plans[1].batches) == 10
    assert not set(np.concatenate(plans[0].batches)) & set(np.concatenate(plans[1].batches))


def test_split_holds_out_per_dataset_and_skips_bad(data_dir, tmp_path, processor):
    import synthetic

    bad, _ = synthetic.make_bad(tmp_path)
    mix = load_mixture(write_mixture(tmp_path / "m.yaml", [("shapes", str(data_dir / "shapes.jsonl"), 1.0),
                                                           ("bad", "bad.jsonl", 1.0)]))
    store = open_records(mix.datasets, processor, True, None)
    parts = split(store, eval_per_dataset=2, seed=0)
    assert len(parts.eval) == 3  # 2 of shapes, and at most half of bad's 3 usable records
    assert not set(parts.eval) & set(parts.train_pool)
    assert (store.status[parts.train_pool] == 0).all()
    assert np.array_equal(split(store, 2, 0).eval, parts.eval)


def test_no_usable_sample_is_a_data_error(tmp_path, processor):
    (tmp_path / "empty.jsonl").write_text('{"messages": []}\n{oops\n')
    mix = load_mixture(write_mixture(tmp_path / "m.yaml", [("e", "empty.jsonl", 1.0)]))
    with pytest.raises(DataError, match="no usable training samples"):
        split(open_records(mix.datasets, processor, True, None), 0, 0)
