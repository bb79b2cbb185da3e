import math

import numpy as np
import pytest
import torch

from contrastive_sc.method.config import get_preset
from contrastive_sc.method.model import ContrastiveSC
from contrastive_sc.method.objectives import ClusterHead, cluster_loss, draw_partners, neighbour_table
from contrastive_sc.method.train import fit_encoder


def _groups(seed=0):
    # three well separated groups of 40 cells in 30 dimensions
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(3, 30))
    labels = np.repeat(np.arange(3), 40)
    return (centres[labels] + rng.normal(0, 1, size=(120, 30))).astype(np.float32), labels


def test_neighbour_table_holds_each_cell_and_its_group():
    x, labels = _groups()
    table = neighbour_table(x, 5)
    assert table.shape == (120, 5)
    assert (table[:, 0] == np.arange(120)).all()  # a cell is its own nearest neighbour
    assert (labels[table] == labels[:, None]).all()
    partners = draw_partners(table, np.arange(120), np.random.default_rng(0))
    assert all(p in table[i] for i, p in enumerate(partners))
    assert neighbour_table(x[:3], 10).shape == (3, 3)  # capped at the number of cells
    with pytest.raises(ValueError, match="positive_neighbours must be >= 1"):
        neighbour_table(x, 0)


def test_cluster_loss_prefers_agreeing_balanced_clusters():
    n, k = 60, 3
    agree = torch.eye(k)[torch.arange(n) % k] * 0.9 + 0.1 / k  # both views: cell i in cluster i mod 3
    shuffled = agree[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    collapsed = torch.full((n, k), 0.01).index_fill_(1, torch.tensor([0]), 0.98)
    good = cluster_loss(torch.cat([agree, agree]))
    assert good < cluster_loss(torch.cat([agree, shuffled]))
    assert good < cluster_loss(torch.cat([collapsed, collapsed]))
    # the balance term is log K minus the entropy of the mean membership, per view
    uniform = torch.full((n, k), 1 / k)
    assert float(cluster_loss(torch.cat([uniform, uniform]))) == pytest.approx(math.log(2 * k - 1), rel=1e-5)
    with pytest.raises(ValueError, match="cluster_head must be >= 2"):
        ClusterHead(8, 1)


@pytest.mark.parametrize("dropout", [0.9, 0.5])  # sparse and dense CPU views
def test_training_with_neighbours_and_cluster_head(tiny_config, dropout):
    x, _ = _groups()
    cfg = tiny_config.replace(positive_neighbours=5, cluster_head=4, input_dropout=dropout, batch_size=40)
    encoder, history = fit_encoder(x, cfg.encoder, cfg.train)
    assert len(history.loss) == cfg.train.epochs and all(np.isfinite(history.loss))
    assert encoder.n_outputs == cfg.encoder.layers[-1]  # the head is not part of the encoder


def test_research_presets_leave_the_published_ones_alone(synthetic):
    for name in ("paper", "fused"):
        train = get_preset(name).train
        assert train.positive_neighbours == 0 and train.cluster_head == 0
    pcres = get_preset("pcres")
    assert (pcres.preprocess.clip, pcres.encoder.pca_genes, pcres.preprocess.n_genes) == (10.0, 2000, 2000)
    assert get_preset("pcres-soft").train.temperature == 1.0
    assert get_preset("pcres-nn").train.positive_neighbours == 10
    assert get_preset("pcres-cc").train.cluster_head == 20
    nncc = get_preset("pcres-nncc").train
    assert (nncc.positive_neighbours, nncc.cluster_head) == (10, 20)
    assert get_preset("pcres-5k").preprocess.n_genes == 5000 and get_preset("pcres-5k").encoder.pca_genes == 2000
    model = ContrastiveSC(preset="pcres-nn", n_genes=100, pca_genes=100, epochs=2).fit(synthetic, clusters=False)
    assert model.transform(synthetic).shape == (300, 60 + 50)


def test_bad_objective_settings_are_refused(tiny_config):
    with pytest.raises(ValueError, match="positive_neighbours must be a whole number within \\[0, 1000\\]"):
        tiny_config.replace(positive_neighbours=-1)
    with pytest.raises(ValueError, match="cluster_head must be 0 \\(off\\) or >= 2"):
        tiny_config.replace(cluster_head=1)


def test_encoder_weight_scales_the_encoder_block(synthetic):
    model = ContrastiveSC(preset="pcres-half", n_genes=100, pca_genes=100, epochs=1).fit(synthetic, clusters=False)
    embedding = model.transform(synthetic)
    rms = [float(np.sqrt(((b - b.mean(axis=0)) ** 2).sum(axis=1).mean())) for b in (embedding[:, :60], embedding[:, 60:])]
    assert rms[0] == pytest.approx(0.5, rel=1e-3) and rms[1] == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError, match=r"encoder_weight must be a finite number within \(0, 100\]"):
        get_preset("pcres").replace(encoder_weight=0)
