"""The paper's own training loop (the speed reference) and its loss."""

import numpy as np
import torch

from contrastive_sc.benchmarks.original_loop import _supcon_loss, train_reference
from contrastive_sc.method.loss import NTXentLoss


def test_its_supcon_loss_is_our_nt_xent():
    # With two views and no labels, the original code's SupCon loss is NT-Xent at the same temperature.
    z = torch.nn.functional.normalize(torch.randn(2, 16, 8), dim=2)  # (views, cells, dims)
    supcon = _supcon_loss(torch.stack([z[0], z[1]], dim=1), temperature=0.5)
    torch.testing.assert_close(supcon, NTXentLoss(0.5)(torch.cat([z[0], z[1]])), rtol=1e-5, atol=1e-6)


def test_the_original_loop_trains_an_encoder_that_separates_groups(synthetic, tiny_config):
    from sklearn.metrics import adjusted_rand_score

    from contrastive_sc.analysis.cluster import cluster_labels
    from contrastive_sc.method.preprocess import fit_preprocess, transform
    from contrastive_sc.method.rows import as_rows

    state = fit_preprocess(as_rows(synthetic.X), synthetic.var_names, n_genes=100)
    x = transform(synthetic.X, synthetic.var_names, state)
    encoder, seconds = train_reference(x, epochs=5, batch_size=64, lr=0.01, seed=0)
    with torch.no_grad():
        z = encoder(torch.as_tensor(x)).numpy()
    assert z.shape == (synthetic.n_obs, 60) and seconds > 0 and not encoder.training
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    labels = cluster_labels(z, "kmeans", n_clusters=3, seed=0)
    assert adjusted_rand_score(synthetic.obs["label"], labels) > 0.8
