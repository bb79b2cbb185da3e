"""scanpy's convention for the public AnnData functions (its tests/test_package_structure.py):
AnnData first, options keyword-only, results under ``key_added`` with the settings used in
``uns[key_added]["params"]``, ``copy=True`` returning the AnnData and otherwise ``None``."""

import inspect

import numpy as np
import pytest

import contrastive_sc as cs
from contrastive_sc import ContrastiveSC

#: (callable, writes results into the AnnData) for every public function or method that takes an AnnData.
PUBLIC = [
    (cs.cluster, True),
    (ContrastiveSC.embed, True),
    (ContrastiveSC.annotate, True),
    (ContrastiveSC.fit, False),
    (ContrastiveSC.check, False),
    (ContrastiveSC.transform, False),
    (ContrastiveSC.preprocess, False),
    (ContrastiveSC.coverage, False),
]


@pytest.mark.parametrize("function,writes", PUBLIC, ids=lambda f: getattr(f, "__qualname__", ""))
def test_anndata_first_and_options_keyword_only(function, writes):
    parameters = [p for p in inspect.signature(function).parameters.values() if p.name != "self"]
    assert parameters[0].name == "adata", f"{function.__qualname__}: AnnData must come first"
    positional = [p for p in parameters[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 1, f"{function.__qualname__}: options must be keyword-only, got {positional}"
    names = {p.name for p in parameters}
    if writes:
        assert {"key_added", "copy"} <= names, function.__qualname__


def test_writers_record_the_settings_used_and_honour_copy(trained, synthetic, tiny_config):
    labelled = ContrastiveSC(tiny_config.replace(epochs=1)).fit(synthetic.copy(), label_key="label")
    adata = synthetic.copy()
    assert trained.embed(adata, key_added="emb") is None
    assert adata.uns["emb"]["params"]["layer"] == "X" and adata.obsm["emb"].shape[0] == adata.n_obs
    assert cs.cluster(adata, "kmeans", use_rep="emb", key_added="km", n_clusters=3) is None
    assert adata.uns["km"]["params"] == {"method": "kmeans", "use_rep": "emb", "n_clusters": 3}
    copied = labelled.annotate(adata, key_added="types", copy=True)
    assert "types" not in adata.obs and {"types", "types_confidence"} <= set(copied.obs)
    assert copied.uns["types"]["params"]["min_confidence"] == pytest.approx(labelled.annotator.min_confidence)
    assert np.isfinite(copied.obs["types_confidence"]).all()
